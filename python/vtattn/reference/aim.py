"""AIM's two rules (Zhong et al. 2024, "AIM: Adaptive Inference of Multi-Modal LLMs via Token Merging
and Pruning"; release LaVi-Lab/AIM), in plain PyTorch: the specification `vtattn.patch.AIM` is
tested against (docs/selection.md, "AIM", has the rules and every difference from the release).

- `aim_merge`: before the LLM, each view's (image's, video frame's) tokens are merged in a few
  rounds of ToMe's bipartite soft matching on a metric (the release: the keys of the vision layer
  that reads the features, or the projected features themselves).
- `aim_importance`: inside the LLM, a token's importance is its PageRank over one layer's attention
  graph: each head's attention with its logits divided by a temperature, a uniform start, a few
  power iterations, then the root mean square over heads.
- `aim_retention`: the release's per-layer schedule of the share of visual tokens kept.
"""
from __future__ import annotations

import torch

WEIGHTS = ("mean", "size")
ORDERS = ("release", "original")


def merge_counts(n: int, removals: tuple[float | int, ...]) -> list[int]:
    """Tokens each round removes from a view of n tokens: an int is a count, a float f a share of
    the view's original n, int(n * f) (the release: n // 2 then n // 16 for images, n // 4 for
    video frames). A round removes at most half of the tokens it starts with."""
    counts, t = [], n
    for f in removals:
        r = f if isinstance(f, int) else int(n * f)
        r = max(0, min(r, t // 2))
        counts.append(r)
        t -= r
    return counts


def aim_merge(x: torch.Tensor, metric: torch.Tensor, removals: tuple[float | int, ...], *, weights: str = "mean",
              order: str = "release") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Merge x [V, N, C] (V views of N tokens) by cosine similarity of metric [V, N, Cm].

    Each round with r = merge_counts(N, removals)[i] > 0: the tokens at even places of the current
    order (sources) each find their most similar token at an odd place (destinations; ties to the
    lower place); the r sources with the highest best similarity (ties to the lower place) fold into
    their destinations, x and metric alike: a destination becomes the weighted mean of itself and
    the sources folded into it, weights 1 ("mean", the release's scatter_reduce) or the number of
    original tokens each represents ("size", ToMe). The new order is the unmerged sources, best
    similarity first, then the destinations in their order (the release's concatenation).
    order "original" sorts the result by each token's original index at the end.

    Returns (merged [V, K, C] in x's dtype, index [V, K] int64: the original token each result
    stands in for (every survivor is one of the input tokens), size [V, K] fp32: original tokens
    folded into it). Sums run in fp32."""
    if weights not in WEIGHTS:
        raise ValueError(f"weights must be one of {WEIGHTS}, got {weights!r}")
    if order not in ORDERS:
        raise ValueError(f"order must be one of {ORDERS}, got {order!r}")
    V, N, _ = x.shape
    if metric.shape[:2] != x.shape[:2]:
        raise ValueError(f"metric must have shape [V, N, *] = {tuple(x.shape[:2])}, got {tuple(metric.shape)}")
    values, keys = x.float(), metric.float()
    index = torch.arange(N, device=x.device).expand(V, N)
    size = torch.ones(V, N, dtype=torch.float32, device=x.device)
    for r in merge_counts(N, removals):
        if r == 0:
            continue
        unit = keys / keys.norm(dim=-1, keepdim=True)
        sim = unit[:, ::2] @ unit[:, 1::2].transpose(1, 2)  # [V, sources, destinations]
        best = sim.max(-1).values
        dst = sim.argmax(-1)  # the first maximum
        ranked = torch.sort(best, dim=1, descending=True, stable=True).indices
        src, unm = ranked[:, :r], ranked[:, r:]
        to = dst.gather(1, src)
        w = size if weights == "size" else torch.ones_like(size)
        wa, wb = w[:, ::2].gather(1, src), w[:, 1::2]
        total = wb.scatter_add(1, to, wa)

        def fold(t: torch.Tensor) -> torch.Tensor:
            ta, tb = t[:, ::2], t[:, 1::2]
            moved = ta.gather(1, src[..., None].expand(-1, -1, t.shape[-1])) * wa[..., None]
            merged = (tb * wb[..., None]).scatter_add(1, to[..., None].expand(-1, -1, t.shape[-1]), moved)
            kept = ta.gather(1, unm[..., None].expand(-1, -1, t.shape[-1]))
            return torch.cat([kept, merged / total[..., None]], 1)

        values, keys = fold(values), fold(keys)
        grown = size[:, 1::2].scatter_add(1, to, size[:, ::2].gather(1, src))
        size = torch.cat([size[:, ::2].gather(1, unm), grown], 1)
        index = torch.cat([index[:, ::2].gather(1, unm), index[:, 1::2]], 1)
    if order == "original":
        perm = index.argsort(1)
        values = values.gather(1, perm[..., None].expand_as(values))
        index, size = index.gather(1, perm), size.gather(1, perm)
    return values.to(x.dtype), index, size


def aim_importance(q: torch.Tensor, k: torch.Tensor, *, scale: float, tau: float = 0.1,
                   iterations: int = 5) -> torch.Tensor:
    """fp32 [B, N]: PageRank of each token over one causal attention graph (q [B, Hq, N, D], k [B,
    Hkv, N, D], GQA: head h reads kv head h // (Hq / Hkv)). Per head, M = softmax(scale * q k^T /
    tau) over the keys a row sees; d = 1/N, then `iterations` times d <- d M (d's mass flows along
    each row's attention); the score is sqrt(mean over heads of d^2)."""
    B, Hq, N, _ = q.shape
    kk = k.float().repeat_interleave(Hq // k.shape[1], dim=1)
    s = (q.float() @ kk.transpose(-1, -2)) * (scale / tau)
    causal = torch.ones(N, N, dtype=torch.bool, device=q.device).tril()
    m = torch.softmax(s.masked_fill(~causal, float("-inf")), dim=-1)
    d = torch.full((B, Hq, 1, N), 1.0 / N, device=q.device)
    for _ in range(iterations):
        d = d @ m
    return d[:, :, 0].pow(2).mean(1).sqrt()


def aim_retention(layers: int, start: int, step: float) -> tuple[float, ...]:
    """The release's schedule: after decoder layer l the share of a sample's visual tokens kept is 1
    for l < start, else max(0, 1 - (l - start + 1) * step) (LLaVA-1.5-7B: start 13, step 0.125 over
    32 layers, so none from layer 21 on; LLaVA-OneVision-7B: start 14 over 28)."""
    return tuple(1.0 if l < start else max(0.0, 1.0 - (l - start + 1) * step) for l in range(layers))


def aim_keep(n: int, rate: float) -> int:
    """Visual tokens of a sample's original n kept at a layer with retention `rate` (int truncates,
    as the release's int(keep_num))."""
    return int(n * rate)
