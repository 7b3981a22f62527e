"""``fbnet info PATH``: what a checkpoint, an ensemble file, a bundle or a gallery (or an
ensemble's bundle or gallery) holds.

Printed as ``key: value`` lines: the model and its shapes, the metrics and fusion weights it was
selected with, and for bundles and galleries the store, the item counts and whether every file
still has the sha256 its manifest recorded.
"""

from __future__ import annotations

from pathlib import Path

from .errors import FbnetError
from .runtime.engine.bundle import sha256


class InfoError(FbnetError):
    """The path is none of the things ``fbnet info`` describes."""


def describe(path: str | Path) -> list[str]:
    path = Path(path)
    if path.is_dir() and (path / "manifest.json").is_file():
        return describe_bundle(path)
    if path.is_dir() and (path / "ensemble.json").is_file():
        return describe_ensemble_dir(path, "ensemble.json", describe_bundle)
    if path.is_dir() and (path / "ensemble-gallery.json").is_file():
        return describe_ensemble_dir(path, "ensemble-gallery.json", describe_gallery)
    if path.is_dir() and ((path / "gallery.json").is_file() or (path / "shards.json").is_file()):
        return describe_gallery(path)
    from .ensemble import is_ensemble

    if path.is_file() and is_ensemble(path):
        return describe_ensemble(path)
    if path.is_file():
        return describe_checkpoint(path)
    raise InfoError(f"{path}: not a checkpoint, ensemble file, bundle (manifest.json or ensemble.json) or "
                    "gallery (gallery.json, shards.json or ensemble-gallery.json)")


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


def describe_ensemble_dir(path: Path, record: str, describe_member) -> list[str]:
    """An ensemble bundle (``ensemble.json``) or gallery (``ensemble-gallery.json``): its record,
    then each member described as one model's."""
    from .runtime.engine.manifest import EnsembleGalleryMeta, EnsembleManifest

    if record == EnsembleManifest.FILE:
        meta = EnsembleManifest.load(path / record)
        folders = [m.bundle for m in meta.members]
        weights = ", ".join(f"{m.weight:g}" for m in meta.members)
        lines = [f"{path}: fbnet ensemble bundle of {len(folders)} members (weights {weights}; "
                 f"{meta.canvas} px canvas; exported {meta.created})"]
        if meta.trunk:
            shared = ", ".join(f"{folder} {n}" for folder, n in meta.trunk.modules.items())
            lines.append(f"shared trunk: {meta.trunk.reference}'s CNN once per photo; modules shared: {shared}")
    else:
        folders = EnsembleGalleryMeta.load(path / record).members
        lines = [f"{path}: fbnet ensemble gallery of {len(folders)} member galleries"]
    for folder in folders:
        lines += ["  " + line for line in describe_member(path / folder)]
    return lines


def _shape(spec) -> str:
    return f"{spec.name} {spec.dtype}[{', '.join(str(d) for d in spec.shape)}]"


def describe_bundle(path: Path) -> list[str]:
    from .runtime.engine.manifest import Manifest

    m = Manifest.load(path / Manifest.FILE)
    model = m.model
    lines = [f"{path}: fbnet bundle (format {m.format_version}, exported {m.created}, {m.precision}, opset {m.opset})",
             f"model: {model.name}, d={model.embed_dim}, levels {model.levels}, keys {' '.join(model.keys)}, "
             f"J={model.max_boxes}, max words {model.max_words}",
             f"canvas: {m.canvas} px; fusion weights: {', '.join(f'{k} {v}' for k, v in m.fusion.items())}",
             f"validation: {_metrics(m.validation_metrics)}"]
    for name, spec in m.graphs.items():
        lines.append(f"graph {name}: {spec.file}; in {'; '.join(map(_shape, spec.inputs))}; "
                     f"out {'; '.join(map(_shape, spec.outputs))}")
    if m.quantization:
        lines.append(f"int8: {', '.join(m.quantization.get('graphs', []))}")
    lines.append(f"engines: {m.engines.status}" + (f" ({', '.join(m.engines.files)})" if m.engines.files else ""))
    states = {name: ("missing" if not (path / name).is_file() else
                     "ok" if sha256(path / name) == digest else "altered") for name, digest in m.files.items()}
    bad = [f"{n} {st}" for n, st in states.items() if st != "ok"]
    lines.append(f"sha256: {len(states) - len(bad)} of {len(states)} files as exported"
                 + (f"; {', '.join(bad)}" if bad else ""))
    if m.source_checkpoint:
        lines.append(f"checkpoint: {m.source_checkpoint.get('path')}")
    return lines


def describe_gallery(path: Path) -> list[str]:
    from .runtime.engine.manifest import GalleryMeta, ShardsMeta

    if (path / ShardsMeta.FILE).is_file():
        meta = ShardsMeta.load(path / ShardsMeta.FILE)
        images, captions = sum(s.images for s in meta.shards), sum(s.captions for s in meta.shards)
        head = (f"{path}: sharded fbnet gallery, {len(meta.shards)} shards of up to {meta.shard_size}; "
                f"{images} images, {captions} captions")
        lines = [head] + [f"shard {s.path}: {s.images} images, {s.captions} captions" for s in meta.shards]
    else:
        meta = GalleryMeta.load(path / GalleryMeta.FILE)
        lines = [f"{path}: fbnet gallery, {meta.n_images} images, {meta.n_captions} captions",
                 f"store: {meta.store} (arrays {meta.dtype}); keys {' '.join(meta.keys)}",
                 f"first stage: {', '.join(f'{k} {v}' for k, v in meta.first_stage.items()) or 'exact, built on load'}"]
    lines.append(f"format {meta.format_version}; made by encoders "
                 + (", ".join(f"{k} {v[:12]}" for k, v in meta.encoders.items()) if meta.encoders
                    else f"of the bundle whose manifest.json has sha256 {meta.bundle}"))
    return lines
