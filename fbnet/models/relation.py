"""Building blocks of the related region-grid models (DSRLN, RGF, SFE): attention with a
geometry bias or a mask, the adaptive gate, one joint-graph step, and the spatial relations
(overlap, adjacency) they are built from.

The sources (``../shared/papers/001``, ``003``, ``004``) are abstracts: they name these modules
but give no equations. Each block here is a reconstruction in the style the abstract points to,
and says so:

* :func:`box_geometry` + :class:`GeometryAttention` (DSRLN's GISA): self-attention whose logits
  gain a geometry term from the boxes' relative positions and sizes, as relation networks do
  (Hu et al., CVPR 2018, eq. 5: ``w_mn = w^A_mn + log(max(0, W_G E_G(f_m, f_n)))`` with the
  displacement ``(log|dx|/w, log|dy|/h, log w'/w, log h'/h)`` embedded sinusoidally);
* :func:`attend` with a mask (DSRLN's masked cross-attention: a region sees the grid cells its
  box overlaps; RGF's cross-attention has no mask);
* :class:`Gate` (DSRLN's adaptive gate, RGF's gated fusion): ``g = sigmoid(W [x; y] + b)``,
  ``g * x + (1 - g) * y``;
* :class:`GraphStep` (RGF's joint graph): ``h' = LayerNorm(h + ReLU(W D^-1 A h))`` over an
  adjacency ``A`` with self-loops (a GCN step, Kipf & Welling 2017, row-normalised).
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..windows import level_boxes

#: Logit of a masked pair (finite, so a row with nothing to attend to gives no NaN in any runtime).
MASKED = -1e9


def unit(x: torch.Tensor) -> torch.Tensor:
    return F.normalize(x, dim=-1)


def identity(n: int, device=None) -> torch.Tensor:
    """``(n, n)`` bool identity, built from ``arange`` (ONNX Runtime has no boolean EyeLike)."""
    i = torch.arange(n, device=device)
    return i[:, None] == i[None, :]


def grid_boxes(image_size: int, level: int) -> torch.Tensor:
    """The ``level**2`` grid cells (B-Net's level-``level`` blocks) as fractions of the canvas ``(G, 4)``."""
    return torch.from_numpy(level_boxes((0, 0, image_size, image_size), level) / np.float32(image_size))


def overlaps(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Whether boxes overlap with positive area: ``a (..., n, 4)`` x ``b (..., m, 4)`` -> ``(..., n, m)``."""
    a, b = a.unsqueeze(-2), b.unsqueeze(-3)
    w = torch.minimum(a[..., 2], b[..., 2]) - torch.maximum(a[..., 0], b[..., 0])
    h = torch.minimum(a[..., 3], b[..., 3]) - torch.maximum(a[..., 1], b[..., 1])
    return (w > 0) & (h > 0)


def box_geometry(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Relation networks' displacement of box n as seen from box m: ``(..., n, m, 4)`` =
    ``(log(|cx_m - cx_n| / w_m), log(|cy_m - cy_n| / h_m), log(w_n / w_m), log(h_n / h_m))``."""
    def centre_size(x):
        w, h = (x[..., 2] - x[..., 0]).clamp(min=1e-3), (x[..., 3] - x[..., 1]).clamp(min=1e-3)
        return x[..., 0] + w / 2, x[..., 1] + h / 2, w, h

    cxa, cya, wa, ha = (t.unsqueeze(-1) for t in centre_size(a))
    cxb, cyb, wb, hb = (t.unsqueeze(-2) for t in centre_size(b))
    return torch.stack([torch.log(((cxa - cxb).abs() / wa).clamp(min=1e-3)),
                        torch.log(((cya - cyb).abs() / ha).clamp(min=1e-3)),
                        torch.log(wb / wa), torch.log(hb / ha)], dim=-1)


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, bias: torch.Tensor | None = None,
           mask: torch.Tensor | None = None) -> torch.Tensor:
    """Multi-head scaled dot-product attention ``(N, Lq, d)`` (projections are the caller's):
    logits ``q k^T / sqrt(d_h)`` plus ``bias (N, H, Lq, Lk)``; ``mask (N, Lq, Lk)`` True where a
    query may attend. A query with nothing to attend to gets zeros."""
    n, lq, d = q.shape
    lk, dh = k.shape[1], d // heads
    split = lambda x, length: x.reshape(n, length, heads, dh).transpose(1, 2)  # noqa: E731
    logits = torch.matmul(split(q, lq), split(k, lk).transpose(2, 3)) / math.sqrt(dh)  # (N, H, Lq, Lk)
    if bias is not None:
        logits = logits + bias
    if mask is not None:
        logits = logits.masked_fill(~mask[:, None], MASKED)
    out = torch.matmul(torch.softmax(logits, dim=-1), split(v, lk)).transpose(1, 2).reshape(n, lq, d)
    if mask is not None:
        out = out * mask.any(dim=-1, keepdim=True).to(out.dtype)
    return out


class AttentionLayer(nn.Module):
    """``x' = LayerNorm(x + W_o attend(W_q x, W_k y, W_v y))``: self-attention when ``y`` is ``x``."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.q, self.k, self.v, self.o = (nn.Linear(dim, dim) for _ in range(4))
        self.norm = nn.LayerNorm(dim)

    def attended(self, x, y, bias=None, mask=None) -> torch.Tensor:
        """``W_o attend(...)`` alone (what a gate fuses)."""
        return self.o(attend(self.q(x), self.k(y), self.v(y), self.heads, bias, mask))

    def forward(self, x, y, bias=None, mask=None) -> torch.Tensor:
        return self.norm(x + self.attended(x, y, bias, mask))


class GeometryAttention(nn.Module):
    """DSRLN's GISA (reconstruction): self-attention over the regions whose logits gain, per head,
    ``log(max(eps, ReLU(W_G E_G(geometry))))`` from :func:`box_geometry` (relation networks); padded
    regions are neither queries nor keys."""

    def __init__(self, dim: int, heads: int, frequencies: int = 4):
        super().__init__()
        self.layer = AttentionLayer(dim, heads)
        self.register_buffer("freq", 100.0 ** (-torch.arange(frequencies, dtype=torch.float32) / frequencies),
                             persistent=False)
        self.geometry = nn.Linear(8 * frequencies, heads)

    def bias(self, boxes: torch.Tensor) -> torch.Tensor:
        """``(N, H, J, J)`` geometry logits of every region pair."""
        angles = box_geometry(boxes, boxes).unsqueeze(-1) * self.freq * 100.0  # (N, J, J, 4, F)
        emb = torch.cat([angles.sin(), angles.cos()], dim=-1).flatten(-2)  # E_G: (N, J, J, 8F)
        return torch.log(F.relu(self.geometry(emb)).clamp(min=1e-6)).permute(0, 3, 1, 2)

    def forward(self, regions: torch.Tensor, boxes: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        real = mask > 0
        pairs = real[:, :, None] & real[:, None, :]
        return self.layer(regions, regions, self.bias(boxes), pairs) * mask[..., None]


class Gate(nn.Module):
    """Adaptive gate: ``g = sigmoid(W [x; y] + b)``, ``g * x + (1 - g) * y`` per dimension."""

    def __init__(self, dim: int):
        super().__init__()
        self.proj = nn.Linear(2 * dim, dim)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        g = torch.sigmoid(self.proj(torch.cat([x, y], dim=-1)))
        return g * x + (1 - g) * y


class GraphStep(nn.Module):
    """One message-passing step over a graph ``adjacency (N, n, n)`` (bool, True = edge; self-loops added):
    ``h' = LayerNorm(h + ReLU(W D^-1 A h))``."""

    def __init__(self, dim: int):
        super().__init__()
        self.proj = nn.Linear(dim, dim)
        self.norm = nn.LayerNorm(dim)

    def forward(self, h: torch.Tensor, adjacency: torch.Tensor) -> torch.Tensor:
        a = (adjacency | identity(h.shape[1], h.device)).to(h.dtype)
        messages = torch.matmul(a, h) / a.sum(dim=-1, keepdim=True)
        return self.norm(h + F.relu(self.proj(messages)))
