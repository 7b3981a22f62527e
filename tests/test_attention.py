import torch
import torch.nn.functional as F

from fbnet.models.attention import cross_attention, pairwise_reference


def test_batched_cross_attention_matches_the_per_pair_loop():
    torch.manual_seed(0)
    blocks = F.normalize(torch.randn(5, 12, 16), dim=-1)
    mask = torch.ones(5, 12)
    mask[1, 4:] = 0
    mask[3, 1:] = 0
    blocks = blocks * mask.unsqueeze(-1)
    windows = F.normalize(torch.randn(7, 4, 16), dim=-1)
    fast = cross_attention(blocks, mask, windows, 4.0, 9.0)
    slow = pairwise_reference(blocks, mask, windows, 4.0, 9.0)
    assert fast.shape == (5, 7)
    assert torch.allclose(fast, slow, atol=1e-5), (fast - slow).abs().max()


def test_identical_units_score_the_maximum():
    v = F.normalize(torch.randn(1, 3, 8), dim=-1)
    s = cross_attention(v, torch.ones(1, 3), v.clone(), 50.0, 50.0)
    assert s.item() > 1.9  # S^i + S^t <= 2
