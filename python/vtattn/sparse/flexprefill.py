"""FlexPrefill (Lai et al., ICLR 2025): per head, a query-aware or a vertical-slash block pattern,
chosen on the fly, covering a share gamma of the estimated attention. Written from the paper and the
authors' release (bytedance/FlexPrefill, flex_prefill_attention.py: get_active_blocks); deliberate
differences are listed in docs/sparse.md. Causal prefill self-attention (Nq = Nk = N).

Per query head h (kv head h // (Hq // Hkv)), with blocks of `block_size` tokens and nb blocks:
1. a_hat = softmax(scale * Q_last K^T), the last block_size query rows against every key (causal).
   vertical[j] = mean over those rows of a_hat[:, j]; slash[d] = the mean over rows of the sum along the
   diagonal at distance d (a_hat[i, pos(i) - d]).
2. Token counts passing gamma of each distribution (fewest largest entries whose sum exceeds it, as the
   release) give the numbers of vertical / slash blocks, count // block_size + 1, clamped to the budgets
   [min_budget, max_budget].
3. Pattern: p = softmax(scale * mean(Q_last) . K_block_means) over key blocks, v = vertical summed per
   block; the head is query-aware when sqrt(JS(p, v)) < tau, else vertical-slash.
4. Vertical-slash heads: the top vertical blocks by pooled vertical mass (block 0 always) -> every query
   block at or after them; the top slash blocks (distance block 0, the diagonal, always) -> blocks
   (m, m - s). Query-aware heads take the budget minimum of both, plus the fewest blocks of the pooled
   block attention softmax(scale * Q_block_means K_block_means^T) (block-causal) covering gamma * nb.
When N <= max(2 * block_size, min_budget) every causal block is listed (the authors run dense there).

Cost (FLOPs, per batch and query head): 2 * block_size * N * D for step 1 (about block_size / N of the
dense causal attention, 2 * N^2 * D), ~6 * block_size * N for its softmax and sums, 2 * nb * D for
step 3, 2 * nb^2 * D for the pooled block attention, plus N * D per kv head for the block means.
"""
from typing import Callable

import torch

from ._common import (block_means, block_sums, causal_blocks, cdiv, check_count, check_fraction, check_qk,
                      cover_count, descending_rank)


def budgets(N: int, block_size: int, min_budget: int | None, max_budget: int | None) -> tuple[int, int]:
    """(min, max) numbers of vertical / slash blocks from token budgets (authors: ceil(tokens / block_size))."""
    nb = cdiv(N, block_size)
    lo = 1 if min_budget is None else max(1, cdiv(min_budget, block_size))
    hi = nb if max_budget is None else min(nb, cdiv(max_budget, block_size))
    return lo, max(lo, hi)


def is_dense(N: int, block_size: int, min_budget: int | None) -> bool:
    """The authors' fallback: prompts this short run dense attention."""
    lo = 1 if min_budget is None else cdiv(min_budget, block_size)
    return N <= max(2 * block_size, lo * block_size)


def js_distance(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """sqrt of the Jensen-Shannon divergence of distributions along the last dim; 0 * log 0 = 0."""
    m = (p + q) / 2
    kl: Callable[[torch.Tensor], torch.Tensor] = lambda a: torch.where(  # noqa: E731
        a > 0, a * torch.log(a / m), torch.zeros_like(a)).sum(-1)
    return torch.sqrt(0.5 * kl(p) + 0.5 * kl(q))


def flexprefill_flops(B: int, Hq: int, Hkv: int, N: int, D: int, block_size: int = 128) -> int:
    """The estimation cost in FLOPs (see the module docstring)."""
    n, nb = min(block_size, N), cdiv(N, block_size)
    return B * Hq * (2 * n * N * D + 6 * n * N + 2 * nb * D + 2 * nb * nb * D) + 2 * B * Hkv * N * D


def flexprefill(q: torch.Tensor, k: torch.Tensor, *, gamma: float = 0.9, tau: float = 0.1, block_size: int = 128,
                min_budget: int | None = None, max_budget: int | None = None, scale: float | None = None,
                dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """FlexPrefill block lists for causal prefill self-attention.

    q: [B, Hq, N, D], k: [B, Hkv, N, D] (GQA: query head h uses kv head h // (Hq // Hkv)). gamma in (0, 1]:
    the attention share to cover (1 lists every causal block); tau in [0, 1]: the JS-distance threshold
    below which a head is query-aware (0: never). min_budget / max_budget: bounds in tokens of the vertical
    and slash parts. scale: D ** -0.5 by default. dtype: the precision of the estimate.
    Returns (kv_num_blocks int32 [B, Hq, nb], kv_indices int32 [B, Hq, nb, nb]) for
    block_sparse_attention(..., block_size=block_size, causal=True)."""
    from ._blocks import from_dense_blocks

    fn = "flexprefill"
    B, Hq, Hkv, N, D = check_qk(fn, q, k, block_size)
    gamma = check_fraction(fn, "gamma", gamma)
    tau = check_fraction(fn, "tau", tau, lo_open=False)
    for name, v in (("min_budget", min_budget), ("max_budget", max_budget)):
        if v is not None:
            check_count(fn, name, v, 1)
    if min_budget is not None and max_budget is not None and min_budget > max_budget:
        raise ValueError(f"{fn}: min_budget ({min_budget}) must not exceed max_budget ({max_budget})")
    return from_dense_blocks(flexprefill_blocks(q, k, gamma, tau, block_size, min_budget, max_budget,
                                                D ** -0.5 if scale is None else float(scale), dtype))


def flexprefill_blocks(q: torch.Tensor, k: torch.Tensor, gamma: float, tau: float, block_size: int,
                       min_budget: int | None, max_budget: int | None, scale: float, dtype: torch.dtype
                       ) -> torch.Tensor:
    """bool [B, Hq, nb, nb] of flexprefill (arguments checked)."""
    B, Hq, N, D = q.shape
    Hkv, g, bs = k.shape[1], Hq // k.shape[1], block_size
    nb, dev = cdiv(N, bs), q.device
    tril = causal_blocks(nb, dev)
    if is_dense(N, bs, min_budget):
        return tril.expand(B, Hq, nb, nb)
    lo, hi = budgets(N, bs, min_budget, max_budget)
    n = bs  # N > 2 * block_size here
    qf = q[:, :, N - n:].to(dtype) * scale  # [B, Hq, n, D]
    kf = k.to(dtype)
    # 1. the last rows' attention over all keys (causal), per kv-head group: [B, Hq, n, N]
    logits = (qf.view(B, Hkv, g, n, D) @ kf[:, :, None].transpose(-1, -2)).view(B, Hq, n, N)
    rows = torch.arange(N - n, N, device=dev)
    logits = logits.masked_fill(torch.arange(N, device=dev) > rows[:, None], float("-inf"))
    a = torch.softmax(logits, dim=-1)
    vertical = a.mean(-2)  # [B, Hq, N]
    # slash[d]: diagonal at distance d; as the authors, pooled over x = N - 1 - d from x = 0 upwards
    dist = rows[:, None] - torch.arange(N, device=dev)  # [n, N]: key index of row i at distance d
    diag = a.gather(-1, dist.clamp(min=0).expand(B, Hq, n, N)).masked_fill(dist < 0, 0.0)
    slash_x = diag.sum(-2).flip(-1) / n  # index x = N - 1 - d
    # 2. counts
    n_vert = torch.clamp(cover_count(vertical, gamma, inclusive=True) // bs + 1, lo, hi)
    n_slash = torch.clamp(cover_count(slash_x, gamma, inclusive=True) // bs + 1, lo, hi)
    # 3. pattern choice
    k_means = block_means(kf, bs, dtype)  # [B, Hkv, nb, D]
    k_means_q = k_means.repeat_interleave(g, 1)
    p = torch.softmax((qf.mean(-2, keepdim=True) @ k_means_q.transpose(-1, -2))[..., 0, :], dim=-1)
    v_pool = block_sums(vertical, bs)  # [B, Hq, nb]
    query_aware = js_distance(p, v_pool) < tau
    n_vert = torch.where(query_aware, lo, n_vert)
    n_slash = torch.where(query_aware, lo, n_slash)
    # 4. vertical-slash blocks
    v_pool = v_pool.clone()
    v_pool[..., 0] = float("inf")
    s_pool = block_sums(slash_x, bs).flip(-1)  # index s = distance block
    s_pool[..., 0] = float("inf")
    top_v = descending_rank(v_pool) < n_vert[..., None]  # [B, Hq, nb] over key blocks j
    top_s = descending_rank(s_pool) < n_slash[..., None]  # over distance blocks s
    m = torch.arange(nb, device=dev)
    s_of = (m[:, None] - m[None, :]).clamp(min=0)  # [m, j] -> m - j
    blocks = (top_v[:, :, None, :] | top_s[:, :, s_of]) & tril
    if bool(query_aware.any()):
        q_means = block_means(q, bs, dtype) * scale  # [B, Hq, nb, D]
        att = (q_means @ k_means_q.transpose(-1, -2)).masked_fill(~tril, float("-inf"))
        att = torch.softmax(att, dim=-1).flatten(-2)  # [B, Hq, nb * nb], each row sums to 1
        count = cover_count(att, gamma * nb)
        chosen = (descending_rank(att) < count[..., None]) & (att > 0)
        blocks = blocks | (chosen.view(B, Hq, nb, nb) & query_aware[..., None, None])
    return blocks
