"""The frame the related region-word models share (SCAN, DSRLN, RGF, SFE; :mod:`fbnet.models.registry`).

Their inputs are FB-Net's cached block features, so every model trains on the same cache:

* **regions**: the detector's boxes, RoIAligned from the backbone's feature map (F-Net's level-1
  blocks), at most J per image with the whole image standing in when none is found; projected
  ``C -> d`` by a fully connected layer, as SCAN projects its region features;
* **grid**: the backbone's feature map pooled into the cells of B-Net's last level (3 x 3
  half-overlapping cells at level 3; a reconstruction: DSRLN and RGF use the CNN's native grid,
  e.g. 7 x 7; cached RoIAligned cells let every model share one cache);
* **words**: a 300-d embedding and a 1-layer Bi-GRU, the two directions averaged (SCAN's text
  encoder, and FB-Net's eq. 10).

A subclass enhances the regions (:meth:`RegionModel.enhance`, and optionally the words) and the
frame scores two keys, named by the runtime's unit layout:

* ``F1``, local alignment: stacked cross attention between the (enhanced) regions and the
  words (SCAN, Lee et al. 2018, sec. 3: t-i, i-t or both, average or LogSumExp pooling;
  :func:`fbnet.models.attention.cross_attention` with a word mask);
* ``B1``, global alignment: the cosine of one image vector (the model's pooling of its units)
  and one caption vector (the mean of the word features).

``fuse`` = ``F1 + global_weight B1``. A model whose source has no global alignment (SCAN)
weighs ``B1`` 0: it is still trained (its loss is one of the summed per-key losses) because
two-stage search ranks by it first; the score the model reports is SCAN's own.
"""

from __future__ import annotations

import torch
from torch import nn

from ..windows import REAL_UNIT_MIN_SQNORM, level_slices
from .attention import cross_attention, grouped_cross_attention
from .relation import grid_boxes, unit
from .text import TextEncoder

GLOBAL, LOCAL = ("background", 1), ("foreground", 1)


class RegionModel(nn.Module):
    #: whether the model scores regions against words (``F1``); else only the global key
    local: bool = True
    #: whether the model reads the grid cells
    uses_grid: bool = True
    #: weight of the global similarity (``B1``) in the fused score
    global_weight: float = 1.0
    #: the fused score has no weights to search on validation (eq. (7)'s are FB-Net's)
    searches_fusion = False

    def __init__(self, cfg, vocab_size: int, feature_dim: int):
        super().__init__()
        self.cfg = cfg
        self.levels = cfg.levels
        d = cfg.embed_dim
        self.region_proj = nn.Linear(feature_dim, d)
        if self.uses_grid:
            self.grid_proj = nn.Linear(feature_dim, d)
            self.register_buffer("grid_boxes", grid_boxes(cfg.backbone.image_size, cfg.levels), persistent=False)
        self.text = nn.ModuleDict({"T": TextEncoder(vocab_size, cfg.word_dim, d)})
        for lin in (m for m in self.modules() if isinstance(m, nn.Linear)):
            r = (6.0 / (lin.in_features + lin.out_features)) ** 0.5  # Xavier, as SCAN's image encoder
            nn.init.uniform_(lin.weight, -r, r)
            nn.init.zeros_(lin.bias)

    @property
    def keys(self) -> list[tuple[str, int]]:
        return [GLOBAL, LOCAL] if self.local else [GLOBAL]

    @property
    def word_keys(self) -> tuple:
        """Keys whose text units are words (the runtime pads them to a common length)."""
        return (LOCAL,) if self.local else ()

    # -- what a model changes --------------------------------------------------------------
    def enhance(self, regions: torch.Tensor, mask: torch.Tensor, grid: torch.Tensor | None, boxes: torch.Tensor):
        """Enhanced regions ``(N, J, d)`` and the pooled image vector ``(N, d)`` from projected
        regions, their mask ``(N, J)``, grid cells ``(N, G, d)`` and region boxes ``(N, J, 4)``
        (fractions of the canvas). The frame's default: regions as they are, their mean."""
        return regions, masked_mean(regions, mask)

    def enhance_words(self, words: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """Enhanced word features ``(N, L, d)`` (``valid (N, L)`` 1 for real words)."""
        return words

    # -- the shared interface ----------------------------------------------------------------
    def encode_images(self, background: torch.Tensor, foreground: torch.Tensor, fg_mask: torch.Tensor,
                      boxes: torch.Tensor | None = None, static_shapes: bool = False):
        n, j = fg_mask.shape
        mask = fg_mask.to(torch.float32)
        if boxes is None:  # the whole image (what a padded slot holds)
            boxes = torch.tensor([0.0, 0.0, 1.0, 1.0], device=mask.device).expand(n, j, 4)
        regions = unit(self.region_proj(unit(foreground[:, :, 0].float())))
        grid = unit(self.grid_proj(unit(background[:, level_slices(self.levels)[-1]].float()))) \
            if self.uses_grid else None
        units, pooled = self.enhance(regions, mask, grid, boxes.float())
        ones = torch.ones(n, 1, dtype=mask.dtype, device=mask.device)
        out = {GLOBAL: (unit(pooled).unsqueeze(1), ones)}
        if self.local:
            out[LOCAL] = (unit(units) * mask[..., None], mask)
        return out

    def encode_texts(self, ids: torch.Tensor, lengths: torch.Tensor, static_shapes: bool = False):
        """``B1``: the caption vector ``(N, 1, d)``; ``F1``: unit word features ``(N, L, d)``, zero
        past each caption's length (the scorer reads the word mask from that)."""
        words = self.text["T"](ids, lengths, static_shapes)
        valid = (torch.arange(ids.shape[1], device=ids.device)[None, :] < lengths[:, None]).to(words.dtype)
        words = self.enhance_words(words, valid) * valid[..., None]
        out = {GLOBAL: unit(masked_mean(words, valid)).unsqueeze(1)}
        if self.local:
            out[LOCAL] = unit(words) * valid[..., None]
        return out

    def similarities(self, images: dict, texts: dict, attended_images: str = "gram",
                     static_shapes: bool = False) -> dict:
        out = {GLOBAL: torch.matmul(images[GLOBAL][0][:, 0], texts[GLOBAL][:, 0].t())}
        if self.local:
            words = texts[LOCAL]
            word_mask = (words.pow(2).sum(dim=-1) > REAL_UNIT_MIN_SQNORM).to(words.dtype)
            score = cross_attention if static_shapes else grouped_cross_attention
            c = self.cfg
            out[LOCAL] = score(*images[LOCAL], words, c.delta1, c.delta2, attended_images, window_mask=word_mask,
                               direction=c.direction, pooling=c.pooling, lse_lambda=c.lse_lambda)
        return out

    def fuse(self, sims: dict, fusion=None) -> torch.Tensor:
        """``F1 + global_weight B1`` (eq. (7)'s weights are FB-Net's and do not apply)."""
        fused = self.global_weight * sims[GLOBAL]
        return fused + sims[LOCAL] if self.local else fused


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``x (N, L, d)`` over the positions where ``mask (N, L)`` is 1."""
    return (x * mask[..., None]).sum(dim=1) / mask.sum(dim=1, keepdim=True).clamp(min=1)
