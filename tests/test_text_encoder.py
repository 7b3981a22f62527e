import torch

from fbnet.models.text import TextEncoder


def test_padded_batch_equals_each_caption_alone():
    torch.manual_seed(0)
    enc = TextEncoder(20, word_dim=8, embed_dim=6).eval()
    a = torch.tensor([[3, 4, 5, 6, 7]])
    b = torch.tensor([[8, 9]])
    batch = torch.tensor([[3, 4, 5, 6, 7], [8, 9, 0, 0, 0]])
    out = enc(batch, torch.tensor([5, 2]))
    assert torch.allclose(out[0], enc(a, torch.tensor([5]))[0], atol=1e-6)
    assert torch.allclose(out[1, :2], enc(b, torch.tensor([2]))[0], atol=1e-6)
    assert (out[1, 2:] == 0).all()


def test_backward_direction_reads_from_the_last_real_word():
    torch.manual_seed(0)
    enc = TextEncoder(20, word_dim=8, embed_dim=6).eval()
    x = enc.embed(torch.tensor([[3, 4, 5]]))
    h_bwd = enc.bwd(x.flip(1))[0].flip(1)
    h_fwd = enc.fwd(x)[0]
    assert torch.allclose(enc(torch.tensor([[3, 4, 5]]), torch.tensor([3])), (h_fwd + h_bwd) / 2, atol=1e-6)
