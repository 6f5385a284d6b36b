"""Prefill KV keep-set policies: one layer's prompt q [B, Hq, L, D] and k [B, Hkv, L, D] (after
RoPE) -> a KeepSet per (batch, kv head). Scores come from `vtattn.key_importance` (exact attention
mass, no L x L tensor) reduced over each GQA group (mean, or max with reduce="max").

`select(q, k, *, modality=None, lse=None, causal=True)`: modality is bool [B, L] (True = image
token) or int64 image span ids [B, L] (-1 = text); lse is the fp32 [B, Hq, L] LSE of the prompt's
attention (`vtattn.attention(..., return_lse=True)`), which saves recomputing it. `select` checks
its arguments (lse's values: one host read); `chosen(q, k, modality, lse, causal)` is the same choice
for arguments valid by construction (the cache's prefill), with no checks.

Every policy is a plan -- keys always kept (`forced`), keys it may choose (`allowed`), how many
to choose per head (`free`), scores (higher = keep) -- then a per-head top-`free`; the wrappers
`Modality` and `AdaKV` rewrite the plan or the choice and compose either way round."""
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np
import numpy.typing as npt
import torch
import torch.nn.functional as F

from .._dispatch import Direct
from ..ops import _checks
from ..ops.key_importance import _row_index
from .budgets import adakv_allocate, cap_per_image, image_spans, resolve_budget, resolve_window, tokens, top_free
from .merge import MODES, RELEASE_MODES, RULES

MERGE_MODES = (None,) + MODES
# Inside `per_prompt(memo)`: the memo of the prompt being compressed, which every layer on it shares
_PROMPT: ContextVar[dict[Any, Any] | None] = ContextVar("vtattn_kv_prompt", default=None)


@contextmanager
def per_prompt(memo: dict[Any, Any]) -> Iterator[None]:
    """Within: the plans' parts that follow from the prompt alone (its length, modality and heads: a
    window, the text tokens, the free counts), made by the first layer that compresses a prompt, are
    reused by the others (`CompressedCache.shared`'s memo: ~14 small ops a layer)."""
    token = _PROMPT.set(memo)
    try:
        yield
    finally:
        _PROMPT.reset(token)


def _prompt_only(owner: object, k: torch.Tensor, make: Callable[[], Any]) -> Any:
    """make(): what `owner`'s plan computes from the prompt alone (never from q, k's values or lse),
    from the current prompt's memo where a layer made it already."""
    memo = _PROMPT.get()
    if memo is None:
        return make()
    key = (id(owner), tuple(k.shape[:3]), k.device)  # (the memo holds the policy: its id stays its)
    if key not in memo:
        memo[key] = make()
    return memo[key]
# the scores' op: `select` checked the arguments once (`chosen`: the cache's own, valid by construction)
_KEY_IMPORTANCE: Direct[torch.Tensor] = Direct("key_importance")


@dataclass
class KeepSet:
    """indices int64 [B, Hkv, K]: kept original positions, ascending, -1 padded past counts[b, h];
    counts int64 [B, Hkv]; scores fp32 [B, Hkv, L]: the GQA-reduced scores the policy ranked by;
    host_counts: the counts as a numpy int64 array (read once, for K, or known: the cache's pages take them)."""
    indices: torch.Tensor
    counts: torch.Tensor
    scores: torch.Tensor
    host_counts: npt.NDArray[np.int64] | None = None

    @classmethod
    def from_mask(cls, keep: torch.Tensor, scores: torch.Tensor,
                  host: npt.NDArray[np.int64] | None = None) -> "KeepSet":
        """host: the counts, when the caller knows them (a fixed-size policy's from an earlier layer)."""
        L = keep.shape[-1]
        counts = keep.sum(-1)
        if host is None:
            host = counts.cpu().numpy()  # the keep-set's one host read: its width K
        pos = torch.where(keep, torch.arange(L, device=keep.device), L).sort(-1).values
        indices = pos[..., :int(host.max()) if host.size else 0]
        return cls(indices.masked_fill(indices == L, -1), counts, scores, host)

    @property
    def mask(self) -> torch.Tensor:
        """bool [B, Hkv, L]: True where kept."""
        B, H, L = self.scores.shape
        keep = torch.zeros(B, H, L + 1, dtype=torch.bool, device=self.scores.device)
        return keep.scatter(-1, torch.where(self.indices < 0, L, self.indices), True)[..., :L]  # pads -> column L


class Plan(NamedTuple):
    scores: torch.Tensor   # fp32 [B, Hkv, L]
    forced: torch.Tensor   # bool [B, Hkv, L]
    allowed: torch.Tensor  # bool [B, Hkv, L]
    free: torch.Tensor     # int64 [B, Hkv]


class Policy:
    reduce: str  # "mean" | "max" over a GQA group, for the policies that score by attention (_scores)
    # whether each (batch, kv head)'s keep-set size follows from the prompt (its length and modality) alone,
    # the scores choosing which keys but never how many (forced | top_free keeps exactly forced + min(free,
    # allowed) when the plan's sets and free do not depend on the scores): a cache then reads the sizes from
    # the device once per prompt, not once per layer
    fixed_size = False

    def select(self, q: torch.Tensor, k: torch.Tensor, *, modality: torch.Tensor | None = None,
               lse: torch.Tensor | None = None, causal: bool = True) -> KeepSet:
        _check_inputs(q, k, modality, lse)
        return self.chosen(q, k, modality, lse, causal)

    def chosen(self, q: torch.Tensor, k: torch.Tensor, modality: torch.Tensor | None, lse: torch.Tensor | None,
               causal: bool = True, sizes: npt.NDArray[np.int64] | None = None) -> KeepSet:
        """`select` for arguments valid by construction (the cache's own prefill): no checks, whose
        reads of lse would sync; the scores through the registered op. sizes: the keep-set's counts
        when known (`fixed_size`: an earlier layer's on this prompt), else read from the device."""
        plan = self._plan(q, k, modality, lse, causal)
        return KeepSet.from_mask(self._keep(plan), plan.scores, sizes)

    def _plan(self, q: torch.Tensor, k: torch.Tensor, modality: torch.Tensor | None, lse: torch.Tensor | None,
              causal: bool) -> Plan:
        raise NotImplementedError  # each policy plans

    def _keep(self, plan: Plan) -> torch.Tensor:
        return plan.forced | top_free(plan.scores, plan.allowed & ~plan.forced, plan.free)

    def _scores(self, q: torch.Tensor, k: torch.Tensor, rows: str | slice, lse: torch.Tensor | None,
                causal: bool) -> torch.Tensor:
        B, Hkv, L = k.shape[:3]
        index = _row_index(rows, B, q.shape[2], q.device, check=False)
        s = _KEY_IMPORTANCE(q, k, lse, index, causal, q.shape[-1] ** -0.5, 0.0, -1, None)
        s = s.view(B, Hkv, -1, L)
        return s.mean(2) if self.reduce == "mean" else s.amax(2)


def _check_reduce(reduce: str) -> str:
    if reduce not in ("mean", "max"):
        raise ValueError(f"reduce must be 'mean' or 'max' (over a GQA group), got {reduce!r}")
    return reduce


def _check_inputs(q: torch.Tensor, k: torch.Tensor, modality: torch.Tensor | None, lse: torch.Tensor | None) -> None:
    if not (isinstance(q, torch.Tensor) and isinstance(k, torch.Tensor) and q.dim() == 4 and k.dim() == 4):
        raise ValueError("q and k must be 4-D tensors [B, H, L, D]")
    if q.shape[0] != k.shape[0] or q.shape[2] != k.shape[2] or q.shape[3] != k.shape[3]:
        raise ValueError(f"q {tuple(q.shape)} and k {tuple(k.shape)} must agree in B, L and D "
                         "(one layer's prompt)")
    if q.shape[1] % k.shape[1]:
        raise ValueError(f"the query head count {q.shape[1]} of q must be a multiple of the kv head count "
                         f"{k.shape[1]} of k (GQA)")
    if modality is not None:
        if not isinstance(modality, torch.Tensor) or modality.shape != (q.shape[0], q.shape[2]):
            raise ValueError(f"modality must be a tensor of shape [B, L] = {(q.shape[0], q.shape[2])}, got "
                             f"{tuple(modality.shape) if isinstance(modality, torch.Tensor) else modality!r}")
        if modality.dtype != torch.bool and (modality.dtype.is_floating_point or modality.dtype.is_complex):
            raise TypeError(f"modality must be bool (True = image) or integer span ids, got {modality.dtype}")
    _checks.attention_inputs(q, k)  # (dtypes, devices), as key_importance checks them
    if lse is not None:  # and a given lse (one sync: its values)
        _checks.tensor("lse", lse, 3, (torch.float32,))
        _checks.same_device({"q": q, "lse": lse})
        if lse.shape != q.shape[:3]:
            raise ValueError(f"lse must have shape [B, Hq, L] = {tuple(q.shape[:3])}, got {tuple(lse.shape)}")
        _checks.lse_values(lse, None)


def _inner(policy: object) -> Policy:
    """A wrapper's policy: a prefill policy (decode-time eviction wraps, never is wrapped)."""
    if not isinstance(policy, Policy) or isinstance(policy, DecodeH2O):
        raise TypeError(f"policy must be a vtattn.kv prefill policy (LookM, SnapKV, ...; DecodeH2O goes outermost), "
                        f"got {type(policy).__name__}")
    return policy


def _positions(k: torch.Tensor) -> torch.Tensor:
    return torch.arange(k.shape[2], device=k.device)


def _heads(mask: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """[L] or [B, L] bool -> [B, Hkv, L]."""
    return mask.expand(k.shape[0], k.shape[2])[:, None].expand(k.shape[:3])


def _full(k: torch.Tensor, n: int) -> torch.Tensor:
    return torch.full(k.shape[:2], n, dtype=torch.int64, device=k.device)


def _window_sets(k: torch.Tensor, window: int, free: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """forced: the last `window` keys; allowed: the others; `free` of them to choose per head."""
    forced = _heads(_positions(k) >= k.shape[2] - window, k)
    return forced, ~forced, _full(k, free)


class LookM(Policy):
    """LOOK-M (text prior): score = attention mass from every prompt row. hh = int(budget * L),
    rc = int(recent * L) (or budget_tokens / recent_tokens): keep the last rc tokens, every text
    token and, where hh exceeds the text tokens outside that window, the top image tokens by score
    to fill hh.
    `merge` ("avg" | "pivotal" | "weighted" | None) is stored for the cache, which folds the
    evicted image KV into kept tokens; the keep-set does not depend on it. `merge_rule`: "vtattn"
    (every evicted image token merges, clamped weights) or "release" (LOOK-M's code: a similarity
    filter, "avg" / "weighted" only; `merge.merge_kv_release`). Needs `modality`."""
    fixed_size = True


    def __init__(self, budget: float | None = None, recent: float | None = None, merge: str | None = None, *,
                 budget_tokens: int | None = None, recent_tokens: int | None = None, reduce: str = "mean",
                 merge_rule: str = "vtattn") -> None:
        budget, recent = resolve_budget(budget, budget_tokens), resolve_window(recent, recent_tokens)
        if merge not in MERGE_MODES:
            raise ValueError(f"merge must be None, 'avg', 'pivotal' or 'weighted', got {merge!r}")
        if merge_rule not in RULES or (merge_rule == "release" and merge not in RELEASE_MODES):
            raise ValueError(f"merge_rule must be 'vtattn', or 'release' with merge 'avg' / 'weighted', got "
                             f"merge_rule={merge_rule!r} with merge={merge!r}")
        self.budget, self.recent, self.merge, self.reduce = budget, recent, merge, _check_reduce(reduce)
        self.merge_rule = merge_rule

    def _plan(self, q: torch.Tensor, k: torch.Tensor, modality: torch.Tensor | None, lse: torch.Tensor | None,
              causal: bool) -> Plan:
        if modality is None:
            raise ValueError("LookM needs modality (which prompt tokens are image tokens)")
        forced, allowed, free = _prompt_only(self, k, lambda: self._sets(k, modality))
        return Plan(self._scores(q, k, "all", lse, causal), forced, allowed, free)

    def _sets(self, k: torch.Tensor, modality: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        L = k.shape[2]
        window = _positions(k) >= L - tokens(self.recent, L)
        text = ~modality if modality.dtype == torch.bool else modality < 0  # (image_spans(modality) < 0)
        free = (tokens(self.budget, L) - (text & ~window).sum(-1)).clamp(min=0)
        forced = _heads(window | text, k)
        return forced, ~forced, free[:, None].expand(k.shape[:2])


class SnapKV(Policy):
    """SnapKV: scores = attention mass from the last `window` prompt rows, GQA-reduced, then pooled
    along the keys before the window (1-D max/avg pool of odd `kernel`, same padding, as SnapKV
    pools only those); keep the window plus the top (budget tokens - window) of the rest (none when the
    budget is under the window: the window is always kept). The
    window's own scores are returned unpooled (they are never ranked). `window` counts query rows."""
    fixed_size = True


    def __init__(self, budget: float | None = None, window: int = 32, kernel: int = 7, pool: str = "max", *,
                 budget_tokens: int | None = None, reduce: str = "mean") -> None:
        budget = resolve_budget(budget, budget_tokens)
        if isinstance(window, bool) or not isinstance(window, int) or window < 1:
            raise ValueError(f"window must be an int count of query rows >= 1, got {window!r}")
        if isinstance(kernel, bool) or not isinstance(kernel, int) or kernel < 1 or kernel % 2 == 0:
            raise ValueError(f"kernel must be an odd positive int (same-length pooling), got {kernel!r}")
        if pool not in ("max", "avg"):
            raise ValueError(f"pool must be 'max' or 'avg', got {pool!r}")
        self.budget, self.window, self.kernel, self.pool = budget, window, kernel, pool
        self.reduce = _check_reduce(reduce)

    def _plan(self, q: torch.Tensor, k: torch.Tensor, modality: torch.Tensor | None, lse: torch.Tensor | None,
              causal: bool) -> Plan:
        L, W = k.shape[2], self.window
        if W > L:
            raise ValueError(f"window={W} is larger than the prompt ({L} tokens)")
        s = self._scores(q, k, slice(L - W, L), lse, causal)
        if L > W:
            pool = F.max_pool1d if self.pool == "max" else F.avg_pool1d
            head = pool(s[..., :L - W].flatten(0, 1)[:, None], self.kernel, 1, self.kernel // 2)
            s = torch.cat([head.view(*s.shape[:2], L - W), s[..., L - W:]], -1)
        forced, allowed, free = _prompt_only(self, k, lambda: _window_sets(k, W, max(tokens(self.budget, L) - W, 0)))
        return Plan(s, forced, allowed, free)


class H2O(Policy):
    """H2O: score = accumulated attention from every prompt row (column sums); keep the last
    `recent` tokens plus the top int(budget * L) heavy hitters of the rest (or recent_tokens /
    budget_tokens)."""
    fixed_size = True


    def __init__(self, budget: float | None = None, recent: float | None = None, *, budget_tokens: int | None = None,
                 recent_tokens: int | None = None, reduce: str = "mean") -> None:
        budget, recent = resolve_budget(budget, budget_tokens), resolve_window(recent, recent_tokens)
        self.budget, self.recent, self.reduce = budget, recent, _check_reduce(reduce)

    def _plan(self, q: torch.Tensor, k: torch.Tensor, modality: torch.Tensor | None, lse: torch.Tensor | None,
              causal: bool) -> Plan:
        L = k.shape[2]
        forced, allowed, free = _prompt_only(
            self, k, lambda: _window_sets(k, tokens(self.recent, L), tokens(self.budget, L)))
        return Plan(self._scores(q, k, "all", lse, causal), forced, allowed, free)


class KeyNorm(Policy):
    """KNorm baseline: keep the keys with the LOWEST L2 norm (low-norm keys draw high attention,
    Devoto et al. 2024); scores are the negated norms so that higher still means keep."""
    fixed_size = True


    def __init__(self, budget: float | None = None, *, budget_tokens: int | None = None) -> None:
        self.budget = resolve_budget(budget, budget_tokens)

    def _plan(self, q: torch.Tensor, k: torch.Tensor, modality: torch.Tensor | None, lse: torch.Tensor | None,
              causal: bool) -> Plan:
        none = torch.zeros(k.shape[:3], dtype=torch.bool, device=k.device)
        return Plan(-k.float().norm(dim=-1), none, ~none, _full(k, tokens(self.budget, k.shape[2])))


class StreamingLLM(Policy):
    """StreamingLLM: the first `sinks` and the last `window` tokens (a prompt no longer than
    sinks + window is kept whole); scores are 1 where kept, 0 elsewhere."""
    fixed_size = True


    def __init__(self, sinks: int, window: int) -> None:
        for name, n in (("sinks", sinks), ("window", window)):
            if isinstance(n, bool) or not isinstance(n, int) or n < 0:
                raise ValueError(f"{name} must be an int >= 0, got {n!r}")
        if sinks + window == 0:
            raise ValueError("sinks + window must be >= 1")
        self.sinks, self.window = sinks, window

    def _plan(self, q: torch.Tensor, k: torch.Tensor, modality: torch.Tensor | None, lse: torch.Tensor | None,
              causal: bool) -> Plan:
        pos = _positions(k)
        forced = _heads((pos < self.sinks) | (pos >= k.shape[2] - self.window), k)
        return Plan(forced.float(), forced, ~forced, _full(k, 0))


class Modality(Policy):
    """Modality-aware limits around a policy: `keep_text` forces every text token (counted against
    the policy's chosen budget, so the total stays), `max_per_image` caps the tokens chosen by score
    in each image span (keys a policy always keeps, e.g. its window, are not capped)."""

    def __init__(self, policy: Policy, *, keep_text: bool = True, max_per_image: int | None = None) -> None:
        if max_per_image is not None and (isinstance(max_per_image, bool) or not isinstance(max_per_image, int)
                                          or max_per_image < 0):
            raise ValueError(f"max_per_image must be None or an int >= 0, got {max_per_image!r}")
        self.policy = _inner(policy)
        self.keep_text, self.max_per_image = keep_text, max_per_image
        self.fixed_size = self.policy.fixed_size  # (a cap per image keeps min(cap, the image's keys) of each)

    def _plan(self, q: torch.Tensor, k: torch.Tensor, modality: torch.Tensor | None, lse: torch.Tensor | None,
              causal: bool) -> Plan:
        if modality is None:
            raise ValueError("Modality needs modality (which prompt tokens are image tokens)")
        scores, forced, allowed, free = self.policy._plan(q, k, modality, lse, causal)
        spans = image_spans(modality)
        if self.keep_text:
            text = _heads(spans < 0, k)
            free = (free - (text & ~forced).sum(-1)).clamp(min=0)
            forced, allowed = forced | text, allowed & ~text
        if self.max_per_image is not None:
            allowed = cap_per_image(scores, allowed & ~forced, spans, self.max_per_image)
        return Plan(scores, forced, allowed, free)

    def _keep(self, plan: Plan) -> torch.Tensor:
        return self.policy._keep(plan)


class AdaKV(Policy):
    """AdaKV around a policy (SnapKV, H2O, ...): the layer's chosen budget summed over the kv heads
    is shared by one top-k over all heads, each head first getting its top int(floor * budget)
    (see `budgets.adakv_allocate`); the policy's always-kept keys stay per head."""

    def __init__(self, policy: Policy, floor: float = 0.2) -> None:
        if isinstance(floor, bool) or not isinstance(floor, (int, float)) or not 0 <= floor <= 1:
            raise ValueError(f"floor must be a fraction in [0, 1], got {floor!r}")
        self.policy, self.floor = _inner(policy), float(floor)

    def _plan(self, q: torch.Tensor, k: torch.Tensor, modality: torch.Tensor | None, lse: torch.Tensor | None,
              causal: bool) -> Plan:
        return self.policy._plan(q, k, modality, lse, causal)

    def _keep(self, plan: Plan) -> torch.Tensor:
        return plan.forced | adakv_allocate(plan.scores, plan.allowed & ~plan.forced, plan.free, self.floor)


class DecodeH2O(Policy):
    """Around a prefill policy (which chooses the prompt's keep-set as it would alone): every
    `every` decode tokens, each (batch, kv head) drops its lowest-scored tokens outside its last
    `recent` until it is back to the length the prefill left it (ties: the older goes first); a
    head never drops into its last `recent` tokens, so it settles at max(prefill length, recent).
    Must be the outermost wrapper (AdaKV/Modality go inside it). See `decode.py`."""

    def __init__(self, policy: Policy, every: int = 32, recent: int = 32) -> None:
        for name, n, low in (("every", every, 1), ("recent", recent, 0)):
            if isinstance(n, bool) or not isinstance(n, int) or n < low:
                raise ValueError(f"{name} must be an int >= {low} (decode tokens), got {n!r}")
        self.policy, self.every, self.recent = _inner(policy), every, recent
        self.fixed_size = self.policy.fixed_size

    @property
    def merge(self) -> str | None:
        merge: str | None = getattr(self.policy, "merge", None)
        return merge

    @property
    def merge_rule(self) -> str:
        rule: str = getattr(self.policy, "merge_rule", "vtattn")
        return rule

    def _plan(self, q: torch.Tensor, k: torch.Tensor, modality: torch.Tensor | None, lse: torch.Tensor | None,
              causal: bool) -> Plan:
        return self.policy._plan(q, k, modality, lse, causal)

    def _keep(self, plan: Plan) -> torch.Tensor:
        return self.policy._keep(plan)
