"""Sharded galleries: several gallery directories searched as one.

::

    GALLERY/
      shards.json            the encoders that made it, the shards in order, their item counts (ShardsMeta)
      shard-00000/           a complete gallery (``gallery.json``, ``images/``, ``texts/``)
      shard-00001/ ...

``fbnet-serve-cli index --shard-size N`` writes shard after shard, each built and renamed into
place on its own, so an interrupted job resumes at the first missing shard; ``shards.json`` is
written last. Item ``i`` of the sharded gallery is item ``i - start`` of the shard whose range
holds it. Searching concatenates the shards' features lazily (:class:`ConcatRows`: a query reads
only the rows it re-ranks) and merges the shards' first stages (:class:`MergedStage`), so two-stage
search returns what one gallery holding the same items returns.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..engine.bundle import Bundle
from ..engine.features import ImageFeatures, TextFeatures
from ..engine.manifest import GalleryMeta, ShardEntry, ShardsMeta
from .build import build_gallery, gallery_meta
from .first_stage import FirstStage
from .gallery import Gallery, GalleryError
from .items import list_index
from .stores import LazyRows

SHARDS_FILE = ShardsMeta.FILE


class ConcatRows(LazyRows):
    """Row-wise concatenation of arrays (memory maps, coded blocks) without copying them."""

    def __init__(self, parts: list):
        self.parts = parts
        self.starts = np.concatenate([[0], np.cumsum([len(p) for p in parts])]).astype(np.int64)
        self.shape = (int(self.starts[-1]), *parts[0].shape[1:])
        self.dtype = parts[0].dtype

    def _take(self, rows: np.ndarray) -> np.ndarray:
        shard = np.searchsorted(self.starts, rows, side="right") - 1
        out = np.empty((len(rows), *self.shape[1:]), self.dtype)
        for s in np.unique(shard):
            sel = shard == s
            out[sel] = self.parts[s][rows[sel] - self.starts[s]]
        return out

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        out = np.concatenate([np.asarray(p) for p in self.parts])
        return out if dtype is None else out.astype(dtype)


class MergedStage:
    """The shards' first stages as one: each shard's top k, ids offset by the shard's start, merged
    by score (ties by gallery order, as one flat index orders them)."""

    def __init__(self, stages: list[FirstStage], starts: np.ndarray):
        self.stages, self.starts = stages, starts

    @property
    def backend(self) -> str:
        return f"{len(self.stages)} shards of {self.stages[0].backend}"

    def __len__(self) -> int:
        return int(sum(len(s) for s in self.stages))

    def top(self, queries: np.ndarray, k: int, nprobe: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        scores, ids = [], []
        for stage, start in zip(self.stages, self.starts):
            s, i = stage.top(queries, k, nprobe)
            scores.append(s)
            ids.append(np.where(i >= 0, i + start, -1))
        scores, ids = np.concatenate(scores, axis=1), np.concatenate(ids, axis=1)
        scores = np.where(ids >= 0, scores, -np.inf)
        order = np.lexsort((ids, -scores), axis=1)[:, : min(k, len(self))]
        return np.take_along_axis(scores, order, axis=1), np.take_along_axis(ids, order, axis=1)


class ConcatList:
    """Item names (image paths or captions) of several shards, indexed as one list."""

    def __init__(self, parts: list[list[str]]):
        self.parts = parts
        self.starts = np.concatenate([[0], np.cumsum([len(p) for p in parts])]).astype(np.int64)

    def __len__(self) -> int:
        return int(self.starts[-1])

    def __getitem__(self, i: int) -> str:
        i = list_index(i, len(self))
        s = int(np.searchsorted(self.starts, i, side="right") - 1)
        return self.parts[s][i - int(self.starts[s])]

    def __iter__(self):
        for p in self.parts:
            yield from p


class ShardedGallery:
    """The :class:`~fbnet.runtime.gallery.gallery.Gallery` interface over the shards listed in ``shards.json``."""

    def __init__(self, root: str | Path, bundle: Bundle):
        root = Path(root)
        path = root / SHARDS_FILE
        meta = ShardsMeta.load(path)
        meta.check_bundle(bundle.identity, bundle.manifest_sha256, path, bundle.root)
        self.root, self.meta = root, meta
        self.shards = []
        for entry in meta.shards:
            shard = Gallery(root / entry.path, bundle)
            if len(shard.images) != entry.images or len(shard.captions) != entry.captions:
                raise GalleryError(f"{root / entry.path}: holds {len(shard.images)} images and "
                                   f"{len(shard.captions)} captions, {path} lists {entry.images} and "
                                   f"{entry.captions} (a shard from another index job?)")
            self.shards.append(shard)
        stage_keys = sorted({s.first_stage_key for s in self.shards})
        if len(stage_keys) > 1:
            raise GalleryError(f"{path}: its shards' first stages rank different keys ({', '.join(stage_keys)}; "
                               "shards from index jobs of different fbnet versions?); re-run `fbnet-serve-cli index`")
        self.images = ConcatList([s.images for s in self.shards])
        self.captions = ConcatList([s.captions for s in self.shards])
        self.image_features = self._concat("image_features")
        self.text_features = self._concat("text_features")

    def _concat(self, side: str):
        parts = [getattr(s, side) for s in self.shards if getattr(s, side) is not None]
        if not parts:
            return None
        if side == "image_features":
            return ImageFeatures({k: ConcatRows([p.blocks[k] for p in parts]) for k in parts[0].blocks},
                                 ConcatRows([p.fg_mask for p in parts]))
        return TextFeatures({k: ConcatRows([p.windows[k] for p in parts]) for k in parts[0].windows})

    @property
    def first_stage_key(self) -> str:
        """The shards' first-stage key (one index job: every shard's is the same)."""
        return self.shards[0].first_stage_key

    def first_stage(self, side: str) -> MergedStage | None:
        """The shards' saved first stages merged (None when they search exactly: the searcher then
        builds one flat index over all shards)."""
        with_items = [s for s in self.shards if len(s.images if side == "images" else s.captions)]
        stages = [s.first_stage(side) for s in with_items]
        if not stages or any(st is None for st in stages):
            return None
        counts = [len(s.images if side == "images" else s.captions) for s in with_items]
        return MergedStage(stages, np.concatenate([[0], np.cumsum(counts)[:-1]]))


@dataclass
class ShardJob:
    """One shard of an index job: its directory and items, and whether it is already built."""

    path: Path
    images: list
    captions: list[str]
    done: bool


def plan_shards(bundle: Bundle, images: list, captions: list[str], out: str | Path, shard_size: int) -> list[ShardJob]:
    """The shards of ``out`` for these items; a shard whose gallery holds exactly its items (made by
    this bundle's encoders) is done, so a resumed job skips it."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    jobs = []
    for i, lo in enumerate(range(0, max(len(images), len(captions), 1), shard_size)):
        part_images, part_captions = images[lo: lo + shard_size], captions[lo: lo + shard_size]
        path, want = out / f"shard-{i:05d}", gallery_meta(bundle, part_images, part_captions, "")
        jobs.append(ShardJob(path, part_images, part_captions, _built(path / GalleryMeta.FILE, want, bundle)))
    return jobs


def finish_shards(bundle: Bundle, out: str | Path, jobs: list[ShardJob], shard_size: int) -> Path:
    """Write ``shards.json`` once every shard is built (the last step of an index job)."""
    out = Path(out)
    missing = [str(j.path) for j in jobs if not (j.path / "gallery.json").is_file()]
    if missing:
        raise GalleryError(f"shards not built: {', '.join(missing)}; run the index job again to build them")
    ShardsMeta([ShardEntry(j.path.name, len(j.images), len(j.captions)) for j in jobs], shard_size,
               encoders=bundle.identity).save(out / SHARDS_FILE)
    return out


def build_sharded(retriever, images: list, captions: list[str], out: str | Path, shard_size: int, **options) -> Path:
    """Index ``images`` and ``captions`` into shards of ``shard_size`` images and captions each, in
    this process (:func:`~fbnet.runtime.gallery.build_gallery` per shard; finished shards are kept
    on resume). :func:`fbnet.runtime.gallery.ray_index.index_on_ray` builds the same shards on a Ray cluster."""
    jobs = plan_shards(retriever.bundle, images, captions, out, shard_size)
    for job in jobs:
        if not job.done:
            build_gallery(retriever, job.images, job.captions, job.path, **options)
    return finish_shards(retriever.bundle, out, jobs, shard_size)


def open_model_gallery(root: str | Path, bundle: Bundle) -> Gallery | ShardedGallery:
    """One model's gallery directory, sharded (``shards.json``) or not."""
    return ShardedGallery(root, bundle) if (Path(root) / SHARDS_FILE).is_file() else Gallery(root, bundle)


def _built(path: Path, want: GalleryMeta, bundle: Bundle) -> bool:
    """Whether the gallery.json ``path`` holds exactly ``want``'s items, made by this bundle's encoders."""
    if not path.is_file():
        return False
    try:
        meta = GalleryMeta.load(path)
    except GalleryError:  # damaged or foreign: build the shard again
        return False
    return meta.items_sha256 == want.items_sha256 and not meta.differs_from(bundle.identity, bundle.manifest_sha256)
