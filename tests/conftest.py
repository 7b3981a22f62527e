import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("TQDM_DISABLE", "1")
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

SHARED = Path(__file__).resolve().parents[1].parent / "shared"


@pytest.fixture(scope="session")
def tiny_synth(tmp_path_factory):
    from fbnet.data.synth import generate

    return generate(tmp_path_factory.mktemp("data") / "synth", seed=3, sizes=(24, 8, 8))
