import torch
import torch.nn.functional as F

EPS = 1e-12  # key norms are clamped to this (F.normalize): a zero key has cosine 0 with everything


def merge_tokens(x: torch.Tensor, keys: torch.Tensor, indices: torch.Tensor, mask: torch.Tensor,
                 weighted: bool) -> torch.Tensor:
    """[B, K, C] in x's dtype: kept token c = indices[b, c] (slots outside [0, N) give zero rows)
    plus every pruned token (mask False) whose key has its highest cosine similarity with c's key
    (ties to the lower kept token index): out_c = (x_c + sum_i w_i x_i) / (1 + sum_i w_i) with
    w_i = 1, or w_i = max(cos_i, 0) when `weighted`. Accumulates in fp32 (fp64 for fp64 x).
    NaN: a NaN similarity never wins (a NaN / inf key moves no other token); a token whose
    similarities are all NaN joins the lowest kept index (weight NaN when weighted). A token's x
    reaches only the slot it joins."""
    B, N, C = x.shape
    K = indices.shape[1]
    if K == 0:
        return x.new_zeros(B, 0, C)
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    valid = (indices >= 0) & (indices < N)
    idx = indices.clamp(0, max(N - 1, 0))
    kn = F.normalize(keys.to(acc), dim=-1, eps=EPS)
    sim = kn @ torch.gather(kn, 1, idx[..., None].expand(B, K, kn.shape[-1])).transpose(1, 2)  # [B, N, K]
    # argmax takes the first maximum: order the slots by kept token index (invalid slots last).
    order = torch.where(valid, idx, N).argsort(dim=1)
    sim = sim.gather(2, order[:, None, :].expand(B, N, K))
    rank = sim.masked_fill(sim.isnan() | ~valid.gather(1, order)[:, None, :], float("-inf"))
    best = rank.argmax(dim=2, keepdim=True)
    cos = sim.gather(2, best)[..., 0]  # NaN only when every similarity is
    merged = ~mask & valid.any(1, keepdim=True)
    w = cos.clamp(min=0) if weighted else torch.ones_like(cos)
    # Each merged token adds to its slot; the others go to a spare slot K, dropped (their x may be NaN).
    slot = torch.where(merged, order.gather(1, best[..., 0]), K)
    xs = x.to(acc)
    sums = xs.new_zeros(B, K + 1, C).scatter_add_(1, slot[..., None].expand(B, N, C), w[..., None] * xs)
    wsum = xs.new_zeros(B, K + 1).scatter_add_(1, slot, w)
    kept = torch.gather(xs, 1, idx[..., None].expand(B, K, C))
    out = (kept + sums[:, :K]) / (1 + wsum[:, :K])[..., None]
    return out.masked_fill(~valid[..., None], 0).to(x.dtype)
