"""Ensembles: several checkpoints and their score weights, used wherever one checkpoint is.

An ensemble file (YAML or JSON; member paths relative to the file)::

    kind: fbnet-ensemble
    members:
      - {checkpoint: flickr8k/best.pt, weight: 1.0}
      - {checkpoint: flickr8k-seed1/best.pt, weight: 0.5}

Its score for a pair is the weighted sum of the members' own fused scores,
``S = sum_m w_m S_m`` (each ``S_m`` is eq. (7) for FB-Net, or a related model's own fusion), the
score averaging SCAN, VSRN and VSE-infinity report for their two-model ensembles. The members may
be different models or seeds; each reads captions with its own vocabulary. They must agree on
the canvas (``model.backbone.image_size``), since the runtime decodes a photo once for all of
them. :func:`choose_weights` picks the weights on the validation split.
"""

from __future__ import annotations

import itertools
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .atomic import atomic_write_text
from .checkpoint import CheckpointError, load_checkpoint
from .errors import FbnetError
from .jsonfile import read_mapping
from .metrics import retrieval_report
from .runtime.engine.ensemble import combine

KIND = "fbnet-ensemble"
SUFFIXES = (".yaml", ".yml", ".json")


class EnsembleError(FbnetError, ValueError):
    """An ensemble file is malformed or names checkpoints that cannot be combined; names the file."""


@dataclass(frozen=True)
class Member:
    checkpoint: Path
    weight: float


@dataclass(frozen=True)
class Ensemble:
    path: Path
    members: tuple[Member, ...]

    def to_dict(self) -> dict:
        base = self.path.parent.resolve()
        return {"kind": KIND, "members": [
            {"checkpoint": _relative(m.checkpoint, base), "weight": m.weight} for m in self.members]}


def is_ensemble(path: str | Path) -> bool:
    return Path(path).suffix in SUFFIXES


def load_ensemble(path: str | Path) -> Ensemble:
    """Read and check an ensemble file: every member an fbnet checkpoint with a positive weight,
    all on one canvas size. Errors name the file and the member at fault."""
    path = Path(path)
    data = read_mapping(path, EnsembleError, "ensemble file")
    if not isinstance(data, dict) or data.get("kind") != KIND:
        raise EnsembleError(f"{path}: not an fbnet ensemble (needs 'kind: {KIND}')")
    rows = data.get("members")
    if not isinstance(rows, list) or not rows:
        raise EnsembleError(f"{path}: 'members' must be a non-empty list of {{checkpoint, weight}}")
    members = []
    for i, row in enumerate(rows):
        if not isinstance(row, dict) or set(row) - {"checkpoint", "weight"} or "checkpoint" not in row:
            raise EnsembleError(f"{path}: members[{i}] must be a mapping with 'checkpoint' and 'weight'")
        weight = row.get("weight", 1.0)
        if not isinstance(weight, (int, float)) or isinstance(weight, bool) or weight <= 0:
            raise EnsembleError(f"{path}: members[{i}].weight must be a positive number, not {weight!r}")
        members.append(Member((path.parent / str(row["checkpoint"])), float(weight)))
    ensemble = Ensemble(path, tuple(members))
    member_checkpoints(ensemble)  # every member readable and compatible
    return ensemble


def member_checkpoints(ensemble: Ensemble) -> list[dict]:
    """The members' checkpoints, loaded and checked to share a canvas size."""
    loaded, sizes = [], {}
    for i, m in enumerate(ensemble.members):
        try:
            ckpt = load_checkpoint(m.checkpoint)
        except CheckpointError as exc:
            raise EnsembleError(f"{ensemble.path}: members[{i}]: {exc}") from None
        sizes[m.checkpoint] = ckpt["config"]["model"]["backbone"]["image_size"]
        loaded.append(ckpt)
    if len(set(sizes.values())) > 1:
        listed = ", ".join(f"{p} ({s} px)" for p, s in sizes.items())
        raise EnsembleError(f"{ensemble.path}: members resize photos to different canvases ({listed}); "
                            "an ensemble's members must share model.backbone.image_size")
    return loaded


def choose_weights(scores: list[np.ndarray], caption_image: np.ndarray, image_labels=None, caption_labels=None,
                   grid=(0.25, 0.5, 1.0, 2.0)) -> tuple[tuple[float, ...], dict]:
    """Member weights for the best validation MAP (the primary one, as training selects): the
    first member weighs 1, each other one a value of ``grid``. Returns the weights and the report."""
    best = None
    for rest in itertools.product(grid, repeat=len(scores) - 1):
        weights = (1.0, *rest)
        report = retrieval_report(combine(scores, weights), caption_image, image_labels, caption_labels)
        score = report[report["primary"]]["map"]
        if best is None or score > best[0] + 1e-12:
            best = (score, weights, report)
    return best[1], best[2]


def write_ensemble(path: str | Path, checkpoints: list[Path], weights) -> Ensemble:
    path = Path(path)
    ensemble = Ensemble(path, tuple(Member(Path(c), float(w)) for c, w in zip(checkpoints, weights)))
    atomic_write_text(path, json.dumps(ensemble.to_dict(), indent=1) + "\n" if path.suffix == ".json"
                      else _yaml(ensemble.to_dict()))
    return load_ensemble(path)


def _yaml(data: dict) -> str:
    import yaml

    return yaml.safe_dump(data, sort_keys=False)


def _relative(p: Path, base: Path) -> str:
    p = Path(p).resolve()
    try:
        return str(p.relative_to(base))
    except ValueError:
        return str(p)
