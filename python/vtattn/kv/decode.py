"""Decode-time eviction, H2O-style, for layers whose policy is a `DecodeH2O` (policies.py): it
keeps a `CompressedCache` layer at a constant size while it generates.

A token's score is the attention mass it has received (GQA mean): from every prompt row, then from
every decode query. H2O adds each step's attention row to the scores and evicts one token; here
the cache keeps the last `every` decode queries and, every `every` tokens, computes their rows in
one pass over the kept keys (exact: no eviction happened since those queries ran, so the keys they
saw are the cache's keys at positions <= theirs), adds them, and evicts `every` tokens per head.
every=1 is H2O's per-step rule. The pass costs what `every` decode steps' attention costs, in
fp32, plus moving each head's kept tokens to the front of its own pages (no new pages)."""
import numpy as np
import numpy.typing as npt
import torch

from ..ops.key_importance import key_importance
from .policies import H2O, AdaKV, DecodeH2O, LookM, Modality, Policy
from .pages import Pages

_MAX_LOGITS = 1 << 25  # fp32 logits per chunk of queries (128 MiB)


def prompt_mass(policy: DecodeH2O, ranked: torch.Tensor | None, q: torch.Tensor, k: torch.Tensor,
                lse: torch.Tensor) -> torch.Tensor:
    """fp32 [B, Hkv, L]: the mass every prompt row gives each key, GQA mean. `ranked`, the scores
    the prefill policy ranked by (None when it ran per sample for padding), when they are exactly
    that (LOOK-M, H2O with reduce="mean")."""
    inner: Policy = policy.policy
    while isinstance(inner, (AdaKV, Modality)):
        inner = inner.policy
    if ranked is not None and isinstance(inner, (LookM, H2O)) and inner.reduce == "mean":
        return ranked
    B, Hkv, L = k.shape[:3]
    real = ~torch.isposinf(lse[:, 0])  # padded rows carry LSE +inf (cache._prefill_attention): left out
    return key_importance(q, k, rows=real, lse=lse, causal=True).view(B, Hkv, -1, L).mean(2)


def evict(pages: Pages, queries: torch.Tensor, start: int, base: npt.NDArray[np.int64], recent: int) -> None:
    """Add the mass of queries [B, Hq, n, D] (scaled for the default scale, at positions
    start..start+n-1) to `pages`' scores and evict down to `base` (numpy int64 [B, Hkv]), in place
    (`Pages.compact`). The counts are the host's (`pages.host_lengths`): no host sync."""
    slots = pages.slots()
    B, H, Lm = slots.shape
    D = pages.k.shape[-1]
    valid, flat = slots >= 0, slots.clamp(min=0)
    pos = pages.pos.view(-1)[flat]
    keys = pages.k.view(-1, D)[flat].float()
    Hq, n = queries.shape[1], queries.shape[2]
    G = Hq // H
    q = queries.view(B, H, G, n, D).float()
    mass = torch.zeros(B, H, Lm, device=slots.device)
    step = max(1, _MAX_LOGITS // max(1, B * Hq * Lm))
    for i in range(0, n, step):
        qpos = start + torch.arange(i, min(i + step, n), device=slots.device)
        s = (q[:, :, :, i:i + step] * D ** -0.5) @ keys[:, :, None].transpose(-1, -2)  # [B, H, G, c, Lm]
        s = s.masked_fill(~valid[:, :, None, None] | (pos[:, :, None, None] > qpos[:, None]), float("-inf"))
        mass += s.softmax(-1).sum((2, 3)) / G
    assert pages.score is not None  # DecodeH2O layers keep scores
    score = torch.where(valid, pages.score.view(-1)[flat] + mass, 0)

    lengths = pages.host_lengths
    drop = np.maximum(np.minimum(lengths - base, lengths - recent), 0)
    t = torch.arange(Lm, device=slots.device)
    candidate = t < (pages.lengths[..., None] - recent)
    order = score.masked_fill(~candidate, float("inf")).argsort(dim=-1, stable=True)  # lowest first
    rank = torch.empty_like(order).scatter_(-1, order, t.expand(B, H, Lm))
    keep = valid & ~(candidate & (rank < torch.from_numpy(drop).to(slots.device, non_blocking=True)[..., None]))
    counts = lengths - drop
    K = int(counts.max()) if counts.size else 0
    kept = torch.where(keep, t, Lm).sort(-1).values[..., :K].clamp(max=max(Lm - 1, 0))  # ascending
    pages.compact(kept, counts, score.gather(-1, kept))
