"""The feature types every layer passes around: image block embeddings and caption window (or
word) embeddings, per key (``B1`` ... ``F3``), with the helpers that cut and gather them."""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np

from fbnet.windows import REAL_UNIT_MIN_SQNORM


@dataclass
class ImageFeatures:
    """Block embeddings per key (``B1`` ... ``F3``): ``(N, K, d)``; F-Net box mask ``(N, J)``."""

    blocks: dict[str, np.ndarray]
    fg_mask: np.ndarray

    def __len__(self) -> int:
        return len(self.fg_mask)

    def take(self, index) -> ImageFeatures:
        """Rows ``index``: gathered when read, so that re-ranking a shortlist copies each of its rows
        once, cut to the box slots it uses (:class:`ImageRows`)."""
        return ImageRows(self, row_index(index, len(self)))

    def box_groups(self, captions: int = 1, call_cost: int = 0) -> list[tuple[np.ndarray, int]]:
        """``(rows, box count)`` by ascending box count (real boxes come first in ``fg_mask``): one
        group per count present, except that a group is merged into the next (its rows padded to
        that count) while the padded box slots this adds, ``rows x extra boxes x captions``, cost no
        more than ``call_cost`` (the box slots one scorer call's fixed cost is worth)."""
        counts = np.asarray(self.fg_mask, dtype=np.float32).sum(axis=1).astype(np.int64)
        groups: list[tuple[np.ndarray, int]] = []
        for n in np.unique(counts):
            rows, boxes = np.flatnonzero(counts == n), max(1, int(n))
            if groups and len(groups[-1][0]) * (boxes - groups[-1][1]) * captions <= call_cost:
                rows = np.concatenate([groups.pop()[0], rows])
            groups.append((rows, boxes))
        return groups

    def cut_boxes(self, n: int) -> ImageFeatures:
        """The first ``n`` box slots only: F-Net level u keeps ``n u**2`` blocks."""
        return ImageFeatures({k: v[:, : box_width(k, n)] for k, v in self.blocks.items()}, self.fg_mask[:, :n])

    def pad_boxes(self, n: int) -> ImageFeatures:
        """Padded with empty box slots to ``n`` (the inverse of :meth:`cut_boxes`): zero blocks,
        mask 0. Itself when it has ``n`` slots already."""
        extra = n - self.fg_mask.shape[1]
        if extra <= 0:
            return self

        def pad(a: np.ndarray, width: int) -> np.ndarray:
            return np.concatenate([a, np.zeros((a.shape[0], width, *a.shape[2:]), a.dtype)], axis=1)

        return ImageFeatures({k: pad(v, box_width(k, extra)) if k.startswith("F") else v
                              for k, v in self.blocks.items()}, pad(self.fg_mask, extra))

    def group_feeds(self, rows, n: int) -> dict[str, np.ndarray]:
        """The scorer's image inputs for ``rows`` cut to ``n`` box slots, float32: each array is
        gathered once, its padded slots past ``n`` never copied."""
        return {"fg_mask": as_float32(self.fg_mask[rows, :n]),
                **{f"blocks_{k}": as_float32(v[rows, : box_width(k, n)]) for k, v in self.blocks.items()}}


class ImageRows(ImageFeatures):
    """Rows ``index`` of ``source`` without copying them yet. A take of a take composes the indices,
    and :meth:`group_feeds` reads each array once at the composed rows and the box slots the scorer
    needs. Gathering a shortlist's rows in full (every padded box slot) and then again for each
    box-count group cost 3.5x a lone query's gather per query in a batch of 8 (BENCHMARKS "Serving
    under load"). ``blocks`` gathers every key's rows once, on first read."""

    def __init__(self, source: ImageFeatures, index: np.ndarray):
        self.source, self.index = source, index
        self.fg_mask = source.fg_mask[index]

    @functools.cached_property
    def blocks(self) -> dict[str, np.ndarray]:
        return {k: v[self.index] for k, v in self.source.blocks.items()}

    def take(self, index) -> ImageRows:
        return ImageRows(self.source, self.index[index])

    def group_feeds(self, rows, n: int) -> dict[str, np.ndarray]:
        return self.source.group_feeds(self.index[rows], n)


def row_index(index, n: int) -> np.ndarray:
    """``index`` (a slice, an int, ints or a boolean mask over ``n`` rows) as row numbers, without
    building ``arange(n)``: at a million items that is 8 MB per array per query."""
    if isinstance(index, slice):
        return np.arange(*index.indices(n))
    rows = np.asarray(index)
    if rows.dtype == bool:
        return np.flatnonzero(rows)
    return np.where(rows < 0, rows + n, rows).astype(np.int64, copy=False)


def box_width(key: str, n: int) -> int | None:
    """Units of ``key`` that ``n`` box slots hold: ``n u**2`` for F-Net level u, all (None) for B-Net."""
    return n * int(key[1:]) ** 2 if key.startswith("F") else None


def as_float32(a) -> np.ndarray:
    """``a`` as a contiguous float32 array (no copy if it already is one): what the graphs take."""
    return np.ascontiguousarray(a, dtype=np.float32)


@dataclass
class TextFeatures:
    """Text-window embeddings per key: ``(N, u**2, d)`` (FB-Net), or word embeddings ``(N, L, d)``
    for a region-word model's word keys, zero past each caption's words."""

    windows: dict[str, np.ndarray]

    def __len__(self) -> int:
        return len(next(iter(self.windows.values())))

    def take(self, index) -> TextFeatures:
        return TextFeatures({k: v[index] for k, v in self.windows.items()})


def real_units(units: np.ndarray) -> np.ndarray:
    """Units per row that are real (unit vectors; padding is zeros, always last): ``(N,)``."""
    return (np.einsum("nkd,nkd->nk", units, units) > REAL_UNIT_MIN_SQNORM).sum(axis=1)


def concat_images(parts: list[ImageFeatures]) -> ImageFeatures:
    return ImageFeatures({k: np.concatenate([p.blocks[k] for p in parts]) for k in parts[0].blocks},
                         np.concatenate([p.fg_mask for p in parts]))


@dataclass
class MemberFeatures:
    """An ensemble's features of the same images (or captions): one :class:`ImageFeatures` (or
    :class:`TextFeatures`) per member, each from that member's own encoders. The first member's
    (``lead``) give the first stage of two-stage search."""

    members: list

    def __len__(self) -> int:
        return len(self.members[0])

    @property
    def lead(self):
        return self.members[0]

    def take(self, index) -> MemberFeatures:
        return MemberFeatures([m.take(index) for m in self.members])
