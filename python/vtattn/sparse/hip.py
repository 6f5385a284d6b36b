"""HiP, Hierarchically Pruned Attention (Lee et al., 2024/2025), at block granularity: per query block a
tree search that halves key ranges and keeps the best k branches by a representative score, so mask
generation is O(N log N) and every key range is looked at. Written from the paper (Algorithm 1) and the
authors' release (DeepAuto-AI/hip-attention); differences in docs/sparse.md. Causal prefill
self-attention (Nq = Nk = N).

For query block m (candidate key blocks 0 .. m), the first `sink_blocks` and the last `window_blocks`
(ending at m) are always listed; the others, [s0, e0), are searched when there are more than k of them:
1. split [s0, e0) into min(2k, e0 - s0) chunks of (nearly) equal size (bounds s0 + floor(i * L / n));
2. score each chunk by its representative: the `rep_tokens` keys centred in its token range; the score is
   the largest logit q_i . k_j over the block's query rows i and those keys (causal j <= i);
3. keep the k best chunks (ties: the lower chunk first); stop when all are single blocks, else split each
   kept chunk of several blocks in two halves (lo, lo + size // 2), (lo + size // 2, hi) and go to 2.
The result lists at most k + sink_blocks + window_blocks key blocks per query block.

Cost (FLOPs, per batch and query head): about sum over query blocks of iterations * 2k * block_size *
rep_tokens * 2D, iterations = ceil(log2(L / k)) + 1 for L candidates (hip_flops computes it exactly).
"""
import torch

from ._common import causal_blocks, cdiv, check_count, check_qk, descending_rank

MAX_SCORE_ELEMENTS = 1 << 24  # logits per scoring chunk (memory bound of the vectorised search)


def search_range(m: int, sink_blocks: int, window_blocks: int) -> tuple[int, int]:
    """[s0, e0): the key blocks query block m searches (those neither sink nor window)."""
    s0 = min(sink_blocks, m + 1)
    return s0, max(s0, m + 1 - window_blocks)


def iterations(L: int, k: int) -> int:
    """Scoring rounds of a search over L > k blocks: the first over chunks of up to ceil(L / 2k) blocks,
    then one per halving of the largest kept chunk down to a single block."""
    size, rounds = cdiv(L, min(2 * k, L)), 1
    while size > 1:
        size, rounds = cdiv(size, 2), rounds + 1
    return rounds


def hip_flops(B: int, Hq: int, N: int, D: int, k_blocks: int = 8, block_size: int = 128, rep_tokens: int = 4,
              sink_blocks: int = 1, window_blocks: int = 1) -> int:
    """Estimation cost in FLOPs: every scoring round scores at most 2k chunks against the query block."""
    total = 0
    for m in range(cdiv(N, block_size)):
        s0, e0 = search_range(m, sink_blocks, window_blocks)
        if e0 - s0 > k_blocks:
            total += iterations(e0 - s0, k_blocks) * 2 * k_blocks * block_size * rep_tokens * 2 * D
    return B * Hq * total


def hip(q: torch.Tensor, k: torch.Tensor, *, k_blocks: int = 8, block_size: int = 128, rep_tokens: int = 4,
        sink_blocks: int = 1, window_blocks: int = 1, dtype: torch.dtype = torch.float32
        ) -> tuple[torch.Tensor, torch.Tensor]:
    """HiP block lists for causal prefill self-attention.

    q: [B, Hq, N, D], k: [B, Hkv, N, D] (GQA: query head h uses kv head h // (Hq // Hkv)). k_blocks: key
    blocks the search keeps per query block (>= 1); rep_tokens: keys scored per chunk (>= 1); sink_blocks /
    window_blocks: leading / trailing blocks always listed. dtype: the precision of the scores.
    Returns (kv_num_blocks int32 [B, Hq, nb], kv_indices int32 [B, Hq, nb, nb]) for
    block_sparse_attention(..., block_size=block_size, causal=True)."""
    from ._blocks import from_dense_blocks

    fn = "hip"
    check_qk(fn, q, k, block_size)
    check_count(fn, "k_blocks", k_blocks, 1)
    check_count(fn, "rep_tokens", rep_tokens, 1)
    check_count(fn, "sink_blocks", sink_blocks)
    check_count(fn, "window_blocks", window_blocks)
    return from_dense_blocks(hip_blocks(q, k, k_blocks, block_size, rep_tokens, sink_blocks, window_blocks, dtype))


def _initial_chunks(s0: torch.Tensor, L: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """lo / hi [rows, 2k] of the first split (rows with L < 2k padded with empty chunks lo = hi = -1)."""
    n = torch.clamp(L, max=2 * k)
    i = torch.arange(2 * k + 1, device=L.device)
    bounds = s0[:, None] + torch.div(i * L[:, None], n[:, None], rounding_mode="floor")
    lo, hi = bounds[:, :-1], bounds[:, 1:]
    valid = i[None, :-1] < n[:, None]
    return torch.where(valid, lo, -1), torch.where(valid, hi, -1)


def _scores(q: torch.Tensor, k: torch.Tensor, rows_b: torch.Tensor, rows_h: torch.Tensor, rows_m: torch.Tensor,
            lo: torch.Tensor, hi: torch.Tensor, bs: int, rep: int, group: int, dtype: torch.dtype) -> torch.Tensor:
    """[rows, C]: the largest logit of each chunk's representative keys against the row's query block;
    -inf for empty chunks."""
    N = q.shape[2]
    t_lo, t_hi = lo * bs, torch.clamp(hi * bs, max=N)
    start = torch.maximum(t_lo, torch.minimum((t_lo + t_hi) // 2 - rep // 2, t_hi - rep))
    keys = start[..., None] + torch.arange(rep, device=q.device)  # [rows, C, rep]
    key_ok = (keys < t_hi[..., None]) & (lo >= 0)[..., None]
    keys = keys.clamp(0, N - 1)
    qrows = rows_m[:, None] * bs + torch.arange(bs, device=q.device)  # [rows, bs]
    q_ok = qrows < N
    qb = q[rows_b[:, None], rows_h[:, None], qrows.clamp(max=N - 1)].to(dtype)  # [rows, bs, D]
    kb = k[rows_b[:, None, None], (rows_h // group)[:, None, None], keys].to(dtype)  # [rows, C, rep, D]
    logits = torch.einsum("rqd,rcpd->rcqp", qb, kb)
    ok = key_ok[:, :, None, :] & q_ok[:, None, :, None] & (keys[:, :, None, :] <= qrows[:, None, :, None])
    return logits.masked_fill(~ok, float("-inf")).amax((-1, -2))


def _search(q: torch.Tensor, k: torch.Tensor, rows_b: torch.Tensor, rows_h: torch.Tensor, rows_m: torch.Tensor,
            s0: torch.Tensor, L: torch.Tensor, kk: int, bs: int, rep: int, group: int, dtype: torch.dtype, nb: int
            ) -> torch.Tensor:
    """bool [rows, nb] of the k blocks the search keeps for each row (L > k everywhere)."""
    lo, hi = _initial_chunks(s0, L, kk)
    while True:
        score = _scores(q, k, rows_b, rows_h, rows_m, lo, hi, bs, rep, group, dtype)
        keep = descending_rank(score) < kk  # chunks are in ascending lo order: ties to the lower chunk
        pos = torch.sort(torch.where(keep, torch.arange(lo.shape[1], device=lo.device), lo.shape[1]),
                         dim=-1).values[:, :kk]  # kept chunks, in lo order
        lo, hi = lo.gather(1, pos), hi.gather(1, pos)
        size = hi - lo
        if bool((size == 1).all()):
            return torch.zeros(lo.shape[0], nb, dtype=torch.bool, device=lo.device).scatter_(1, lo, True)
        mid = lo + size // 2
        single = size == 1
        lo = torch.stack([lo, torch.where(single, -1, mid)], -1).flatten(1)
        hi = torch.stack([torch.where(single, hi, mid), torch.where(single, -1, hi)], -1).flatten(1)


def hip_blocks(q: torch.Tensor, k: torch.Tensor, k_blocks: int, block_size: int, rep_tokens: int, sink_blocks: int,
               window_blocks: int, dtype: torch.dtype) -> torch.Tensor:
    """bool [B, Hq, nb, nb] of hip (arguments checked)."""
    B, Hq, N, D = q.shape
    group, bs, dev = Hq // k.shape[1], block_size, q.device
    nb = cdiv(N, bs)
    m = torch.arange(nb, device=dev)
    j = m[None, :]
    s0 = torch.clamp(m + 1, max=sink_blocks)
    e0 = torch.maximum(s0, m + 1 - window_blocks)
    L = e0 - s0
    # forced blocks, and every candidate where the search would keep all of them
    base = (j < s0[:, None]) | (j >= e0[:, None]) | ((L <= k_blocks)[:, None] & (j >= s0[:, None]))
    blocks = (base & causal_blocks(nb, dev)).expand(B, Hq, nb, nb).clone()
    searched = torch.nonzero(L > k_blocks).flatten()
    if searched.numel() == 0:
        return blocks
    # one row per (batch, head, searched query block), in chunks bounding the logits' memory
    bb, hh, mm = torch.meshgrid(torch.arange(B, device=dev), torch.arange(Hq, device=dev), searched, indexing="ij")
    bb, hh, mm = bb.flatten(), hh.flatten(), mm.flatten()
    per_row = 2 * k_blocks * bs * rep_tokens
    step = max(1, MAX_SCORE_ELEMENTS // per_row)
    for r0 in range(0, bb.numel(), step):
        rb, rh, rm = bb[r0:r0 + step], hh[r0:r0 + step], mm[r0:r0 + step]
        found = _search(q, k, rb, rh, rm, s0[rm], L[rm], k_blocks, bs, rep_tokens, group, dtype, nb)
        blocks[rb, rh, rm] |= found
    return blocks

