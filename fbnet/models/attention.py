"""Stacked cross attention in both directions (eqs. 13-15), batched over all image x caption pairs.

For image blocks ``v_k`` and text windows ``e_m`` (both l2-normalised), with cosines
``s_km = v_k . e_m``:

* image-grounded (eq. 13): ``s'_km = relu(s_km) / ||relu(s_.m)||_2`` (normalised over blocks),
  ``alpha_km = softmax_m(delta1 s'_km)``, attended text ``a_k = sum_m alpha_km e_m``,
  ``S^i = mean_k cos(v_k, a_k)``;
* text-grounded (eq. 14): ``s''_km = relu(s_km) / ||relu(s_k.)||_2`` (normalised over windows),
  ``beta_km = softmax_k(delta2 s''_km)``, attended image ``b_m = sum_k beta_km v_k``,
  ``S^t = mean_m cos(e_m, b_m)``;
* eq. (15): ``S = S^i + S^t``.

The attended vectors are never built. Because the units are unit vectors,
``v_k . a_k = sum_m alpha_km s_km`` and ``||a_k||^2 = alpha_k^T G alpha_k`` with the caption's
Gram matrix ``G = E E^T`` (M x M); likewise for ``b_m`` with the image's Gram matrix. Every
pair then costs O(K M (M + K)) after one ``(I K, d) x (d, C M)`` product, with no Python loop per
pair and no ``(I, C, K, d)`` tensor. Every ``(I, K, C, M)`` tensor keeps that product's layout: the
text-grounded Gram step reads it as ``(I, K, C M)`` without a copy, the image-grounded one takes one
``(C, I K, M)`` view per caption. :func:`pairwise_reference` is the plain per-pair loop.

:func:`grouped_cross_attention` scores images grouped by their number of real blocks, each group
cut to that number, so F-Net's padded box slots cost nothing (most Flickr8k images have far
fewer than 9 boxes).

The image Gram matrices cost ``K^2 d`` per image whatever the number of captions: amortised when
a call scores many captions (training, exhaustive search), but for one caption against a
shortlist of images (re-ranking a text query) they are most of the work (36 x 36 x d for F-Net
level 3 with J = 4, against 36 x 9 x d for the cosines). ``attended_images="direct"`` then builds
the attended images ``b_m = sum_k beta_km v_k`` as one ``(I, C, M, K) x (I, 1, K, d)`` product
instead, ``C M K d`` per image: the same value, cheaper while ``C M < K``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

EPS = 1e-8


def l2norm(x: torch.Tensor, dim: int) -> torch.Tensor:
    """``x / (||x||_2 + eps)`` along ``dim``, as SCAN's ``l2norm`` (a column of zeros stays zero)."""
    return x / (x.pow(2).sum(dim=dim, keepdim=True).sqrt() + EPS)


def cross_attention(
    blocks: torch.Tensor,
    block_mask: torch.Tensor,
    windows: torch.Tensor,
    delta1: float,
    delta2: float,
    attended_images: str = "gram",
    window_mask: torch.Tensor | None = None,
    direction: str = "both",
    pooling: str = "avg",
    lse_lambda: float = 6.0,
) -> torch.Tensor:
    """Similarity ``S = S^i + S^t`` of every image with every caption: ``(I, C)``.

    ``blocks (I, K, d)`` unit vectors (zero where masked), ``block_mask (I, K)`` 1 for real
    blocks, ``windows (C, M, d)`` unit vectors. ``attended_images``: ``"gram"`` (many captions
    per call) or ``"direct"`` (few captions per call; see the module doc).

    SCAN's variants (Lee et al. 2018, sec. 3), for the region-word models: ``window_mask (C, M)``
    1 for real words (zero vectors past a caption's end); ``direction`` ``"both"`` (eq. 15),
    ``"i2t"`` (``S^i`` only, SCAN's i-t) or ``"t2i"`` (``S^t`` only, SCAN's t-i); ``pooling``
    ``"avg"`` (the mean over units, as eqs. 13-14) or ``"lse"`` (SCAN's LogSumExp pooling,
    ``1/lambda_2 log sum exp(lambda_2 R)``, with ``lse_lambda`` = lambda_2).
    """
    mask = block_mask.to(blocks.dtype)
    n_img, k, d = blocks.shape
    n_cap, m, _ = windows.shape
    wmask = None if window_mask is None else window_mask.to(blocks.dtype)
    # Plain matmuls rather than einsum: exported graphs then use MatMul, which every runtime
    # optimises (ONNX Runtime's CPU Einsum is several times slower for these shapes). The
    # cosines stay in the GEMM's own (I, K, C, M) layout: no transposed copy of the largest tensor.
    sim = torch.matmul(blocks.reshape(n_img * k, d), windows.reshape(n_cap * m, d).t()).reshape(n_img, k, n_cap, m)
    pos = F.relu(sim)

    score = 0.0
    if direction in ("both", "i2t"):
        # Image-grounded: every block attends over the windows (eq. 13).
        logits_i = delta1 * l2norm(pos, dim=1)
        if wmask is not None:
            logits_i = logits_i.masked_fill(wmask[None, None] == 0, float("-inf"))
        alpha = torch.softmax(logits_i, dim=3)
        dot_i = (alpha * sim).sum(dim=3)  # v_k . a_k  (I, K, C)
        gram_c = torch.matmul(windows, windows.transpose(1, 2))  # (C, M, M)
        alpha_c = alpha.permute(2, 0, 1, 3).reshape(n_cap, n_img * k, m)  # one (I K, M) x (M, M) GEMM per caption
        len_i = (torch.bmm(alpha_c, gram_c) * alpha_c).sum(dim=2).clamp(min=0).sqrt()
        len_i = len_i.reshape(n_cap, n_img, k).permute(1, 2, 0)  # ||a_k||  (I, K, C)
        score = score + _pool(dot_i / (len_i + EPS), mask[:, :, None], 1, pooling, lse_lambda)
    if direction in ("both", "t2i"):
        # Text-grounded: every window attends over the real blocks (eq. 14).
        logits = (delta2 * l2norm(pos, dim=3)).masked_fill(mask[:, :, None, None] == 0, float("-inf"))
        beta = torch.softmax(logits, dim=1)
        dot_t = (beta * sim).sum(dim=1)  # e_m . b_m  (I, C, M)
        beta_k = beta.reshape(n_img, k, n_cap * m)
        if attended_images == "direct":
            attended = torch.matmul(beta_k.transpose(1, 2), blocks)  # b_m: (I, C M, d)
            len_t = attended.pow(2).sum(dim=2).sqrt().reshape(n_img, n_cap, m)
        else:
            gram_i = torch.bmm(blocks, blocks.transpose(1, 2))  # (I, K, K): one (K, K) x (K, C M) GEMM per image
            len_t = (torch.bmm(gram_i, beta_k).reshape(n_img, k, n_cap, m) * beta).sum(dim=1).clamp(min=0).sqrt()
        relevance = dot_t / (len_t + EPS)
        if wmask is None and pooling == "avg":
            score = score + relevance.mean(dim=2)
        else:
            words = wmask[None] if wmask is not None else torch.ones_like(relevance[:1])
            score = score + _pool(relevance, words, 2, pooling, lse_lambda)
    return score  # eq. (15) for "both"


def _pool(relevance: torch.Tensor, mask: torch.Tensor, dim: int, pooling: str, lse_lambda: float) -> torch.Tensor:
    """Relevances pooled over the real units along ``dim``: the mean (eqs. 13-14) or SCAN's
    LogSumExp pooling ``1/lambda log sum exp(lambda R)``."""
    if pooling == "lse":
        return torch.logsumexp((lse_lambda * relevance).masked_fill(mask == 0, float("-inf")), dim=dim) / lse_lambda
    return (relevance * mask).sum(dim=dim) / mask.sum(dim=dim).clamp(min=1)


def grouped_cross_attention(blocks: torch.Tensor, block_mask: torch.Tensor, windows: torch.Tensor,
                            delta1: float, delta2: float, attended_images: str = "gram", **variant) -> torch.Tensor:
    """:func:`cross_attention` computed per group of images with the same number of real blocks,
    each group cut to its own block count: padded blocks cost nothing (an image with 2 of 9
    boxes scores 2/9 of the padded work). Exact, since masked blocks never enter eqs. 13-15.
    Needs real blocks first in every row (F-Net's box order); other masks fall back to one call."""
    counts = block_mask.sum(dim=1).long()
    k = blocks.shape[1]
    prefix = bool((block_mask > 0).eq(torch.arange(k, device=blocks.device)[None, :] < counts[:, None]).all())
    distinct = torch.unique(counts).tolist()
    if not prefix or distinct == [k]:
        return cross_attention(blocks, block_mask, windows, delta1, delta2, attended_images, **variant)
    parts, order = [], []
    for n in distinct:
        rows = torch.nonzero(counts == n).flatten()
        n = max(n, 1)
        parts.append(cross_attention(blocks[rows, :n], block_mask[rows, :n], windows, delta1, delta2, attended_images,
                                     **variant))
        order.append(rows)
    return torch.cat(parts)[torch.argsort(torch.cat(order))]


def pairwise_reference(blocks, block_mask, windows, delta1: float, delta2: float, window_mask=None,
                       direction: str = "both", pooling: str = "avg", lse_lambda: float = 6.0) -> torch.Tensor:
    """The same similarity, one pair at a time with explicit attended vectors (for tests and
    benchmarks: this is how SCAN's reference evaluation scores)."""
    pool = (lambda r: torch.logsumexp(lse_lambda * r, 0) / lse_lambda) if pooling == "lse" else torch.mean
    out = torch.zeros(blocks.shape[0], windows.shape[0], dtype=blocks.dtype)
    for i in range(blocks.shape[0]):
        v = blocks[i][block_mask[i] > 0]
        for c in range(windows.shape[0]):
            e = windows[c] if window_mask is None else windows[c][window_mask[c] > 0]
            s = v @ e.T  # (K, M)
            if direction in ("both", "i2t"):
                a = torch.softmax(delta1 * l2norm(F.relu(s), dim=0), dim=1) @ e
                out[i, c] += pool(F.cosine_similarity(v, a, dim=1, eps=EPS))
            if direction in ("both", "t2i"):
                b = torch.softmax(delta2 * l2norm(F.relu(s), dim=1), dim=0).T @ v
                out[i, c] += pool(F.cosine_similarity(e, b, dim=1, eps=EPS))
    return out
