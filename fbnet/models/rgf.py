"""Region-grid fusion by a two-step interaction (Wu, Li, Gu, Guo, Liu; ACM MM 2022, pp.
5055-5064; ``../shared/papers/003_e28b3e981025fe44.txt``, an abstract). Named ``rgf`` here.

What the abstract states, and how it is built here:

* **Step 1, a joint graph with spatial constraints** whose nodes are all region and grid
  features, messages passed edge-wise. *Reconstruction*: edges join two regions whose boxes
  overlap, a region and each grid cell it overlaps, and grid cells that are neighbours in the
  grid (8-neighbourhood); one row-normalised GCN step
  (:class:`~fbnet.models.relation.GraphStep`); padded region slots have no edges.
* **Step 2, Cross-attention Gated Fusion**: regions attend over the grid cells and grid cells
  over the real regions, and a gate (:class:`~fbnet.models.relation.Gate`) fuses each node with
  what it attended to.
* **Multi-Attention Pooling** aggregates the fused region and grid features into the image
  embedding. *Reconstruction*: ``heads`` learned queries, each a softmax attention over the real
  nodes; the pooled vectors averaged.

The model is a global-embedding one: its score is the cosine of the pooled image vector and the
mean word (key ``B1`` only); the caption side (a Bi-GRU, mean-pooled) is a reconstruction as the
abstract does not describe it.
"""

from __future__ import annotations

import torch
from torch import nn

from .region import RegionModel
from .relation import AttentionLayer, Gate, GraphStep, attend, identity, overlaps


def grid_neighbours(side: int) -> torch.Tensor:
    """``(side**2, side**2)``: 1 where two cells of a ``side x side`` grid touch (8-neighbourhood)."""
    r, c = torch.arange(side).repeat_interleave(side), torch.arange(side).repeat(side)
    near = ((r[:, None] - r[None, :]).abs() <= 1) & ((c[:, None] - c[None, :]).abs() <= 1)
    return near & ~torch.eye(side * side, dtype=torch.bool)


def joint_adjacency(boxes: torch.Tensor, mask: torch.Tensor, grid: torch.Tensor, neighbours: torch.Tensor):
    """Edges of the joint graph ``(N, J + G, J + G)`` (regions first; no self-loops)."""
    j = mask.shape[1]
    real = mask > 0
    rr = overlaps(boxes, boxes) & real[:, :, None] & real[:, None, :]
    rr = rr & ~identity(j, boxes.device)
    rg = overlaps(boxes, grid) & real[:, :, None]
    gg = neighbours & torch.ones_like(rg[:, :1, :1])  # (N, G, G), broadcast (no traced batch size)
    return torch.cat([torch.cat([rr, rg], dim=2), torch.cat([rg.transpose(1, 2), gg], dim=2)], dim=1)


class RGF(RegionModel):
    local = False
    global_weight = 1.0

    def __init__(self, cfg, vocab_size: int, feature_dim: int):
        super().__init__(cfg, vocab_size, feature_dim)
        d, h = cfg.embed_dim, cfg.heads
        self.register_buffer("neighbours", grid_neighbours(cfg.levels), persistent=False)
        self.graph = GraphStep(d)
        self.region_attention, self.grid_attention = AttentionLayer(d, h), AttentionLayer(d, h)
        self.region_gate, self.grid_gate = Gate(d), Gate(d)
        self.pool_queries = nn.Parameter(torch.randn(h, d) / d ** 0.5)
        self.pool_keys = nn.Linear(d, d)

    def enhance(self, regions, mask, grid, boxes):
        j = regions.shape[1]
        h = self.graph(torch.cat([regions, grid], dim=1), joint_adjacency(boxes, mask, self.grid_boxes, self.neighbours))
        r, g = h[:, :j], h[:, j:]
        real = mask > 0
        r2 = self.region_gate(r, self.region_attention.attended(r, g)) * mask[..., None]
        g2 = self.grid_gate(g, self.grid_attention.attended(g, r, mask=real[:, None, :].expand(-1, g.shape[1], -1)))
        nodes = torch.cat([r2, g2], dim=1)
        node_mask = torch.cat([real, torch.ones_like(g2[..., 0], dtype=torch.bool)], dim=1)
        return r2, self.pool(nodes, node_mask)

    def pool(self, nodes: torch.Tensor, node_mask: torch.Tensor) -> torch.Tensor:
        """Multi-attention pooling: one softmax attention over the real nodes per learned query, averaged."""
        heads = self.pool_queries.shape[0]
        queries = self.pool_queries + torch.zeros_like(nodes[:, :1, :1])  # (N, heads, d)
        pooled = attend(queries, self.pool_keys(nodes), nodes, 1, mask=node_mask[:, None, :].expand(-1, heads, -1))
        return pooled.mean(dim=1)
