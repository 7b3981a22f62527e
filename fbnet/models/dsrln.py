"""DSRLN, Dual Stream Relation Learning Network (Wu, Li, Gu, Guo, Liu; IEEE Trans. Multimedia
27, 2025; ``../shared/papers/001_64f68a51117a046d.txt``, an abstract).

What the abstract states, and how it is built here:

* **GISA**, a geometry-sensitive interactive self-attention over the region features, to reason
  about the relations between objects: :class:`~fbnet.models.relation.GeometryAttention`.
  *Reconstruction*: the geometry term is relation networks' (the boxes' relative positions and
  sizes, embedded, one logit bias per head); the abstract's second extension ("interactive")
  is not specified and is read as that pairwise geometry-feature interaction.
* **DIF**, dual information fusion of grid features into the regions, by a masked
  cross-attention and an adaptive gate. *Reconstruction*: each region attends over the grid
  cells its box overlaps (the mask), and a per-dimension sigmoid gate
  (:class:`~fbnet.models.relation.Gate`) mixes the region with what it attended to.
* **Local and global alignment.** Local: stacked cross attention between the fused regions and
  the words (key ``F1``, see :mod:`fbnet.models.region`); global: the cosine of the mean of the
  fused regions and grid cells and the mean word (key ``B1``); the score is their sum.

The grid is B-Net's last level (3 x 3 cells; DSRLN uses the CNN's own grid), the regions are
F-Net's level-1 blocks (at most 9 boxes; DSRLN uses bottom-up-attention regions).
"""

from __future__ import annotations

import torch

from .region import RegionModel, masked_mean
from .relation import AttentionLayer, Gate, GeometryAttention, overlaps


class DSRLN(RegionModel):
    global_weight = 1.0

    def __init__(self, cfg, vocab_size: int, feature_dim: int):
        super().__init__(cfg, vocab_size, feature_dim)
        d, h = cfg.embed_dim, cfg.heads
        self.gisa = GeometryAttention(d, h)
        self.dif_attention = AttentionLayer(d, h)
        self.dif_gate = Gate(d)

    def enhance(self, regions, mask, grid, boxes):
        related = self.gisa(regions, boxes, mask)
        cells = overlaps(boxes, self.grid_boxes)  # (N, J, G): the DIF mask
        fused = self.dif_gate(related, self.dif_attention.attended(related, grid, mask=cells)) * mask[..., None]
        everything = torch.cat([fused, grid], dim=1)
        return fused, masked_mean(everything, torch.cat([mask, torch.ones_like(grid[..., 0])], dim=1))
