"""One-file checkpoints: weights, full config, vocabulary, fusion weights, metrics, versions.

Written atomically (temporary file + fsync + rename), so an interrupted run never leaves a
half-written checkpoint; a file from another format version or a truncated file gives one
:class:`CheckpointError` that names it.
"""

from __future__ import annotations

import copy
import io
import platform
from pathlib import Path

import numpy as np
import torch

from . import FORMAT_VERSION, __version__
from .atomic import atomic_write
from .errors import FbnetError

KIND = "fbnet-checkpoint"


class CheckpointError(FbnetError, ValueError):
    """A checkpoint is missing, truncated, or from an incompatible version."""


def library_versions() -> dict[str, str]:
    import torchvision

    return {"fbnet": __version__, "torch": torch.__version__, "torchvision": torchvision.__version__,
            "numpy": np.__version__, "python": platform.python_version()}


def save_checkpoint(path: str | Path, payload: dict) -> Path:
    """Write ``payload`` (plus format and version fields) to ``path`` atomically."""
    data = {"kind": KIND, "format_version": FORMAT_VERSION, "versions": library_versions(), **payload}
    buf = io.BytesIO()
    torch.save(data, buf)
    return atomic_write(path, lambda fh: fh.write(buf.getbuffer()))


def load_checkpoint(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint not found")
    try:
        data = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # truncated zip, pickle errors, ...
        raise CheckpointError(f"{path}: not a readable checkpoint (truncated or corrupt?): {exc}") from None
    if not isinstance(data, dict) or data.get("kind") != KIND:
        raise CheckpointError(f"{path}: not an fbnet checkpoint")
    if data.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(
            f"{path}: checkpoint format {data.get('format_version')} was written by fbnet "
            f"{data.get('versions', {}).get('fbnet', '?')}; this fbnet ({__version__}) reads format "
            f"{FORMAT_VERSION}. Re-train, or use the fbnet version that wrote it."
        )
    return data


def with_detector_size(ckpt: dict, size: int | None, source: str | Path = "checkpoint") -> dict:
    """``ckpt`` with its YOLOv3-tiny detector run at ``size`` x ``size`` (``model.detector.input_size``),
    to serve a smaller detector than the one trained with (``fbnet export --detector-size``); ``ckpt``
    itself when ``size`` is None. The weights stay the trained ones, so the boxes change:
    BENCHMARKS.md ("Image query: detector input size") measures what that costs in dev R@sum."""
    if size is None:
        return ckpt
    if size <= 0 or size % 32:
        raise CheckpointError(f"{source}: detector size {size} is not a positive multiple of 32")
    detector = ckpt["config"]["model"]["detector"]
    if detector.get("name") != "yolov3_tiny":
        raise CheckpointError(f"{source}: its detector is {detector.get('name')!r}; only yolov3_tiny takes an "
                              "input size (--detector-size)")
    out = {**ckpt, "config": copy.deepcopy(ckpt["config"])}
    out["config"]["model"]["detector"]["input_size"] = size
    return out


def with_detector_file(ckpt: dict, path: str | Path | None, source: str | Path = "checkpoint") -> dict:
    """``ckpt`` serving the distilled detector at ``path`` (``fbnet distill-detector``; ``fbnet export
    --detector``) instead of the one it was trained with; ``ckpt`` itself when ``path`` is None. The
    file must keep the checkpoint's J boxes and work on its canvas. As with ``--detector-size``, the
    weights were trained on the old detector's boxes: BENCHMARKS.md ("Image query: detector input
    size") measures what serving other boxes costs in dev R@sum."""
    if path is None:
        return ckpt
    from .models.mobilenet_head import read_distilled

    data = read_distilled(path)
    model = ckpt["config"]["model"]
    if model["backbone"]["name"] == "detector":
        raise CheckpointError(f"{path}: {source} pools its blocks from its own detector's trunk (backbone: detector), "
                              "which a distilled detector cannot replace")
    if data["detector"]["max_boxes"] != model["detector"]["max_boxes"]:
        raise CheckpointError(f"{path}: keeps {data['detector']['max_boxes']} boxes per image, but {source} was "
                              f"trained with J = {model['detector']['max_boxes']}")
    if data["canvas"] != model["backbone"]["image_size"]:
        raise CheckpointError(f"{path}: distilled on a {data['canvas']} px canvas, but {source} resizes photos to "
                              f"{model['backbone']['image_size']} px")
    out = {**ckpt, "config": copy.deepcopy(ckpt["config"]), "detector": data["state_dict"]}
    out["config"]["model"]["detector"].update(data["detector"], weights=str(Path(path).resolve()), input_size=0)
    return out


def as_exported(ckpt: dict, record: dict | None, source: str | Path = "checkpoint") -> dict:
    """``ckpt`` with the detector a bundle serves, from its manifest's ``source_checkpoint`` record
    (``detector_size`` or ``detector_file``, what ``fbnet export`` was given)."""
    record = record or {}
    return with_detector_file(with_detector_size(ckpt, record.get("detector_size"), source),
                              record.get("detector_file"), source)
