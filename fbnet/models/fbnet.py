"""FB-Net: two branches (B-Net, F-Net) x three levels, fused by eq. (7).

Inputs are cached block features from the frozen :class:`~fbnet.models.backbone.BlockEncoder`:
``background (N, B, C)`` and ``foreground (N, J, B, C)`` with ``B = 1 + 4 + 9`` blocks of levels
1-3 per region and ``fg_mask (N, J)`` marking real detector boxes. Each branch has its own
projection ``C -> d`` and its own text encoder (eq. 10); at level ``u`` B-Net aligns the ``u**2``
blocks of the whole image and F-Net the ``J u**2`` blocks of all boxes with the ``u**2`` text
windows of eqs. (11)-(12), through stacked cross attention (eqs. 13-15).

Eq. (7), as implemented (the paper weighs the foreground branch by alpha and levels 2 and 3 by
beta and lambda)::

    S = alpha * (S^F_1 + beta S^F_2 + lambda S^F_3) + (S^B_1 + beta S^B_2 + lambda S^B_3) + mu S^G

``S^G`` is not the paper's: with ``model.global_pool`` set, a pooled global branch (key ``G1``)
projects every block of both branches with a projection of its own, pools them into one image
vector (:mod:`fbnet.models.pooling`: GPO, max or mean) and pools B-Net's word features (eq. 10)
the same way into one caption vector; ``S^G`` is their cosine. Its weight mu is chosen on the
validation split with alpha, beta and lambda (``train.global_grid``); without it mu is 0.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..augment import drop_units
from ..config import ModelConfig
from ..windows import blocks_per_level, level_slices
from .attention import cross_attention, grouped_cross_attention
from .pooling import build_pool
from .text import TextEncoder, text_windows

BRANCH_KEY = {"background": "B", "foreground": "F", "global": "G"}
GLOBAL = ("global", 1)


@dataclass(frozen=True)
class Fusion:
    """Weights of eq. (7)."""

    alpha: float = 1.0
    beta: float = 1.0
    lam: float = 1.0
    mu: float = 1.0  # the pooled global branch (not the paper's)

    def level_weight(self, level: int) -> float:
        return (1.0, self.beta, self.lam)[level - 1]

    def weight(self, branch: str, level: int) -> float:
        if branch == "global":
            return self.mu
        return (self.alpha if branch == "foreground" else 1.0) * self.level_weight(level)


def project_boxes(embed, foreground: torch.Tensor, fg_mask: torch.Tensor, static_shapes: bool) -> torch.Tensor:
    """``embed`` of the box blocks ``(N, J, B, C) -> (N, J, B, d)``, padded box slots zero. Only real
    boxes are embedded (exact: padded slots are masked wherever they are read); ``static_shapes``
    (exported graphs) embeds every slot and zeroes the padded ones, so no shape depends on the data."""
    if static_shapes:
        return embed(foreground) * fg_mask.to(torch.float32)[:, :, None, None]
    real = fg_mask.bool()
    real_emb = embed(foreground[real])
    emb = real_emb.new_zeros(*foreground.shape[:3], real_emb.shape[-1])
    emb[real] = real_emb
    return emb


def fuse(sims: dict[tuple[str, int], torch.Tensor], fusion: Fusion) -> torch.Tensor:
    """Eq. (7): the weighted sum of the per-branch, per-level similarity matrices."""
    return sum(fusion.weight(b, u) * s for (b, u), s in sims.items())


class FBNet(nn.Module):
    def __init__(self, cfg: ModelConfig, vocab_size: int, feature_dim: int):
        super().__init__()
        self.cfg = cfg
        self.levels = cfg.levels
        self.branches = tuple(cfg.branches)
        self.proj = nn.ModuleDict({
            BRANCH_KEY[b]: nn.Linear(feature_dim, cfg.embed_dim) for b in self.branches
        })
        self.text = nn.ModuleDict({
            BRANCH_KEY[b]: TextEncoder(vocab_size, cfg.word_dim, cfg.embed_dim) for b in self.branches
        })
        self.global_pool, self.block_dropout = cfg.global_pool, cfg.block_dropout
        if self.global_pool:
            self.proj["G"] = nn.Linear(feature_dim, cfg.embed_dim)
            self.image_pool, self.text_pool = build_pool(self.global_pool), build_pool(self.global_pool)
        for lin in self.proj.values():  # Xavier init as in SCAN's image encoder
            r = (6.0 / (lin.in_features + lin.out_features)) ** 0.5
            nn.init.uniform_(lin.weight, -r, r)
            nn.init.zeros_(lin.bias)

    #: keys whose text units are words (a variable number per caption); FB-Net's are windows
    word_keys: tuple = ()
    #: training searches eq. (7)'s alpha, beta, lambda on validation (``train.fusion_grid``)
    searches_fusion = True

    @property
    def keys(self) -> list[tuple[str, int]]:
        local = [(b, u) for b in self.branches for u in range(1, self.levels + 1)]
        return local + [GLOBAL] if self.global_pool else local

    def encode_images(self, background: torch.Tensor, foreground: torch.Tensor, fg_mask: torch.Tensor,
                      boxes: torch.Tensor | None = None, static_shapes: bool = False):
        """Unit-length block embeddings and masks per (branch, level): ``(N, K, d), (N, K)``.
        (``boxes``, the region boxes the related models' geometry reads, are not used here.)

        Only real boxes' blocks are projected (padded slots stay zero, as masked blocks are anyway):
        exact, and most of F-Net's projection on Flickr8k. ``static_shapes`` (exported graphs)
        projects every slot, so no shape depends on the data."""
        out = {}
        slices = level_slices(self.levels)
        for branch in self.branches:
            proj = self.proj[BRANCH_KEY[branch]]
            embed = lambda x: F.normalize(proj(F.normalize(x.float(), dim=-1)), dim=-1)  # noqa: E731
            if branch == "background":
                emb = embed(background)
            else:
                emb = project_boxes(embed, foreground, fg_mask, static_shapes)
            for u in range(1, self.levels + 1):
                sl = slices[u - 1]
                if branch == "background":
                    blocks = emb[:, sl]
                    mask = torch.ones(blocks.shape[:2], dtype=blocks.dtype, device=blocks.device)
                else:
                    n, j = foreground.shape[:2]
                    blocks = emb[:, :, sl].reshape(n, j * blocks_per_level(u), -1)
                    mask = fg_mask.to(blocks.dtype).repeat_interleave(blocks_per_level(u), dim=1)
                out[(branch, u)] = (blocks, mask)
        if self.global_pool:
            out[GLOBAL] = self._pooled_image(background, foreground, fg_mask, static_shapes)
        return out

    def _pooled_image(self, background, foreground, fg_mask, static_shapes):
        """``S^G``'s image side: every block of both branches (real boxes' only), projected and
        pooled into one unit vector ``(N, 1, d)`` with mask ``(N, 1)``. As for F-Net, only real
        boxes' blocks are projected (in training, half the units on Flickr8k). In training,
        ``model.block_dropout`` leaves each block out of the pooling with that probability."""
        n, j, nb = foreground.shape[:3]
        proj = self.proj["G"]
        embed = lambda x: proj(F.normalize(x.float(), dim=-1))  # noqa: E731
        boxes = project_boxes(embed, foreground, fg_mask, static_shapes)
        units = torch.cat([embed(background), boxes.reshape(n, j * nb, -1)], dim=1)
        mask = torch.cat([torch.ones(n, nb, device=units.device),
                          fg_mask.to(torch.float32).repeat_interleave(nb, dim=1)], dim=1)
        if self.training and self.block_dropout:
            mask = drop_units(mask, self.block_dropout)
        pooled = self.image_pool(units, mask, static_shapes)
        return F.normalize(pooled, dim=-1).unsqueeze(1), torch.ones(n, 1, device=units.device)

    def encode_texts(self, ids: torch.Tensor, lengths: torch.Tensor, static_shapes: bool = False):
        """Unit-length text-window embeddings per (branch, level): ``(N, u**2, d)``
        (``static_shapes``: the GRU over padded batches, as exported; else packed)."""
        out = {}
        for branch in self.branches:
            words = self.text[BRANCH_KEY[branch]](ids, lengths, static_shapes)
            for u in range(1, self.levels + 1):
                out[(branch, u)] = F.normalize(text_windows(words, lengths, blocks_per_level(u)), dim=-1)
            if self.global_pool and branch == self.branches[0]:  # S^G reads the first branch's words
                valid = (torch.arange(ids.shape[1], device=ids.device)[None, :] < lengths[:, None]).float()
                pooled = self.text_pool(words, valid, static_shapes)
                out[GLOBAL] = F.normalize(pooled, dim=-1).unsqueeze(1)
        return out

    def similarities(self, images: dict, texts: dict, attended_images: str = "gram",
                     static_shapes: bool = False) -> dict[tuple[str, int], torch.Tensor]:
        """The six (at most) similarity matrices ``(I, C)`` of eqs. (13)-(15). Padded box slots are
        skipped by grouping images by box count; ``static_shapes`` (exported graphs) takes the
        masked form instead (the runtime groups its gallery chunks itself)."""
        score = cross_attention if static_shapes else grouped_cross_attention
        out = {key: score(images[key][0], images[key][1], texts[key], self.cfg.delta1, self.cfg.delta2, attended_images)
               for key in self.keys if key != GLOBAL}
        if self.global_pool:
            out[GLOBAL] = torch.matmul(images[GLOBAL][0][:, 0], texts[GLOBAL][:, 0].t())
        return out

    def fuse(self, sims: dict, fusion: Fusion) -> torch.Tensor:
        """Eq. (7) (:func:`fuse`)."""
        return fuse(sims, fusion)
