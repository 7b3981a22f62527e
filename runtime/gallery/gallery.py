"""On-disk galleries: images and captions encoded once, memory-mapped at query time.

::

    GALLERY/
      gallery.json                 the encoders that made it, dtype, store, counts (GalleryMeta)
      items/images.jsonl           image paths, one JSON string a line (+ images.offsets.npy)
      items/captions.jsonl         captions likewise (read on demand: fbnet.runtime.gallery.items)
      images/<key>.npy             (N_images, K, d) block embeddings per key (B1 ... F3)
      images/fg_mask.npy           (N_images, J)
      texts/<key>.npy              (N_captions, u**2, d) window embeddings per key (word keys: max_words)
      images/first_stage.faiss     large galleries: the first-stage IVF index (texts/ likewise)

:mod:`fbnet.runtime.gallery.build` writes one; :class:`Gallery` opens it. ``gallery.json`` is a
:class:`~fbnet.runtime.engine.manifest.GalleryMeta`: it records the identity of the encoders that
made the vectors, and a bundle with other encoders is refused (a re-export of the same checkpoint,
or one with engines added, is not another).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..engine.bundle import Bundle
from ..engine.features import ImageFeatures, TextFeatures
from ..engine.manifest import GalleryError, GalleryMeta
from .first_stage import INDEX_FILE, FirstStage, recorded_first_stage_key
from .items import ItemList, ItemsError
from .stores import CodedBlocks, StoreError, map_rows

#: Where a gallery keeps its item names (image paths, captions): line files, read on demand.
ITEMS_DIR = "items"
__all__ = ["ITEMS_DIR", "Gallery", "GalleryError", "load_features"]


class Gallery:
    def __init__(self, root: str | Path, bundle: Bundle):
        root = Path(root)
        meta_path = root / GalleryMeta.FILE
        if not meta_path.is_file():
            partial = root.with_name(root.name + ".partial")
            hint = f"; an interrupted index is in {partial}, run index again to resume" if partial.exists() else ""
            raise GalleryError(f"{meta_path}: missing; is {root} a gallery made by `fbnet-serve-cli index`?{hint}")
        meta = GalleryMeta.load(meta_path)
        meta.check_bundle(bundle.identity, bundle.manifest_sha256, meta_path, bundle.root)
        if list(meta.keys) != bundle.keys:
            raise GalleryError(f"{meta_path}: keys {meta.keys} are not the bundle's {bundle.keys}")
        self.root, self.meta = root, meta
        try:
            self.images, self.captions = (
                ItemList(root / meta.items, side, getattr(meta, f"n_{side}")) if meta.items else getattr(meta, side)
                for side in ("images", "captions"))  # galleries before line files list them in gallery.json
        except ItemsError as exc:
            raise GalleryError(str(exc)) from None
        try:
            self.image_features = load_features(root, "images", meta.keys, meta.coded) if self.images else None
            self.text_features = load_features(root, "texts", meta.keys, meta.coded) if self.captions else None
        except StoreError as exc:
            raise GalleryError(str(exc)) from None
        for side, feats, n in (("images", self.image_features, len(self.images)),
                               ("texts", self.text_features, len(self.captions))):
            arrays = {} if feats is None else feats.blocks if side == "images" else feats.windows
            for key, array in arrays.items():
                if len(array) != n:
                    raise GalleryError(f"{root / side / key}: holds {len(array):,} rows, {meta_path} lists {n:,} "
                                       "items (mixed or damaged files); re-run `fbnet-serve-cli index`")

    @property
    def first_stage_key(self) -> str:
        """The key whose vectors the first stage ranks (queries are pooled from the same key)."""
        return recorded_first_stage_key(self.meta)

    def first_stage(self, side: str) -> FirstStage | None:
        """The first-stage index saved for ``side`` (``images`` or ``texts``), or None when the
        side is searched exactly (the searcher then builds a flat index itself)."""
        spec = self.meta.first_stage.get(side, "Flat")
        if spec == "Flat":
            return None
        count = len(self.images if side == "images" else self.captions)
        return FirstStage.load(self.root / side / INDEX_FILE, count, spec)


def load_features(root: Path, side: str, keys: list[str], coded: dict | None = None):
    """A side's arrays, memory-mapped, or decoded on demand for a coded store (None when the side
    is empty)."""
    coded = (coded or {}).get(side, {})
    if not isinstance(coded, dict):
        raise GalleryError(f"{root / GalleryMeta.FILE}: malformed coded.{side} (not a mapping)")
    for k, entry in coded.items():
        if not isinstance(entry, dict) or not isinstance(entry.get("shape"), list):
            raise GalleryError(f"{root / GalleryMeta.FILE}: malformed coded.{side}.{k} (no shape list)")
    load = lambda k: CodedBlocks(root / side, k, coded[k]["shape"]) if k in coded else \
        _array(root / side / f"{k}.npy")  # noqa: E731
    if side == "images":
        if not (root / "images" / "fg_mask.npy").is_file():
            return None
        return ImageFeatures({k: load(k) for k in keys}, _array(root / "images" / "fg_mask.npy"))
    if not coded and not (root / "texts" / f"{keys[0]}.npy").is_file():
        return None
    return TextFeatures({k: load(k) for k in keys})


def _array(path: Path) -> np.ndarray:
    """A gallery array, memory-mapped; a missing or truncated file is a :class:`GalleryError` naming it."""
    try:
        return map_rows(path)
    except (OSError, ValueError) as exc:
        reason = "missing" if isinstance(exc, FileNotFoundError) else f"unreadable ({exc})"
        raise GalleryError(f"{path}: {reason}; re-run `fbnet-serve-cli index`") from None
