"""Reference versions of the sparse-prefill policies: one (batch, head) at a time, loops over blocks,
written for reading, not speed. Each returns the bool block mask [B, H, Q_blocks, K_blocks] its fast
builder in vtattn.sparse must reproduce exactly (the tests compare them). Tie rule everywhere: among
equal scores the lower index ranks first."""
import math
from collections.abc import Sequence
from typing import Callable

import torch

from .flexprefill import budgets, is_dense
from .moa import MoAConfig
from .region_routing import Regions


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _mean_rows(x: torch.Tensor, lo: int, hi: int, dtype: torch.dtype) -> torch.Tensor:
    return x[lo:hi].to(dtype).mean(0)


def _top(scores: torch.Tensor | Sequence[float | torch.Tensor], count: int) -> set[int]:
    """Indices of the `count` largest scores, ties to the lower index."""
    order = sorted(range(len(scores)), key=lambda i: (-float(scores[i]), i))
    return set(order[:count])


def _cover(values: torch.Tensor, mass: float, inclusive: bool = False) -> int:
    """How many of the largest values it takes for their running sum to reach `mass` (inclusive: to
    pass it)."""
    srt = torch.sort(values, descending=True).values
    run = srt.cumsum(0)
    return min(int(((run <= mass) if inclusive else (run < mass)).sum()) + 1, len(values))


def flexprefill(q: torch.Tensor, k: torch.Tensor, *, gamma: float = 0.9, tau: float = 0.1, block_size: int = 128,
                min_budget: int | None = None, max_budget: int | None = None, scale: float | None = None,
                dtype: torch.dtype = torch.float32) -> torch.Tensor:
    B, Hq, N, D = q.shape
    g, bs = Hq // k.shape[1], block_size
    nb = _cdiv(N, bs)
    scale = D ** -0.5 if scale is None else scale
    out = torch.zeros(B, Hq, nb, nb, dtype=torch.bool)
    if is_dense(N, bs, min_budget):
        return out | torch.ones(nb, nb, dtype=torch.bool).tril()
    lo, hi = budgets(N, bs, min_budget, max_budget)
    for b in range(B):
        for h in range(Hq):
            qh, kh = q[b, h].to(dtype), k[b, h // g].to(dtype)
            last = qh[N - bs:] * scale  # the last block_size query rows, at positions N - bs .. N - 1
            att = torch.empty(bs, N, dtype=dtype)
            for i in range(bs):
                pos = N - bs + i
                s = last[i] @ kh.T
                s[pos + 1:] = float("-inf")
                att[i] = torch.softmax(s, 0)
            vertical = att.mean(0)
            slash = torch.zeros(N, dtype=dtype)  # by distance d = position - key
            for i in range(bs):
                pos = N - bs + i
                slash[:pos + 1] += att[i, :pos + 1].flip(0)
            slash = slash / bs
            slash_x = slash.flip(0)  # x = N - 1 - d, pooled in blocks from x = 0
            n_vert = min(max(_cover(vertical, gamma, True) // bs + 1, lo), hi)
            n_slash = min(max(_cover(slash_x, gamma, True) // bs + 1, lo), hi)
            k_means = torch.stack([_mean_rows(kh, j * bs, min(N, (j + 1) * bs), dtype) for j in range(nb)])
            p = torch.softmax(k_means @ last.mean(0), 0)
            v_pool = torch.stack([vertical[j * bs:(j + 1) * bs].sum() for j in range(nb)])
            mid = (p + v_pool) / 2
            kl: Callable[[torch.Tensor], float] = lambda a: sum(  # noqa: E731
                float(a[j] * torch.log(a[j] / mid[j])) for j in range(nb) if a[j] > 0)
            query_aware = math.sqrt(0.5 * kl(p) + 0.5 * kl(v_pool)) < tau
            if query_aware:
                n_vert = n_slash = lo
            s_pool = torch.stack([slash_x[t * bs:(t + 1) * bs].sum() for t in range(nb)]).flip(0)
            v_pool[0] = float("inf")
            s_pool[0] = float("inf")
            verts, slashes = _top(v_pool, n_vert), _top(s_pool, n_slash)
            for m in range(nb):
                for j in range(m + 1):
                    out[b, h, m, j] = j in verts or (m - j) in slashes
            if query_aware:
                q_means = torch.stack([_mean_rows(qh, j * bs, min(N, (j + 1) * bs), dtype) for j in range(nb)])
                pooled = torch.zeros(nb, nb, dtype=dtype)
                for m in range(nb):  # block-causal softmax: key blocks after m at -inf
                    logits = k_means @ (q_means[m] * scale)
                    logits[m + 1:] = float("-inf")
                    pooled[m] = torch.softmax(logits, 0)
                flat = pooled.flatten()
                for e in _top(flat, _cover(flat, gamma * nb)):
                    if flat[e] > 0:
                        out[b, h, e // nb, e % nb] = True
    return out


def moa(config: MoAConfig, N: int, *, layer: int = 0, block_size: int = 64, sink: int = 64, min_span: int = 128,
        max_new_tokens: int = 0) -> torch.Tensor:
    heads = len(config.alphas[layer])
    nb = _cdiv(N, block_size)
    out = torch.zeros(1, heads, nb, nb, dtype=torch.bool)
    for h in range(heads):
        total = N + max_new_tokens  # the release's cache size: moa_config_to_cache_config, split_size = block_size
        span = int(config.alphas[layer][h] + total * config.betas[layer][h])
        span = min(math.ceil(max(span, min_span) / block_size) * block_size, total)
        static = min(span, sink)
        sink_blocks, local_blocks = math.ceil(static / block_size), max(1, math.ceil((span - static) / block_size))
        for m in range(nb):
            for j in range(m + 1):
                out[0, h, m, j] = j < sink_blocks or j > m - local_blocks
    return out


def _hip_score(qh: torch.Tensor, kh: torch.Tensor, m: int, lo: int, hi: int, bs: int, rep: int, dtype: torch.dtype
               ) -> float:
    """The largest causal logit of the chunk's representative keys against query block m."""
    N = qh.shape[0]
    t_lo, t_hi = lo * bs, min(hi * bs, N)
    start = max(t_lo, min((t_lo + t_hi) // 2 - rep // 2, t_hi - rep))
    keys = torch.arange(start, min(start + rep, t_hi))
    rows = torch.arange(m * bs, min((m + 1) * bs, N))
    logits = qh[rows].to(dtype) @ kh[keys].to(dtype).T
    return float(logits.masked_fill(keys[None, :] > rows[:, None], float("-inf")).max())


def hip(q: torch.Tensor, k: torch.Tensor, *, k_blocks: int = 8, block_size: int = 128, rep_tokens: int = 4,
        sink_blocks: int = 1, window_blocks: int = 1, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    B, Hq, N, D = q.shape
    g, bs = Hq // k.shape[1], block_size
    nb = _cdiv(N, bs)
    out = torch.zeros(B, Hq, nb, nb, dtype=torch.bool)
    for b in range(B):
        for h in range(Hq):
            qh, kh = q[b, h], k[b, h // g]
            for m in range(nb):
                s0 = min(sink_blocks, m + 1)
                e0 = max(s0, m + 1 - window_blocks)
                keep = set(range(s0)) | set(range(e0, m + 1))
                L = e0 - s0
                if L <= k_blocks:
                    keep |= set(range(s0, e0))
                else:
                    n = min(2 * k_blocks, L)
                    chunks = [(s0 + i * L // n, s0 + (i + 1) * L // n) for i in range(n)]
                    while True:
                        scores = [_hip_score(qh, kh, m, lo, hi, bs, rep_tokens, dtype) for lo, hi in chunks]
                        chunks = [chunks[i] for i in sorted(_top(scores, k_blocks))]
                        if all(hi - lo == 1 for lo, hi in chunks):
                            break
                        split = []
                        for lo, hi in chunks:
                            mid = lo + (hi - lo) // 2
                            split += [(lo, hi)] if hi - lo == 1 else [(lo, mid), (mid, hi)]
                        chunks = split
                    keep |= {lo for lo, _ in chunks}
                for j in keep:
                    out[b, h, m, j] = True
    return out


def region_routing(q: torch.Tensor, k: torch.Tensor, regions: Regions, *, top_k: int = 4,
                   region_shape: tuple[int, int] = (4, 4), block_size: int = 128, causal: bool = True,
                   per_head: bool = False, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    from .region_routing import _per_sample, region_ids

    B, Hq, N, D = q.shape
    g, bs = Hq // k.shape[1], block_size
    nb = _cdiv(N, bs)
    heads = Hq if per_head else 1
    out = torch.zeros(B, heads, nb, nb, dtype=torch.bool)
    for b, grids in enumerate(_per_sample(regions, B)):
        rid = region_ids(grids, N, tuple(region_shape))
        R = int(rid.max()) + 1
        members = [torch.nonzero(rid == r).flatten() for r in range(R)]
        for hh in range(heads):
            qs = [h for h in range(Hq)] if not per_head else [hh]
            aff = torch.zeros(R, R, dtype=dtype)
            for h in qs:
                qm = torch.stack([q[b, h, t].to(dtype).mean(0) for t in members])
                km = torch.stack([k[b, h // g, t].to(dtype).mean(0) for t in members])
                aff += qm @ km.T
            routed = []
            for r in range(R):
                cand = [s for s in range(R) if not causal or int(members[s][0]) <= int(members[r][-1])]
                chosen = _top([aff[r, s] for s in cand], top_k)
                routed.append({cand[i] for i in chosen} | {r})
            sees = torch.zeros(N, N, dtype=torch.bool)
            for t in range(N):
                if rid[t] < 0:
                    sees[t] = True
                else:
                    sees[t] = rid < 0
                    for s in routed[int(rid[t])]:
                        sees[t, members[s]] = True
            for m in range(nb):
                for j in range(nb):
                    hit = bool(sees[m * bs:(m + 1) * bs, j * bs:(j + 1) * bs].any()) or m == j
                    out[b, hh, m, j] = hit and (not causal or j <= m)
    return out
