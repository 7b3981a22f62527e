"""Pair losses over a batch similarity matrix ``S (B, B)``: rows are images, columns captions.

``positive[a, b]`` says whether image ``a`` and caption ``b`` match: the same category when the
dataset has labels, else the same image.

DSAW (eqs. 16-21), as implemented. For each anchor (a row, then a column, of ``S``) with
positives ``P`` and negatives ``N``:

* mining: keep positives ``p`` with ``S_p - eps < max_N S_n`` and negatives ``n`` with
  ``S_n + eps > min_P S_p``, the pairs between the hardest negative and the hardest positive;
* self-adaptive weighting: with threshold ``gamma``,
  ``L_a = 1/theta log(1 + sum_{p kept} exp(-theta (S_p - gamma)))
        + 1/sigma log(1 + sum_{n kept} exp(sigma (S_n - gamma)))``,
  whose gradient weights each pair by its softmax share, so harder pairs weigh more;
* the loss is the mean over anchors, summed over both retrieval directions.

``dL/dS_p < 0`` and ``dL/dS_n > 0``: descent pulls positives up and pushes negatives down (the
paper's signs are ambiguous; this is the reading that trains).

Triplet (VSE++, the ablation): ``sum_a [m - S_aa + max_{n} S_an]_+`` over both directions, with
the matching pair on the diagonal and the hardest negative. Its warm-up (``loss.warmup_epochs``,
as VSE∞'s ``vse_mean_warmup_epochs``): the first epochs sum the hinges over every negative,
``sum_a sum_n [m - S_aa + S_an]_+`` (VSE0's loss, ``triplet_sum``), because the hardest negative
of an untrained model is noise and max violation alone starts slowly (SCAN's 2-epoch figure).
"""

from __future__ import annotations

import torch

from .config import LossConfig
from .models.registry import LOSSES, resolve


def dsaw_loss(sim: torch.Tensor, positive: torch.Tensor, cfg: LossConfig) -> torch.Tensor:
    return _dsaw_rows(sim, positive, cfg) + _dsaw_rows(sim.T, positive.T, cfg)


def _dsaw_rows(sim: torch.Tensor, positive: torch.Tensor, cfg: LossConfig) -> torch.Tensor:
    big = torch.finfo(sim.dtype).max
    neg = ~positive
    hardest_neg = sim.masked_fill(positive, -big).max(dim=1, keepdim=True).values
    hardest_pos = sim.masked_fill(neg, big).min(dim=1, keepdim=True).values
    keep_pos = positive & (sim - cfg.epsilon < hardest_neg)
    keep_neg = neg & (sim + cfg.epsilon > hardest_pos)
    loss = _log1p_sum_exp(-cfg.theta * (sim - cfg.gamma), keep_pos) / cfg.theta \
        + _log1p_sum_exp(cfg.sigma * (sim - cfg.gamma), keep_neg) / cfg.sigma
    return loss.mean()


def _log1p_sum_exp(x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """``log(1 + sum_{keep} exp(x))`` per row, computed stably (sigma=50 overflows a plain exp)."""
    x = x.masked_fill(~keep, float("-inf"))
    return torch.logsumexp(torch.cat([x.new_zeros(x.shape[0], 1), x], dim=1), dim=1)


def triplet_loss(sim: torch.Tensor, positive: torch.Tensor, cfg: LossConfig) -> torch.Tensor:
    diag = sim.diagonal()
    neg = sim.masked_fill(positive, float("-inf"))
    i2t = (cfg.margin - diag + neg.max(dim=1).values).clamp(min=0)
    t2i = (cfg.margin - diag + neg.max(dim=0).values).clamp(min=0)
    return i2t.sum() + t2i.sum()  # an anchor with no negative contributes [-inf]_+ = 0


def triplet_sum_loss(sim: torch.Tensor, positive: torch.Tensor, cfg: LossConfig) -> torch.Tensor:
    hinge = cfg.margin + sim
    i2t = (hinge - sim.diagonal()[:, None]).clamp(min=0).masked_fill(positive, 0.0)
    t2i = (hinge - sim.diagonal()[None, :]).clamp(min=0).masked_fill(positive, 0.0)
    return i2t.sum() + t2i.sum()


def epoch_loss(cfg: LossConfig, epoch: int) -> LossConfig:
    """The loss that epoch ``epoch`` (0-based) trains with: ``triplet_sum`` during a triplet run's
    ``warmup_epochs``, else ``cfg`` itself."""
    return cfg.model_copy(update={"name": "triplet_sum"}) if epoch < cfg.warmup_epochs else cfg


def pair_loss(cfg: LossConfig):
    """The loss ``cfg.name`` names in :data:`fbnet.models.registry.LOSSES`."""
    return resolve(LOSSES, cfg.name, "loss")
