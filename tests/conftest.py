import json
import os
import shutil
import socket
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

os.environ.setdefault("TQDM_DISABLE", "1")
# two threads, or OMP_NUM_THREADS where it is set (one thread runs best beside other jobs)
torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS") or max(1, min(2, os.cpu_count() or 1))))

SHARED = Path(__file__).resolve().parents[1].parent / "shared"


@pytest.fixture(scope="session")
def tiny_synth(tmp_path_factory):
    from fbnet.data.synth import generate

    return generate(tmp_path_factory.mktemp("data") / "synth", seed=3, sizes=(24, 8, 8))


CONFIG = """
model:
  embed_dim: 128
  backbone: {name: detector, mode: roi, image_size: 128}
  detector: {name: fasterrcnn_light, epochs: 6, batch_size: 8, lr: 0.02, max_boxes: 4}
train:
  epochs: 6
  batch_size: 64
  lr: 0.001
"""


TINY_CONFIG = """
model:
  embed_dim: 32
  word_dim: 16
  backbone: {name: detector, mode: roi, image_size: 64}
  detector: {name: fasterrcnn_light, epochs: 1, batch_size: 4, max_boxes: 2}
train: {epochs: 1, batch_size: 16, fusion_grid: [1.0], global_grid: [1.0]}
"""


def mobilenet_encoder(k: int = 2, output_stride: int = 32, seed: int = 1):
    """A MobileNetV2 block encoder (96 px canvases, the top ``k`` modules trainable) whose
    activations are of order 1 (torchvision's random init gives ~1e-9 features, below float16's
    range): unit batch norms and He-initialised convolutions, the same for the same ``seed``."""
    from fbnet.config import BackboneConfig
    from fbnet.models.backbone import BlockEncoder

    enc = BlockEncoder(BackboneConfig(name="mobilenet_v2", weights="", image_size=96, trainable_blocks=k,
                                      output_stride=output_stride), seed=seed)
    torch.manual_seed(seed)
    for m in enc.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.reset_parameters()
        elif isinstance(m, torch.nn.Conv2d):
            torch.nn.init.kaiming_normal_(m.weight)
    return enc


def free_ports(n: int) -> list[int]:
    """``n`` distinct loopback ports free right now (for servers and process groups a test starts)."""
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def cli_ok(*args) -> str:
    """Run ``fbnet ARGS`` in-process; it must succeed. Returns its output."""
    from fbnet.cli import main

    res = CliRunner().invoke(main, [str(a) for a in args])
    assert res.exit_code == 0, res.output
    return res.output


def train_through_cli(root: Path, config: str, *synth_args) -> Path:
    """``fbnet data synth`` into ``root/data``, then ``fbnet train`` with ``config`` into ``root/run``."""
    (root / "cfg.yaml").write_text(config)
    cli_ok("data", "synth", "--out", root / "data", *synth_args)
    cli_ok("train", "--data", root / "data", "--config", root / "cfg.yaml", "--out", root / "run")
    return root


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    """A tiny FB-Net given one epoch on 12 synthetic 64 px images through the CLI: untrained in
    effect, made in seconds, so that the fast tier runs every stage (``root/data``, ``root/run``)."""
    return train_through_cli(tmp_path_factory.mktemp("tiny"), TINY_CONFIG, "--sizes", "12,4,4", "--seed", "1",
                             "--image-size", "64")


@pytest.fixture(scope="session")
def tiny_bundle(tiny_run):
    """The tiny run exported (``--fp16``: engines are built where TensorRT and a GPU are, else skipped)."""
    cli_ok("export", tiny_run / "run" / "best.pt", "--out", tiny_run / "bundle", "--fp16")
    return tiny_run / "bundle"


#: Fixtures that train through the CLI (minutes) or start a cluster or a server's environment: a
#: test that uses one, directly or through another fixture (``bundle``, ``served``, ``related``,
#: ...), is marked ``slow``.
SLOW_FIXTURES = {"trained", "flickr_run", "ray_cluster", "pytriton_python"}
#: Tests slow for another reason (measured with ``pytest --durations=0``; a node id without its
#: parameters covers every parameter): training runs of their own, FAISS PQ training.
SLOW_TESTS = {
    "tests/test_determinism.py::test_two_runs_are_identical",            # two trainings (17 s)
    "tests/test_training.py::test_early_stopping_and_resume",            # a training and its resume
    "tests/test_cuda.py::test_training_runs_on_cuda_and_resumes",        # trains (on a GPU host)
    "tests/test_stores.py::test_round_trip_error_is_bounded[pq]",        # PQ codebooks (40 s)
    "tests/test_distributed.py::test_two_gloo_processes_train_as_one_process_on_the_global_batch",  # 3 trainings (50 s)
    "tests/test_docs.py::test_training_doc_commands_run_as_written",     # torchrun trains (2 min)
}


def pytest_collection_modifyitems(config, items):
    """Mark the slow tier (``pytest -m "not slow"`` runs the rest), from the fixtures each test
    uses and ``SLOW_TESTS``."""
    for item in items:
        if (SLOW_FIXTURES & set(getattr(item, "fixturenames", ()))
                or item.nodeid in SLOW_TESTS or item.nodeid.split("[")[0] in SLOW_TESTS):
            item.add_marker(pytest.mark.slow)


@pytest.fixture(scope="session")
def trained(tmp_path_factory):
    """A tiny FB-Net trained through the CLI (shared by the end-to-end, export and runtime tests)."""
    return train_through_cli(tmp_path_factory.mktemp("e2e"), CONFIG, "--sizes", "300,60,60", "--seed", "1")


@pytest.fixture(scope="session")
def bundle(trained):
    out = trained / "bundle"
    if not out.exists():
        output = cli_ok("export", trained / "run" / "best.pt", "--out", out, "--fp16")
        assert "engines not built" in output and "--engines-only" in output
    return out


@pytest.fixture(scope="session")
def gallery_inputs(trained, tmp_path_factory):
    root = tmp_path_factory.mktemp("gallery_inputs")
    items = [json.loads(line) for line in (trained / "data" / "manifest.jsonl").read_text().splitlines()]
    test = [i for i in items if i["split"] == "test"][:12]
    (root / "images").mkdir()
    for it in test:
        shutil.copy(trained / "data" / it["image"], root / "images")
    (root / "captions.txt").write_text("".join(it["captions"][0] + "\n" for it in test))
    return root


@pytest.fixture(scope="session")
def served(bundle, gallery_inputs, tmp_path_factory):
    """The tiny model's bundle on ONNX Runtime and a gallery of 12 test images and captions."""
    from fbnet.runtime.engine.backends import select_backend
    from fbnet.runtime.engine.bundle import open_bundle
    from fbnet.runtime.engine.retriever import Retriever
    from fbnet.runtime.gallery.build import build_gallery, list_images, read_captions
    from fbnet.runtime.gallery.gallery import Gallery

    b = open_bundle(bundle)
    retriever = Retriever(b, select_backend(b, "onnxruntime"))
    out = tmp_path_factory.mktemp("search") / "gallery"
    build_gallery(retriever, list_images(gallery_inputs / "images"), read_captions(gallery_inputs / "captions.txt"), out)
    return retriever, Gallery(out, b), out


def assert_encoder_cut_to_used_boxes_is_exact(bundle_dir: Path, image_paths: list) -> None:
    """The image encoder fed only the box slots a batch uses (the runtime's default) gives, padded
    back to J, the features of feeding all J slots: photo by photo and as one batch, and on at
    least one photo with fewer boxes than J (so the cut is tested, not skipped)."""
    import numpy as np

    from fbnet.preprocess import load_image
    from fbnet.runtime.engine.backends import OnnxRuntimeBackend
    from fbnet.runtime.engine.bundle import open_bundle
    from fbnet.runtime.engine.retriever import Retriever

    b = open_bundle(bundle_dir)
    cut, full = Retriever(b, OnnxRuntimeBackend(b)), Retriever(b, OnnxRuntimeBackend(b))
    assert cut.encoder_cuts_boxes
    full.encoder_cuts_boxes = False
    canvases = np.stack([load_image(p, b.canvas) for p in image_paths])
    widths = []
    for batch in [canvases[i: i + 1] for i in range(len(canvases))] + [canvases]:
        feeds = cut.image_encoder_feeds(batch)
        widths.append(feeds["fg_mask"].shape[1])
        got, want = cut.encode_feeds(feeds), full.encode_canvases(batch)
        np.testing.assert_array_equal(got.fg_mask, want.fg_mask)
        for k in want.blocks:
            assert got.blocks[k].shape == want.blocks[k].shape, k
            np.testing.assert_allclose(got.blocks[k], want.blocks[k], atol=1e-5, err_msg=k)
    assert min(widths) < b.model.max_boxes, widths
