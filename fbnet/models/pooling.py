"""Pooling a variable-size set of unit features into one vector (FB-Net's global branch).

* ``gpo``: VSE-infinity's Generalized Pooling Operator (Chen, Deng, Pan, Liang, CVPR 2021,
  eqs. 3-5). Each dimension of the set is sorted in descending order, and the k-th largest value
  is weighted by ``theta_k``; the weights come from a sinusoidal positional encoding of ``k``
  read by a bidirectional GRU (hidden 32, the two directions averaged) and a linear map, masked
  to the set's size and normalised by a softmax at temperature 0.1::

      v = sum_k theta_k * sort_desc(x)_k,   theta = softmax(w^T BiGRU(PE(1..K)) / 0.1)

  So GPO learns anything from average pooling (equal weights) to max pooling (all weight on
  ``k = 1``), and the weights depend on the set's size (the backward GRU starts at its end).
* ``max`` and ``mean``: the two fixed ends of that range, for comparison.

Sets are padded to a common size with a mask ``(N, K)`` (1 for real units). Sorting exports to
ONNX as ``TopK`` over the whole axis, which TensorRT's parser supports.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .text import bidirectional_mean

#: GPO's positional-encoding size, GRU hidden size and softmax temperature (VSE-infinity's values)
PE_DIM, HIDDEN, TEMPERATURE = 32, 32, 0.1
#: what a padded unit is sorted as (below any real unit feature; finite, so 0 * it stays 0)
PAD_VALUE = -1e4


def positional_encoding(k: int, dim: int, device=None) -> torch.Tensor:
    """Sinusoidal encoding ``(k, dim)`` of positions 0..k-1 (Vaswani et al. 2017)."""
    pos = torch.arange(k, dtype=torch.float32, device=device).unsqueeze(1)
    freq = torch.exp(torch.arange(0, dim, 2, dtype=torch.float32, device=device) * (-math.log(10000.0) / dim))
    return torch.stack([torch.sin(pos * freq), torch.cos(pos * freq)], dim=2).reshape(k, dim)


def sorted_units(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``x (N, K, d)`` sorted in descending order along ``K`` per dimension, padded units last
    and zero. The sort runs on a contiguous ``(N, d, K)`` copy: along the last axis it takes 0.6x
    the time of a sort along ``K`` in place (64 x 140 x 512 units, forward and backward, on a CPU)."""
    valid = mask.bool().unsqueeze(-1)
    rows = x.masked_fill(~valid, PAD_VALUE).transpose(1, 2).contiguous()
    ordered = torch.sort(rows, dim=-1, descending=True)[0].transpose(1, 2)
    lengths = mask.sum(dim=1, keepdim=True)
    first = torch.arange(x.shape[1], device=x.device).unsqueeze(0) < lengths  # (N, K)
    return ordered * first.unsqueeze(-1).to(ordered.dtype)


class GPO(nn.Module):
    """Generalized pooling (eqs. 3-5 of VSE-infinity): ``(N, K, d), (N, K) -> (N, d)``."""

    def __init__(self):
        super().__init__()
        self.fwd = nn.GRU(PE_DIM, HIDDEN, batch_first=True)
        self.bwd = nn.GRU(PE_DIM, HIDDEN, batch_first=True)
        self.score = nn.Linear(HIDDEN, 1, bias=False)

    def weights(self, mask: torch.Tensor, static_shapes: bool = False) -> torch.Tensor:
        """``theta (N, K)``: zero past each set's size, summing to 1 over it."""
        n, k = mask.shape
        lengths = mask.sum(dim=1).long()
        pe = positional_encoding(k, PE_DIM, mask.device).unsqueeze(0).expand(n, k, PE_DIM)
        states = bidirectional_mean(self.fwd, self.bwd, pe, lengths.clamp(min=1), static_shapes)
        first = torch.arange(k, device=mask.device).unsqueeze(0) < lengths.unsqueeze(1)
        scores = self.score(states).squeeze(-1).float().masked_fill(~first, PAD_VALUE)
        return torch.softmax(scores / TEMPERATURE, dim=1)

    def forward(self, x: torch.Tensor, mask: torch.Tensor, static_shapes: bool = False) -> torch.Tensor:
        theta = self.weights(mask, static_shapes)
        return (sorted_units(x.float(), mask) * theta.unsqueeze(-1)).sum(dim=1)


class MaxPool(nn.Module):
    def forward(self, x: torch.Tensor, mask: torch.Tensor, static_shapes: bool = False) -> torch.Tensor:
        return x.float().masked_fill(~mask.bool().unsqueeze(-1), PAD_VALUE).amax(dim=1)


class MeanPool(nn.Module):
    def forward(self, x: torch.Tensor, mask: torch.Tensor, static_shapes: bool = False) -> torch.Tensor:
        m = mask.to(torch.float32).unsqueeze(-1)
        return (x.float() * m).sum(dim=1) / m.sum(dim=1).clamp(min=1)


POOLS = {"gpo": GPO, "max": MaxPool, "mean": MeanPool}


def build_pool(name: str) -> nn.Module:
    return POOLS[name]()
