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
from .pages import Pages, _device

_MAX_LOGITS = 1 << 25  # fp32 logits per chunk of queries (128 MiB)
# the prompt's scores: the cache's own prefill arguments, valid by construction (no checks, whose reads sync)
_KEY_IMPORTANCE: Direct[torch.Tensor] = Direct("key_importance")


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


def evict(pages: Pages, queries: torch.Tensor, start: int, base: npt.NDArray[np.int64], recent: int) -> None:
    """Add the mass of queries [B, Hq, n, D] (scaled for the default scale, at positions
    start..start+n-1) to `pages`' scores and evict down to `base` (numpy int64 [B, Hkv]), in place
    (`Pages.compact`). Every count is the host's (`pages.host_lengths`): the masks are built there
    (no host sync, few device ops: on a GPU each is a launch)."""
    lengths = pages.host_lengths
    B, H = lengths.shape
    D, device = pages.k.shape[-1], pages.k.device
    Lm = int(lengths.max()) if lengths.size else 0
    cols = np.arange(Lm)
    valid = cols < lengths[..., None]
    flat = _device(np.where(valid, pages.host_start[..., None] + cols, 0).ravel(), device)  # each head's slots
    hidden = _device(~valid, device)
    pos = pages.pos.view(-1).index_select(0, flat).view(B, H, Lm)
    keys = pages.k.view(-1, D).index_select(0, flat).view(B, H, Lm, D).float()
    Hq, n = queries.shape[1], queries.shape[2]
    G = Hq // H
    q = queries.view(B, H, G, n, D).float() * D ** -0.5
    # a key is hidden from query i when it is padding or comes after it (position past start + i)
    last = pos.masked_fill(hidden, np.iinfo(np.int64).max)[:, :, None, None]
    qpos = _device(np.arange(start, start + n), device)[:, None]
    mass: torch.Tensor | None = None
    step = max(1, _MAX_LOGITS // max(1, B * Hq * Lm))
    for i in range(0, n, step):
        s = q[:, :, :, i:i + step] @ keys[:, :, None].transpose(-1, -2)  # [B, H, G, c, Lm]
        part = s.masked_fill(last > qpos[i:i + step], float("-inf")).softmax(-1).sum((2, 3))
        mass = part if mass is None else mass + part
    assert pages.score is not None and mass is not None  # DecodeH2O layers keep scores; n >= 1
    score = (pages.score.view(-1).index_select(0, flat).view(B, H, Lm) + mass / G).masked_fill(hidden, 0)

    # Each head drops its `drop` lowest-scored tokens outside its last `recent` (ties: the older first)
    drop = np.maximum(np.minimum(lengths - base, lengths - recent), 0)
    counts = lengths - drop
    outside = _device(cols >= (lengths - recent)[..., None], device)  # the window and padding: never dropped
    order = score.masked_fill(outside, float("inf")).argsort(dim=-1, stable=True)  # candidates, lowest first
    gone = torch.zeros_like(hidden).scatter(-1, order, _device(cols < drop[..., None], device)) | hidden
    K = int(counts.max()) if counts.size else 0
    kept = gone.argsort(dim=-1, stable=True)[..., :K]  # each head's kept tokens first, ascending
    pages.compact(kept, counts, score.gather(-1, kept))
