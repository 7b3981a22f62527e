"""Word dropout: the text side of VSE-infinity's size augmentation (Chen et al., CVPR 2021).

VSE-infinity varies the size of the sets its GPO pools by dropping about 20% of the regions and
words of each training pair at every step, so that the pooling does not learn one set size. This is
the word half, reconstructed for a Bi-GRU over word2vec ids: each word of a caption is removed
with probability ``rate`` (VSE-infinity also masks or replaces some words for its BERT encoder;
a GRU has no mask token, so words are only removed), the kept words stay in order and at least
one word stays. The overlapped text windows (eq. 4) are then laid over the shorter caption.
Training only (``train.word_dropout``); validation, evaluation and export see whole captions.
"""

from __future__ import annotations

import numpy as np


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
