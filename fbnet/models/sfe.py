"""SFE, step-wise feature enhancement from external to internal (Wang, Liu, Gao, Xu, Li; Neural
Networks 2025; ``../shared/papers/004_52e3c1fae80cc67d.txt``, a machine-written summary).

What the summary states, and how it is built here:

* **Step 1, External Semantic Cues (ESC)** from patch-level, instance-level and
  neighbour-level co-occurrences, mined beyond single pairs, including cross-modal instance and
  neighbour levels. *Reconstruction* (:class:`CooccurrenceCues`): a bank of ``concepts``
  learned concept vectors shared by both modalities (what makes the cues cross-modal) and a
  learned concept co-occurrence matrix (row-softmax, initialised to the identity). Each unit's
  concept distribution ``p = softmax(tau cos(x, concepts))`` gives three cues: instance
  ``p M``; neighbour ``mean_{neighbours} p  C M`` (regions: the boxes it overlaps; words: the
  words beside it); patch ``mean_{grid cells} p  C M`` (words: the whole caption's mean ``p``).
  A unit becomes ``x + W [instance; neighbour; patch]``.
* **Step 2, Internal Semantic Cues (ISC)** fuse the propagated information and enhance the
  features through cross-modal context. *Reconstruction*: a self-attention layer over each
  modality's enhanced units; the cross-modal context is the scorer's stacked cross attention
  (regions and words, key ``F1``). Conditioning the encoders on the other modality itself would
  tie every gallery item's features to the query, which precomputed galleries cannot serve.

Scoring as SCAN (``configs/sfe.yaml``: t-i, LSE pooling); the global key ``B1`` serves the
first stage and is weighted 0.
"""

from __future__ import annotations

import torch
from torch import nn

from .region import RegionModel, masked_mean
from .relation import AttentionLayer, identity, overlaps, unit

#: Inverse temperature of the concept distributions.
TAU = 10.0


class CooccurrenceCues(nn.Module):
    """ESC: instance, neighbour and patch cues from a shared concept bank (see the module doc)."""

    def __init__(self, dim: int, concepts: int):
        super().__init__()
        self.concepts = nn.Parameter(torch.randn(concepts, dim) / dim ** 0.5)
        self.cooccurrence = nn.Parameter(torch.eye(concepts) * 4.0)  # row-softmax: mostly itself at first
        self.mix = nn.Linear(3 * dim, dim)

    def distribution(self, x: torch.Tensor) -> torch.Tensor:
        """``p = softmax(tau cos(x, concepts))`` per unit: ``(N, L, K)``."""
        return torch.softmax(TAU * torch.matmul(unit(x), unit(self.concepts).t()), dim=-1)

    def forward(self, x: torch.Tensor, mask: torch.Tensor, neighbours: torch.Tensor, context: torch.Tensor):
        """``x (N, L, d)`` units, ``mask (N, L)``, ``neighbours (N, L, L)`` 1 for a neighbour pair,
        ``context (N, K)`` the patch-level concept distribution."""
        p = self.distribution(x) * mask[..., None]
        spread = torch.softmax(self.cooccurrence, dim=-1)  # C: concept -> co-occurring concepts
        weights = neighbours.to(x.dtype) * mask[:, None, :]
        around = torch.matmul(weights, p) / weights.sum(dim=-1, keepdim=True).clamp(min=1)
        instance = torch.matmul(p, self.concepts)
        neighbour = torch.matmul(torch.matmul(around, spread), self.concepts)
        patch = torch.matmul(torch.matmul(context, spread), self.concepts).unsqueeze(1).expand_as(x)
        return x + self.mix(torch.cat([instance, neighbour, patch], dim=-1))


def word_neighbours(length: int, device=None) -> torch.Tensor:
    """``(L, L)``: 1 for the words right before and after each word."""
    i = torch.arange(length, device=device)
    return (i[:, None] - i[None, :]).abs() == 1


class SFE(RegionModel):
    global_weight = 0.0

    def __init__(self, cfg, vocab_size: int, feature_dim: int):
        super().__init__(cfg, vocab_size, feature_dim)
        d, h = cfg.embed_dim, cfg.heads
        self.cues = CooccurrenceCues(d, cfg.concepts)
        self.region_internal, self.word_internal = AttentionLayer(d, h), AttentionLayer(d, h)

    def enhance(self, regions, mask, grid, boxes):
        real = mask > 0
        near = overlaps(boxes, boxes) & ~identity(boxes.shape[1], boxes.device)
        patches = self.cues.distribution(grid).mean(dim=1)
        external = self.cues(regions, mask, near, patches)
        internal = self.region_internal(external, external, mask=real[:, :, None] & real[:, None, :]) * mask[..., None]
        return internal, masked_mean(internal, mask)

    def enhance_words(self, words, valid):
        real = valid > 0
        context = masked_mean(self.cues.distribution(words), valid)
        near = word_neighbours(words.shape[1], words.device) & real[:, :1, None]  # (N, L, L); real[:, 0] holds
        external = self.cues(words, valid, near, context)
        return self.word_internal(external, external, mask=real[:, :, None] & real[:, None, :])
