import torch
import torch.nn.functional as F

from fbnet.models.attention import cross_attention, grouped_cross_attention, pairwise_reference


def test_batched_cross_attention_matches_the_per_pair_loop():
    torch.manual_seed(0)
    blocks = F.normalize(torch.randn(5, 12, 16), dim=-1)
    mask = torch.ones(5, 12)
    mask[1, 4:] = 0
    mask[3, 1:] = 0
    blocks = blocks * mask.unsqueeze(-1)
    windows = F.normalize(torch.randn(7, 4, 16), dim=-1)
    slow = pairwise_reference(blocks, mask, windows, 4.0, 9.0)
    for attended in ("gram", "direct"):
        fast = cross_attention(blocks, mask, windows, 4.0, 9.0, attended)
        assert fast.shape == (5, 7)
        assert torch.allclose(fast, slow, atol=1e-5), (attended, (fast - slow).abs().max())
    one = cross_attention(blocks, mask, windows[2:3], 4.0, 9.0, "direct")  # re-ranking: one caption
    assert torch.allclose(one[:, 0], slow[:, 2], atol=1e-5)


def test_grouped_scoring_skips_padding_exactly():
    """Images grouped by their number of real blocks, each group cut to it: the per-pair loop's
    scores, with padded and unpadded images, and gradients through the regrouping."""
    torch.manual_seed(1)
    counts = torch.tensor([9, 2, 5, 2, 9, 1])  # real blocks first, as F-Net's boxes
    mask = (torch.arange(9)[None, :] < counts[:, None]).float()
    blocks = (F.normalize(torch.randn(6, 9, 16), dim=-1) * mask.unsqueeze(-1)).requires_grad_(True)
    windows = F.normalize(torch.randn(4, 4, 16), dim=-1)
    slow = pairwise_reference(blocks.detach(), mask, windows, 4.0, 9.0)
    grouped = grouped_cross_attention(blocks, mask, windows, 4.0, 9.0)
    assert torch.allclose(grouped, slow, atol=1e-5), (grouped - slow).abs().max()
    grouped.sum().backward()
    assert blocks.grad[1, 2:].abs().sum() == 0 and blocks.grad[1, :2].abs().sum() > 0
    full = torch.ones(6, 9)  # no padding: one call, same as the masked form
    assert torch.allclose(grouped_cross_attention(blocks.detach(), full, windows, 4.0, 9.0),
                          cross_attention(blocks.detach(), full, windows, 4.0, 9.0))


def test_identical_units_score_the_maximum():
    v = F.normalize(torch.randn(1, 3, 8), dim=-1)
    s = cross_attention(v, torch.ones(1, 3), v.clone(), 50.0, 50.0)
    assert s.item() > 1.9  # S^i + S^t <= 2


def test_dropping_padding_box_slots_changes_no_similarity():
    """SplitFeatures.tensors drops box slots past the batch's largest box count: exact, because
    masked blocks never enter eqs. 13-15."""
    import numpy as np

    from fbnet.config import ModelConfig
    from fbnet.features import SplitFeatures
    from fbnet.models.fbnet import FBNet

    rng = np.random.default_rng(0)
    n, j, b, c = 6, 9, 14, 32
    mask = np.arange(j)[None, :] < np.array([1, 3, 2, 4, 1, 2])[:, None]  # real boxes first; at most 4
    feats = SplitFeatures(rng.normal(size=(n, b, c)).astype(np.float16), rng.normal(size=(n, j, b, c)).astype(np.float16),
                          mask, np.zeros((n, j, 4), np.float32), canvas=64)
    bg, fg, m, boxes = feats.tensors(np.arange(n))
    assert boxes.shape == (n, 4, 4) and torch.allclose(boxes[0, 0], torch.tensor([0.0, 0.0, 1.0, 1.0]))
    assert fg.shape[1] == 4 and m.shape == (n, 4)
    torch.manual_seed(0)
    model = FBNet(ModelConfig(embed_dim=16), vocab_size=20, feature_dim=c).eval()
    ids, lengths = torch.randint(1, 20, (5, 7)), torch.tensor([7, 3, 5, 1, 6])
    with torch.no_grad():
        texts = model.encode_texts(ids, lengths)
        full = model.similarities(model.encode_images(torch.from_numpy(feats.background).float(),
                                                      torch.from_numpy(feats.foreground).float(),
                                                      torch.from_numpy(mask)), texts)
        trimmed = model.similarities(model.encode_images(bg, fg, m), texts)
    for key in full:
        assert torch.allclose(full[key], trimmed[key], atol=1e-5), key
