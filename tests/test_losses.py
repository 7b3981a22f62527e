import torch

from fbnet.config import LossConfig
from fbnet.losses import dsaw_loss, triplet_loss


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
