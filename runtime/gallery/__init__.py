"""Galleries: images and captions encoded once (:mod:`.build`), stored plainly or as FAISS codes
(:mod:`.stores`), their names as line files (:mod:`.items`), a first-stage index saved with them
(:mod:`.first_stage`), opened whole, as shards or per ensemble member (:mod:`.gallery`,
:mod:`.shards`, :mod:`.ensemble`; :func:`open_gallery` opens any), indexed on Ray
(:mod:`.ray_index`). Imports the engine layer only."""

from __future__ import annotations

from pathlib import Path

from ..engine.bundle import Bundle
from ..engine.ensemble import EnsembleBundle
from ..engine.manifest import EnsembleGalleryMeta, GalleryError
from .ensemble import EnsembleGallery
from .gallery import Gallery
from .shards import ShardedGallery, open_model_gallery


def open_gallery(root: str | Path, bundle: Bundle | EnsembleBundle) -> Gallery | ShardedGallery | EnsembleGallery:
    """A gallery directory (one, sharded, or an ensemble's), checked against the bundle that will
    search it: an ensemble's gallery needs its ensemble bundle, and the reverse."""
    ensemble_gallery = (Path(root) / EnsembleGalleryMeta.FILE).is_file()
    ensemble_bundle = isinstance(bundle, EnsembleBundle)
    if ensemble_gallery and not ensemble_bundle:
        raise GalleryError(f"{root}: an ensemble's gallery: search it with its ensemble bundle, not {bundle.root}")
    if ensemble_bundle and not ensemble_gallery:
        raise GalleryError(f"{root}: one model's gallery: an ensemble bundle {bundle.root} cannot search it; "
                           "index it with the ensemble bundle")
    return EnsembleGallery(root, bundle) if ensemble_gallery else open_model_gallery(root, bundle)
