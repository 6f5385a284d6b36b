"""Decode-time eviction, H2O-style, for layers whose policy is a `DecodeH2O` (policies.py): it
keeps a `CompressedCache` layer at a constant size while it generates.

A token's score is the attention mass it has received (GQA mean): from every prompt row, then from
every decode query. H2O adds each step's attention row to the scores and evicts one token; here
the cache keeps the last `every` decode queries and, every `every` tokens, computes their rows in
one pass over the kept keys (exact: no eviction happened since those queries ran, so the keys they
saw are the cache's keys at positions <= theirs), adds them, and evicts `every` tokens per head.
every=1 is H2O's per-step rule. The pass costs what `every` decode steps' attention costs, in
fp32, plus moving each head's kept tokens to the front of its own pages (no new pages)."""
from typing import Any

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
# DecodeH2O's step on a static cache, as `_EVICT`
_EVICT_STEP: Direct[None] = Direct("paged_evict_step", by_stamp=True)


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
    per head, whatever max_new_tokens. One `paged_evict_step` per layer and step (its C++ kernel on
    the CPU, its Triton kernel on a GPU)."""

    def __init__(self, pages: Pages, floor: npt.NDArray[np.int64], every: int, recent: int) -> None:
        p = pages
        assert p.fixed and p.score is not None and p.last is not None  # a static DecodeH2O layer
        device = p.k.device
        self.floor = torch.from_numpy(floor).to(device)  # int64 [B, H]
        self.since = torch.zeros((), dtype=torch.int64, device=device)  # decode steps since the last eviction
        self.capacity = p.last - p.start + 1  # int64 [B, H]
        self.stamp = p.cls
        # the op's arguments but the query and scale: a static layout's tensors keep their addresses
        self._pools = (p.k, p.v, p.pos, p.score)
        self._counts: tuple[Any, ...] = (p.start, self.capacity, self.floor, p.lengths, p.next, self.since, every,
                                         recent, p.width)

    def tensors(self) -> tuple[torch.Tensor, ...]:
        return self.floor, self.since, self.capacity

    def prepare(self, q: torch.Tensor, scale: float) -> None:
        """At the prefill: a compiled decode step then calls the kernel chosen now (`Direct.prepare`)."""
        _EVICT_STEP.prepare(*self._pools, q, *self._counts, scale, stamp=self.stamp)

    def step(self, q: torch.Tensor, scale: float) -> None:
        """After a one-token decode step wrote its token: q [B, Hq, 1, D] its query."""
        _EVICT_STEP(*self._pools, q, *self._counts, scale, stamp=self.stamp)
