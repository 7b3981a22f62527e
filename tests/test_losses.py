import pytest
import torch

from fbnet.config import ConfigError, FBNetConfig, LossConfig
from fbnet.losses import dsaw_loss, epoch_loss, triplet_loss, triplet_sum_loss


def _batch():
    torch.manual_seed(0)
    sim = (torch.rand(6, 6) * 2 - 1).requires_grad_()
    labels = torch.tensor([0, 0, 1, 1, 2, 2])
    return sim, labels[:, None] == labels[None, :]


def test_dsaw_pulls_positives_up_and_pushes_negatives_down():
    sim, pos = _batch()
    loss = dsaw_loss(sim, pos, LossConfig())
    loss.backward()
    g = sim.grad
    assert loss.item() > 0
    assert (g[pos] <= 0).all() and (g[~pos] >= 0).all()
    assert (g[pos] < 0).any() and (g[~pos] > 0).any()


def test_dsaw_mining_ignores_easy_pairs():
    sim = torch.tensor([[0.9, -0.9], [-0.9, 0.9]], requires_grad=True)
    pos = torch.eye(2, dtype=torch.bool)
    dsaw_loss(sim, pos, LossConfig()).backward()
    assert torch.count_nonzero(sim.grad) == 0  # every positive beats every negative by > eps


def test_dsaw_is_finite_for_large_similarities():
    sim = torch.full((4, 4), 2.0, requires_grad=True)
    loss = dsaw_loss(sim, torch.eye(4, dtype=torch.bool), LossConfig())
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(sim.grad).all()


def test_triplet_gradient_signs():
    sim, pos = _batch()
    triplet_loss(sim, pos, LossConfig()).backward()
    assert (sim.grad.diagonal() <= 0).all() and (sim.grad[~pos] >= 0).all()


def test_triplet_sum_is_the_hinges_of_every_negative_by_hand():
    sim = torch.tensor([[0.5, 0.4, -0.2], [0.1, 0.6, 0.7], [0.0, 0.3, 0.2]])
    pos = torch.eye(3, dtype=torch.bool)
    m = 0.2
    by_hand = sum(max(0.0, m - sim[a, a].item() + sim[a, n].item()) + max(0.0, m - sim[a, a].item() + sim[n, a].item())
                  for a in range(3) for n in range(3) if n != a)
    assert triplet_sum_loss(sim, pos, LossConfig(margin=m)).item() == pytest.approx(by_hand)
    # every violating negative is pushed down, not the hardest alone (here every negative violates)
    close = torch.tensor([[0.5, 0.45, 0.4], [0.42, 0.5, 0.4], [0.35, 0.44, 0.5]])
    s1, s2 = close.clone().requires_grad_(), close.clone().requires_grad_()
    triplet_sum_loss(s1, pos, LossConfig(margin=m)).backward()
    triplet_loss(s2, pos, LossConfig(margin=m)).backward()
    assert (s1.grad[~pos] > 0).all() and not (s2.grad[~pos] > 0).all()


def test_triplet_warmup_schedule_and_its_refusal():
    cfg = LossConfig(name="triplet", warmup_epochs=1)
    assert [epoch_loss(cfg, e).name for e in range(3)] == ["triplet_sum", "triplet", "triplet"]
    assert epoch_loss(LossConfig(), 0).name == "dsaw"
    with pytest.raises(ConfigError, match="warmup_epochs is for loss 'triplet'"):
        FBNetConfig.from_dict({"loss": {"name": "dsaw", "warmup_epochs": 1}})
