"""Overlapped sliding windows of the multi-scale semantic scan (torch-free).

Image windows, eqs. (8)-(9): at level ``u`` the scale is ``x = (u + 1) / 2``; a window is
``ceil(w / x)`` by ``ceil(h / x)`` and moves by ``w / (2x)`` and ``h / (2x)``, so each side holds
``u`` half-overlapping windows and the level has ``u**2`` blocks (1, 4, 9 for levels 1-3).

Text windows, eqs. (11)-(12), use the same half-overlap rule in one dimension with ``N = u**2``
windows (see :func:`span_starts`); the batched torch form lives in ``fbnet.models.text``.

B-Net scans the whole image; F-Net scans each detected box. Both are expressed as lists of
boxes ``(x1, y1, x2, y2)`` in canvas pixels, which the block encoder crops or RoI-pools.
"""

from __future__ import annotations

import math

import numpy as np

def blocks_per_level(level: int) -> int:
    """Blocks at one level: ``u**2`` (1, 4, 9 for levels 1-3)."""
    return level * level


def blocks_upto(levels: int) -> int:
    """Blocks in levels 1..levels of one region (1 + 4 + 9 = 14 for three levels)."""
    return sum(blocks_per_level(u) for u in range(1, levels + 1))


def span_starts(length: float, n: int) -> tuple[np.ndarray, float]:
    """Starts and size of ``n`` half-overlapping windows over ``[0, length)`` (eqs. 8-9, 1-D).

    With ``x = (n + 1) / 2`` the window is ``length / x = 2 length / (n + 1)`` long and moves by
    ``length / (2x) = length / (n + 1)``; the last window ends exactly at ``length``.
    """
    step = length / (n + 1)
    size = 2.0 * step
    return np.arange(n, dtype=np.float64) * step, size


def level_boxes(box: tuple[float, float, float, float], level: int) -> np.ndarray:
    """The ``level**2`` window boxes of level ``level`` inside ``box``, row-major, float32 (k, 4)."""
    if level < 1:
        raise ValueError(f"level must be >= 1, got {level}")
    x1, y1, x2, y2 = (float(v) for v in box)
    w, h = x2 - x1, y2 - y1
    if w <= 0 or h <= 0:
        raise ValueError(f"empty box {box}")
    xs, ww = span_starts(w, level)
    ys, hh = span_starts(h, level)
    # Eq. (9) rounds the window up to whole pixels on a real image; keep it inside the box.
    ww = min(math.ceil(ww - 1e-6), w) if w >= 1 else ww
    hh = min(math.ceil(hh - 1e-6), h) if h >= 1 else hh
    out = np.empty((level * level, 4), dtype=np.float32)
    for r, y in enumerate(ys):
        for c, x in enumerate(xs):
            bx1 = min(x1 + x, x2 - ww)
            by1 = min(y1 + y, y2 - hh)
            out[r * level + c] = (bx1, by1, bx1 + ww, by1 + hh)
    return out


def region_blocks(box: tuple[float, float, float, float], levels: int) -> np.ndarray:
    """All window boxes of levels 1..levels inside ``box``, level by level: (blocks_upto, 4)."""
    return np.concatenate([level_boxes(box, u) for u in range(1, levels + 1)], axis=0)


def level_slices(levels: int) -> list[slice]:
    """Where each level's blocks sit in the output of :func:`region_blocks`."""
    out, start = [], 0
    for u in range(1, levels + 1):
        out.append(slice(start, start + blocks_per_level(u)))
        start += blocks_per_level(u)
    return out


def branch_blocks(
    image_size: int, boxes: np.ndarray, levels: int, max_boxes: int, min_side: float = 4.0
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Block boxes of both branches for one image on a square ``image_size`` canvas.

    Returns ``(background, foreground, mask)``: background ``(B, 4)`` with ``B = blocks_upto``;
    foreground ``(J, B, 4)`` for ``J = max_boxes`` detected boxes (padded by repeating the
    whole image); ``mask`` ``(J,)`` marks real boxes. When no box is found the whole image
    stands in, so F-Net is never empty. Boxes thinner than ``min_side`` pixels are widened about
    their centre so every block has at least one pixel.
    """
    full = (0.0, 0.0, float(image_size), float(image_size))
    background = region_blocks(full, levels)
    chosen = [_widen(b, min_side, image_size) for b in np.asarray(boxes, dtype=np.float64)[:max_boxes]]
    mask = np.zeros(max_boxes, dtype=bool)
    mask[: len(chosen)] = True
    if not chosen:
        chosen, mask[0] = [full], True
    # padded slots repeat the whole image's blocks: B-Net's, laid once
    foreground = np.stack([region_blocks(b, levels) for b in chosen] + [background] * (max_boxes - len(chosen)))
    return background, foreground, mask


def _widen(box, min_side: float, limit: float):
    x1, y1, x2, y2 = (float(v) for v in box[:4])
    x1, y1 = max(0.0, x1), max(0.0, y1)
    x2, y2 = min(limit, x2), min(limit, y2)
    for lo, hi, idx in ((x1, x2, 0), (y1, y2, 1)):
        if hi - lo < min_side:
            c = min(max((lo + hi) / 2, min_side / 2), limit - min_side / 2)
            lo, hi = c - min_side / 2, c + min_side / 2
        if idx == 0:
            x1, x2 = lo, hi
        else:
            y1, y2 = lo, hi
    return (x1, y1, x2, y2)


def image_block_boxes(image_size: int, boxes: np.ndarray, scores: np.ndarray, levels: int,
                      max_boxes: int) -> tuple[np.ndarray, np.ndarray]:
    """Every block box of one image, B-Net first then F-Net box by box: ``((1 + J) * B, 4)``,
    and the F-Net box mask ``(J,)``. Detections with score 0 are padding and are dropped."""
    bg, fg, mask = branch_blocks(image_size, np.asarray(boxes)[np.asarray(scores) > 0], levels, max_boxes)
    return np.concatenate([bg[None], fg], axis=0).reshape(-1, 4), mask


# Encoded units (blocks, text windows, words) are unit vectors and padding is zeros: a unit is
# real when its squared norm exceeds this (the torch scorer's word mask and the runtime's word cut).
REAL_UNIT_MIN_SQNORM = 0.25
