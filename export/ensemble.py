"""``fbnet export ENSEMBLE.yaml``: an ensemble file (:mod:`fbnet.ensemble`) as an ensemble bundle.

Every member checkpoint is exported as a whole bundle (:func:`~.bundle.export_bundle`, with its own
export check) into ``member<i>/``, and ``ensemble.json`` records the members' folders, weights and
manifest sha256 (the layout of :mod:`fbnet.runtime.engine.ensemble`), and the shared trunk's graphs
where members compute MobileNetV2's first modules alike (:mod:`.trunk`). The directory is built beside
its target and renamed into place.
"""

from __future__ import annotations

import time
from pathlib import Path

from fbnet.atomic import atomic_dir
from fbnet.ensemble import load_ensemble
from fbnet.runtime.engine.bundle import sha256
from fbnet.runtime.engine.ensemble import member_folder
from fbnet.runtime.engine.manifest import EnsembleManifest, EnsembleMember, Manifest

from .bundle import export_bundle
from .onnx_export import DEFAULT_OPSET
from .trunk import export_trunk


def export_ensemble_bundle(ensemble_path: str | Path, out: str | Path, log=print, **options) -> Path:
    """Export every member of the ensemble file into one ensemble bundle, with the CNN modules its
    members compute alike as one graph (:mod:`.trunk`); ``options`` go to
    :func:`~.bundle.export_bundle` (``fp16``, ``opset``)."""
    ensemble = load_ensemble(ensemble_path)  # every member readable, all on one canvas
    out = Path(out)
    with atomic_dir(out) as tmp:
        for i, m in enumerate(ensemble.members):
            log(f"member {i}: {m.checkpoint} (weight {m.weight:g})")
            export_bundle(m.checkpoint, tmp / member_folder(i), log=log, **options)
        members = [EnsembleMember(member_folder(i), m.weight, sha256(tmp / member_folder(i) / Manifest.FILE))
                   for i, m in enumerate(ensemble.members)]
        trunk = export_trunk([m.checkpoint for m in ensemble.members], tmp, options.get("opset", DEFAULT_OPSET), log)
        EnsembleManifest(members=members, canvas=Manifest.load(tmp / member_folder(0) / Manifest.FILE).canvas,
                         created=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                         source={"path": str(Path(ensemble_path).resolve()), "sha256": sha256(Path(ensemble_path))},
                         trunk=trunk).save(tmp / EnsembleManifest.FILE)
    return out


def member_dirs(root: Path) -> list[Path]:
    """The member bundles of the ensemble bundle ``root``."""
    return [root / m.bundle for m in EnsembleManifest.load(root / EnsembleManifest.FILE).members]


def record_members(root: Path) -> EnsembleManifest:
    """Record the member bundles' manifest sha256 again in ``root``'s ensemble.json, after a step
    that rewrote them (INT8 graphs, TensorRT engines)."""
    path = root / EnsembleManifest.FILE
    manifest = EnsembleManifest.load(path)
    for m in manifest.members:
        m.manifest_sha256 = sha256(root / m.bundle / Manifest.FILE)
    manifest.save(path)
    return manifest
