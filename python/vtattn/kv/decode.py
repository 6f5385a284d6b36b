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

from .._dispatch import Direct
from .policies import H2O, AdaKV, DecodeH2O, LookM, Modality, Policy
from .pages import Pages

# the prompt's scores: the cache's own prefill arguments, valid by construction (no checks, whose reads sync)
_KEY_IMPORTANCE: Direct[torch.Tensor] = Direct("key_importance")
# the eviction: one op on the layer's own pages and counts; `Pages.cls` stamps its backend choice
_EVICT: Direct[None] = Direct("paged_evict", by_stamp=True)


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
    # padded rows carry LSE +inf (cache._prefill_attention): left out (-1: no row)
    rows = torch.where(torch.isposinf(lse[:, 0]), -1, torch.arange(L, device=k.device))
    return _KEY_IMPORTANCE(q, k, lse, rows, True, q.shape[-1] ** -0.5, 0.0, -1, None).view(B, Hkv, -1, L).mean(2)


def evict(pages: Pages, queries: torch.Tensor, start: int, floor: npt.NDArray[np.int64], recent: int) -> None:
    """Add the mass of queries [B, Hq, n, D] (scaled for the default scale, at positions
    start..start+n-1) to `pages`' scores and evict down to `floor` (numpy int64 [B, Hkv]: each
    head's prefill length, or `recent` where that is more), in place: one `paged_evict` call, which
    also sets the pages' device counts. Each head drops its lowest-scored tokens outside its last
    `recent` (ties: the older first). Every count it reads is the host's (`pages.host_lengths`),
    passed as CPU tensors: no host sync."""
    assert pages.score is not None  # DecodeH2O layers keep scores
    lengths = pages.host_lengths
    keep = np.minimum(lengths, floor)
    _EVICT(pages.k, pages.v, pages.pos, pages.score, queries, torch.from_numpy(pages.host_start),
           torch.from_numpy(lengths), torch.from_numpy(keep), int(start), recent, queries.shape[-1] ** -0.5,
           pages.lengths, pages.next, stamp=pages.cls)
    pages.shrink(keep, floor)


class StaticEviction:
    """DecodeH2O on a static cache: the same rule on device counts, for a decode step that a compiled
    graph or a CUDA-graph replay runs without reading the host. Each step adds its query's attention
    mass to the scores (H2O's per-step accumulation: the same sums as `evict`'s batched pass); when
    `every` steps have passed since the last eviction (a device counter), each head drops its
    lowest-scored tokens outside its last `recent` back to `floor`, as `evict` (ties: the older).
    A step that evicts nothing runs the same ops (a graph has one shape), dropping zero tokens.
    The freed slots are refilled from the head's tail, not compacted in order: an eviction moves at
    most `every` rows of k and v per head (a compaction would move the head), and a head's tokens
    are no longer in position order (the kernels read each key's position). Capacity: floor + every
    per head, whatever max_new_tokens."""

    def __init__(self, pages: Pages, floor: npt.NDArray[np.int64], every: int, recent: int) -> None:
        assert pages.fixed and pages.score is not None and pages.last is not None  # a static DecodeH2O layer
        device = pages.k.device
        self.every, self.recent = every, recent
        self.floor = torch.from_numpy(floor).to(device)  # int64 [B, H]
        self.since = torch.zeros((), dtype=torch.int64, device=device)  # decode steps since the last eviction
        self.capacity = pages.last - pages.start + 1  # int64 [B, H]

    def tensors(self) -> tuple[torch.Tensor, ...]:
        return self.floor, self.since, self.capacity

    def step(self, p: Pages, q: torch.Tensor, scale: float) -> None:
        """After a one-token decode step wrote its token: q [B, Hq, 1, D] its query."""
        assert p.score is not None
        B, H = p.lengths.shape
        D, W, E = q.shape[-1], p.width, self.every
        t = torch.arange(W, device=q.device)
        n = p.lengths.long()[..., None]  # [B, H, 1], this step's token included
        cols = torch.minimum(t, self.capacity[..., None] - 1)  # columns past a head's capacity repeat its last
        slot = p.start[..., None] + cols  # [B, H, W]
        valid = t < n
        keys = p.k.view(-1, D)[slot].float()  # [B, H, W, D]
        logits = (q.reshape(B, H, -1, 1, D).float() @ keys[:, :, None].transpose(-1, -2)).squeeze(-2) * scale
        mass = logits.masked_fill(~valid[:, :, None], float("-inf")).softmax(-1).mean(2)  # [B, H, W], GQA mean
        pos = p.pos.view(-1)[slot]
        score = p.score.view(-1)[slot] + mass.masked_fill(~valid, 0)
        self.since += 1
        due = self.since >= E
        self.since.masked_fill_(due, 0)
        drop = torch.where(due, (n - self.floor[..., None]).clamp(min=0), 0)  # [B, H, 1], at most every
        keep = n - drop
        cand = valid
        if self.recent:  # outside the head's `recent` newest positions
            cutoff = torch.where(valid, pos, -1).topk(self.recent, -1).values[..., -1:]
            cand = valid & (pos < cutoff)
        # lowest score first, ties: the older (positions are unique in a head), candidates before the rest
        by_pos = torch.where(cand, pos, torch.iinfo(torch.int64).max).argsort(-1)
        ranked = torch.where(cand, score, float("nan")).gather(-1, by_pos).argsort(dim=-1, stable=True)
        gone = torch.zeros_like(valid).scatter(-1, by_pos.gather(-1, ranked), t < drop)
        # the j-th hole below `keep` takes the j-th survivor at or past it (as many of each); pairs that
        # do not exist copy the head's newest slot onto itself (never a hole when a token goes)
        holes, newest = _ranked(gone & (t < keep), E), (n - 1).expand(B, H, E)
        dst = torch.where(holes < 0, newest, holes)
        src = torch.where(holes < 0, newest, _ranked(~gone & valid & (t >= keep), E))
        at = (p.start[..., None] + dst).view(-1)
        take = (p.start[..., None] + src).view(-1)
        for pool in (p.k, p.v):
            rows = pool.view(-1, D)
            rows.index_copy_(0, at, rows.index_select(0, take))
        moved = t.expand(B, H, W).scatter(-1, dst, src)  # the column each column's token comes from
        pos = torch.where(valid & (t >= keep), -1, pos.gather(-1, moved))
        score = score.gather(-1, moved)
        flat = slot.view(-1)  # (a column past a capacity writes its head's last column's value)
        p.pos.view(-1).index_copy_(0, flat, pos.gather(-1, cols).view(-1))
        p.score.view(-1).index_copy_(0, flat, score.gather(-1, cols).view(-1))
        p.lengths.copy_(keep.squeeze(-1))
        p.next.copy_(p.start + keep.squeeze(-1))


def _ranked(mask: torch.Tensor, E: int) -> torch.Tensor:
    """int64 [B, H, E]: the columns where mask [B, H, W] is True, in order, -1 past their count (<= E)."""
    rank = torch.where(mask, (mask.cumsum(-1) - 1).clamp(max=E), E)  # (the clamp: never an index past E)
    cols = torch.arange(mask.shape[-1], device=mask.device).expand_as(rank)
    out = torch.full((*mask.shape[:-1], E + 1), -1, dtype=torch.int64, device=mask.device)
    return out.scatter(-1, rank, cols)[..., :E]
