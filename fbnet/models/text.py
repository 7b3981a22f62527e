"""Text encoder (eq. 10) and overlapped text windows (eqs. 11-12).

Eq. (10): words are embedded (300-d) and read by a 1-layer bidirectional GRU with hidden size
``d``; a word's feature is the mean of the forward and backward hidden states,
``e_t = (h_t^fwd + h_t^bwd) / 2``.

Exported graphs handle padded batches with lengths rather than packed sequences (packing does
not export to ONNX or TensorRT; ``static_shapes=True``): the forward GRU runs over the padded batch (its states before a caption's
end never see the padding), and the backward GRU runs over each caption reversed *within its
length* (a gather), so its states also start at the caption's last real word. Training packs
the same sequences, which skips the padding's steps and gives the same states.

Eqs. (11)-(12): at level ``u`` a caption of ``L`` words is covered by ``N = u**2`` windows of
``ceil(2L / (N + 1))`` words that move by ``L / (N + 1)`` (the image rule in one dimension), and a
window's feature is the sum of its word features. Window sums are differences of prefix sums,
so one gather serves a whole padded batch; for short captions windows are clamped to at least one
word and repeat.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence


class TextEncoder(nn.Module):
    """Token ids ``(B, L)`` + lengths ``(B,)`` -> word features ``(B, L, d)`` (zero past each length)."""

    def __init__(self, vocab_size: int, word_dim: int = 300, embed_dim: int = 1024):
        super().__init__()
        self.embed = nn.Embedding(vocab_size, word_dim, padding_idx=0)
        nn.init.uniform_(self.embed.weight, -0.1, 0.1)
        self.fwd = nn.GRU(word_dim, embed_dim, batch_first=True)
        self.bwd = nn.GRU(word_dim, embed_dim, batch_first=True)

    def forward(self, ids: torch.Tensor, lengths: torch.Tensor, static_shapes: bool = False) -> torch.Tensor:
        return bidirectional_mean(self.fwd, self.bwd, self.embed(ids), lengths, static_shapes)


def bidirectional_mean(fwd: nn.GRU, bwd: nn.GRU, x: torch.Tensor, lengths: torch.Tensor,
                       static_shapes: bool = False) -> torch.Tensor:
    """Eq. (10)'s ``(h_fwd + h_bwd) / 2`` of two GRUs over ``x (B, L, D)`` with ``lengths``, zero
    past each length; the backward GRU reads each sequence reversed within its length."""
    steps = torch.arange(x.shape[1], device=x.device).unsqueeze(0)  # (1, L)
    valid = steps < lengths.unsqueeze(1)  # (B, L)
    # Reverse each sequence within its length: position t reads element (len - 1 - t).
    rev = torch.where(valid, lengths.unsqueeze(1) - 1 - steps, steps)
    gather = rev.unsqueeze(-1).expand(-1, -1, x.shape[-1])
    h_fwd = _run(fwd, x, lengths, static_shapes)
    h_bwd_rev = _run(bwd, torch.gather(x, 1, gather), lengths, static_shapes)
    h_bwd = torch.gather(h_bwd_rev, 1, rev.unsqueeze(-1).expand(-1, -1, h_bwd_rev.shape[-1]))
    out = (h_fwd + h_bwd) / 2
    return out * valid.unsqueeze(-1).to(out.dtype)


def _run(gru: nn.GRU, x: torch.Tensor, lengths: torch.Tensor, static_shapes: bool) -> torch.Tensor:
    """The GRU over the padded batch (``static_shapes``: what exports), or packed, which skips
    the padding's steps (PyTorch only; the same states at every real position)."""
    if static_shapes:
        return gru(x)[0]
    packed = pack_padded_sequence(x, lengths.cpu(), batch_first=True, enforce_sorted=False)
    return pad_packed_sequence(gru(packed)[0], batch_first=True, total_length=x.shape[1])[0]


def window_spans(lengths: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Start and end word index ``(B, n)`` of the ``n`` text windows of eqs. (11)-(12)."""
    lengths = lengths.unsqueeze(1)
    i = torch.arange(n, device=lengths.device).unsqueeze(0)
    start = torch.div(i * lengths, n + 1, rounding_mode="floor")
    size = torch.div(2 * lengths + n, n + 1, rounding_mode="floor").clamp(min=1)  # ceil(2L/(n+1))
    start = torch.minimum(start, (lengths - size).clamp(min=0))
    end = torch.minimum(start + size, lengths)
    return start, end


def text_windows(words: torch.Tensor, lengths: torch.Tensor, n: int) -> torch.Tensor:
    """Window features ``(B, n, d)``: sums of word features over each window (prefix sums)."""
    b, _, d = words.shape
    prefix = torch.cat([words.new_zeros(b, 1, d), words.cumsum(dim=1)], dim=1)  # (B, L+1, d)
    start, end = window_spans(lengths, n)
    take = lambda idx: torch.gather(prefix, 1, idx.unsqueeze(-1).expand(-1, -1, d))  # noqa: E731
    return take(end) - take(start)
