"""Size augmentation (VSE-infinity, Chen et al., CVPR 2021), reconstructed for FB-Net.

VSE-infinity varies the size of the sets its GPO pools by dropping about 20% of the regions and
words of each training pair at every step, so that the pooling does not learn one set size.

* Words (:func:`drop_words`, ``train.word_dropout``), for a Bi-GRU over word2vec ids: each word of
  a caption is removed with probability ``rate`` (VSE-infinity also masks or replaces some words for its BERT
  encoder; a GRU has no mask token, so words are only removed), the kept words stay in order and
  at least one word stays. The overlapped text windows (eq. 4) are then laid over the shorter
  caption, and every branch reads it.
* Blocks (:func:`drop_units`, ``model.block_dropout``): the pooled global branch ``S^G`` pools each
  block of an image with probability ``1 - rate``. Only there: the windowed branches align fixed
  windows (eqs. 13-15), whose count is the level's, so dropping one would change what a level is.

Training only; validation, evaluation and export see whole captions and every block.
"""

from __future__ import annotations

import numpy as np
import torch


def drop_words(ids: np.ndarray, lengths: np.ndarray, rate: float,
               rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Padded ids ``(n, L)`` and lengths ``(n,)`` with each word removed with probability
    ``rate``; the kept words move left in order, the rest is padding (id 0), every caption keeps
    at least one word (a random one of its own when all were drawn)."""
    n, width = ids.shape
    words = np.arange(width)[None, :] < lengths[:, None]
    keep = words & (rng.random((n, width)) >= rate)
    empty = ~keep.any(axis=1)
    if empty.any():
        keep[np.flatnonzero(empty), rng.integers(lengths[empty])] = True
    order = np.argsort(~keep, axis=1, kind="stable")  # kept words first, in their order
    kept = keep.sum(axis=1)
    out = np.take_along_axis(ids, order, axis=1)
    out[np.arange(width)[None, :] >= kept[:, None]] = 0
    return out, kept.astype(lengths.dtype)


def drop_units(mask: torch.Tensor, rate: float) -> torch.Tensor:
    """A set mask ``(N, K)`` with each real unit dropped with probability ``rate`` (torch's
    generator, so a seeded run repeats); a set that would be empty keeps its first unit, which
    for ``S^G`` is B-Net's level-1 block, always real."""
    keep = mask.bool() & (torch.rand(mask.shape, device=mask.device) >= rate)
    keep[:, 0] |= ~keep.any(dim=1)
    return keep.to(mask.dtype)
