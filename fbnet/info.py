"""``fbnet info PATH``: what a checkpoint, an ensemble file, a bundle or a gallery holds.

Printed as ``key: value`` lines: the model and its shapes, the metrics and fusion weights it was
selected with, and for bundles and galleries the store, the item counts and whether every file
still has the sha256 its manifest recorded.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from .errors import FbnetError


class InfoError(FbnetError):
    """The path is none of the things ``fbnet info`` describes."""


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def describe(path: str | Path) -> list[str]:
    path = Path(path)
    if path.is_dir() and (path / "manifest.json").is_file():
        return describe_bundle(path)
    if path.is_dir() and (path / "gallery.json").is_file():
        return describe_gallery(path)
    from .ensemble import is_ensemble

    if path.is_file() and is_ensemble(path):
        return describe_ensemble(path)
    if path.is_file():
        return describe_checkpoint(path)
    raise InfoError(f"{path}: not a checkpoint, ensemble file, bundle (manifest.json) or gallery (gallery.json)")


def _metrics(m: dict | None) -> str:
    if not m:
        return "none recorded"
    kind = m.get("primary", "instance")
    r = m.get(kind, {})
    return f"{kind} MAP {r.get('map', float('nan')):.4f}, R@sum {r.get('rsum', float('nan')):.1f}"


def describe_checkpoint(path: Path) -> list[str]:
    from .checkpoint import load_checkpoint

    ckpt = load_checkpoint(path)
    cfg = ckpt["config"]
    model, backbone, detector = cfg["model"], cfg["model"]["backbone"], cfg["model"]["detector"]
    params = sum(v.numel() for v in ckpt["model"].values())
    fusion = ", ".join(f"{k} {v}" for k, v in ckpt.get("fusion", {}).items())
    return [
        f"{path}: fbnet checkpoint (format {ckpt['format_version']}, fbnet {ckpt['versions']['fbnet']}, "
        f"torch {ckpt['versions']['torch']})",
        f"model: {model['name']}, d={model['embed_dim']}, levels {model['levels']}, branches "
        f"{'+'.join(model['branches'])}" + (f", global pool {model['global_pool']}" if model.get("global_pool") else ""),
        f"parameters: {params:,} (head); block features {ckpt['feature_dim']}-d",
        f"backbone: {backbone['name']} ({backbone['mode']}, {backbone['image_size']} px canvas"
        + (f", top {backbone['trainable_blocks']} modules fine-tuned" if backbone.get("trainable_blocks") else "")
        + f"); detector: {detector['name']} (J={detector['max_boxes']})",
        f"vocabulary: {len(ckpt['vocab']['words'])} entries",
        f"epoch: {ckpt['epoch']} (best validation MAP {ckpt['best']:.4f})",
        f"validation: {_metrics(ckpt.get('val_metrics'))}",
        f"fusion weights: {fusion}",
        f"dataset: {ckpt['data_root']}",
        f"sha256: {sha256(path)}",
    ]


def describe_ensemble(path: Path) -> list[str]:
    from .ensemble import load_ensemble, member_checkpoints

    ensemble = load_ensemble(path)
    lines = [f"{path}: fbnet ensemble of {len(ensemble.members)} members"]
    for m, ckpt in zip(ensemble.members, member_checkpoints(ensemble)):
        lines.append(f"member {m.checkpoint}: weight {m.weight}, model {ckpt['config']['model']['name']}, "
                     f"validation {_metrics(ckpt.get('val_metrics'))}")
    return lines


def describe_bundle(path: Path) -> list[str]:
    raise NotImplementedError


def describe_gallery(path: Path) -> list[str]:
    raise NotImplementedError
