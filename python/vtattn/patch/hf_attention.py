"""`attn_implementation="vtattn"` for transformers models, and the score probes the patches use.

transformers calls `fn(module, query, key, value, attention_mask, scaling=..., dropout=..., **kw)`
with [B, H, N, D] tensors and wants `(out [B, N, H, D], weights)`. Each call runs vtattn's kernels
when they compute exactly what the model's own attention computes, and otherwise an exact fallback
(counted in `calls` with its reason):

- kernels: `vtattn.attention` (unmasked calls, and the masks of `hf_masks` without padding: causal,
  sliding-window causal, bidirectional; logit softcap, attention sinks `s_aux`) or
  `vtattn.varlen_attention` (the same masks on a padded batch);
- SDPA (transformers' own `sdpa_attention_forward`, with SDPA's own mask): relative position bias,
  dropout in training, packed-sequence kwargs, masks of other patterns, shapes the kernels lack;
- the model's own eager function (with eager's mask): what SDPA cannot do either (softcap or sinks
  with such a mask), `output_attentions=True` (returns the weights), `head_mask`, and any keyword
  this module does not know (warned once). A model without one refuses those by name.

Where no mask is given the call follows SDPA's rules exactly: causal only with more than one query,
and then over the first Nq keys (a fresh static cache hands over its whole capacity).
Where a probe asks for it, the call's LSE gives exact attention scores through
`vtattn.key_importance`, so a tower never needs eager attention.

The attention modules a `vtattn.patch` routes (`core.Patch.route`) arrive here too, with the masks
their model builds for its own implementation: SDPA's and eager's 4-D masks run SDPA exactly (an
explicit mask), masks vtattn cannot read (flash attention's 2-D padding mask, flex attention's
BlockMask) the module's own implementation ("native: ..."). Before any of that, the forward's
`core.Context` may hand the call to a stage's hook (FastV's pruned layers: "index_attention") or to
the `vtattn.kv.CompressedCache` layer whose keys these are ("cache")."""
from __future__ import annotations

import collections
import contextlib
import sys
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

import vtattn

from . import core
from .._dispatch import Direct, forced_backend
from .core import NAME
from .hf_masks import LazyMask

# Keywords a model may pass that change nothing here: flash-attention hints, what the mask already
# says, or what the module already used (encoder states for cross-attention keys); transformers'
# SDPA and eager functions ignore them too. Anything else is handled below by name, or sends the
# call to the model's eager function.
HARMLESS = frozenset({"position_ids", "use_cache", "output_hidden_states", "output_router_logits",
                      "num_items_in_batch", "return_dict", "cache_position", "deterministic", "seq_idx",
                      "encoder_hidden_states"})
HANDLED = frozenset({"softcap", "s_aux", "sliding_window", "position_bias", "head_mask", "output_attentions",
                     "cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k"})
PACKED = ("cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k")
_CACHE_KEYWORDS = HARMLESS | {"sliding_window"}  # what a CompressedCache layer's attention ignores

Output = tuple[torch.Tensor, torch.Tensor | None]  # an attention function's (out [B, N, H, D], weights)

calls: collections.Counter[str] = collections.Counter()
"""Attention calls since the last `counting()`: "attention" / "varlen_attention" (vtattn's kernels),
"index_attention" (FastV's pruned layers), "cache" (a vtattn.kv.CompressedCache layer),
"sdpa: <reason>" / "eager: <reason>" / "native: <reason>" (fallbacks)."""


@contextlib.contextmanager
def counting() -> Iterator[collections.Counter[str]]:
    """Clear `calls` and yield it (not counted under torch.compile)."""
    calls.clear()
    yield calls


@dataclass
class Probe:
    """What to record at one attention module: `scores = key_importance(q, k, rows=rows,
    reduce_heads=reduce)` ([B, N] fp32; none when rows is None) and, with `keys=True`, the
    module's attention keys head-concatenated ([B, N, H * D]). With `parts` a list, every call's
    scores are appended to it (a module called once per image, as Qwen2-VL's ViT)."""
    rows: Any = 0
    reduce: str | None = "mean"
    keys: bool = False
    scores: torch.Tensor | None = None
    key_states: torch.Tensor | None = None
    parts: list[torch.Tensor] | None = None


@contextlib.contextmanager
def probing(probes: dict[torch.nn.Module, Probe]) -> Iterator[dict[torch.nn.Module, Probe]]:
    """Within the block, the attention modules that are keys of `probes` fill their Probe (kept in
    the forward's `core.Context`, so concurrent threads each see their own probes)."""
    with core.forward_context() as ctx:
        saved, ctx.probes = ctx.probes, {**ctx.probes, **probes}
        try:
            yield probes
        finally:
            ctx.probes = saved


def count(key: str) -> None:
    """Count one attention call under `key` in `calls` (stages' own kernels count theirs too)."""
    if not torch.compiler.is_compiling():
        calls[key] += 1


_WARNED: set[object] = set()


def _given(key: str, value: Any) -> bool:
    """Whether a keyword asks for something: None, False (and a softcap of 0) ask for nothing."""
    return value is not None and value is not False and not (key == "softcap" and value == 0)


def _warn_once(key: object, message: str) -> None:
    if key not in _WARNED and not torch.compiler.is_compiling():
        _WARNED.add(key)
        warnings.warn(message, stacklevel=3)


def attention_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                      attention_mask: Any, dropout: float = 0.0, scaling: float | None = None,
                      is_causal: bool | None = None, **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
    """vtattn's attention entry point: of `attn_implementation="vtattn"` models and of the modules a
    patch routes (`core.Patch.route`). The forward's hooks for this module run first (a stage's own
    attention, e.g. FastV's pruned layers), then a CompressedCache layer claims the keys it returned,
    then vtattn's kernels (with the forward's score probe, if any) or an exact fallback."""
    ctx = core.current()
    if ctx is not None:
        for hook in ctx.hooks.get(module, ()):
            out = hook(module, query, key, value, attention_mask, scaling, kwargs)
            if out is not None:
                if dropout or not kwargs.keys() <= _CACHE_KEYWORDS:  # (a set comparison: each step of each layer)
                    _stage_refuses(module, dropout, kwargs)
                return out, None
    layer = core.claim(key)  # keys a vtattn.kv.CompressedCache layer just returned (compiled: no context)
    if layer is not None:
        return _cached(layer, module, query, key, value, attention_mask, scaling, kwargs)
    if isinstance(attention_mask, LazyMask):
        if torch.compiler.is_compiling():  # built outside the graph: planning it would sync
            attention_mask = attention_mask.spec.sdpa()
    elif attention_mask is not None and not (isinstance(attention_mask, torch.Tensor) and attention_mask.dim() == 4):
        return _native(module, query, key, value, attention_mask, dropout, scaling, is_causal, kwargs)
    probe = ctx.probes.get(module) if ctx is not None and ctx.probes else None
    softcap = kwargs.get("softcap") or None  # 0: off, as None
    sinks = kwargs.get("s_aux")
    eager = _eager_reason(module, query, sinks, kwargs)
    run = eager or _kernel_call(module, query, key, value, attention_mask, dropout, is_causal, kwargs)
    if isinstance(run, _Run):
        if (probe is None and query.shape[2] == 1 and run.varlen is None and run.window is None and softcap is None
                and sinks is None and forced_backend() is None):
            return _decode_row(query, key, value, run.end, scaling), None
        if probe is None or run.varlen is None:
            return _run_kernel(run, query, key, value, scaling, softcap, sinks, probe), None
        run = "a padded batch"
    if probe is not None:
        raise NotImplementedError(f"vtattn score probes need vtattn's kernel on an unpadded call; this one: {run}")
    if eager is None and softcap is None and sinks is None:  # SDPA does the rest exactly
        count(f"sdpa: {run}")
        return _sdpa(module, query, key, value, attention_mask, dropout, scaling, is_causal, kwargs)
    if eager is None:  # SDPA has neither softcap nor sinks
        eager = f"{run} with {'softcap' if softcap is not None else 's_aux'}"
    return _eager(module, query, key, value, attention_mask, dropout, scaling, is_causal, kwargs, eager)


def _eager_reason(module: torch.nn.Module, query: torch.Tensor, sinks: Any, kwargs: dict[str, Any]) -> str | None:
    """Why this call must run the model's eager function, or None."""
    unknown = sorted(k for k, v in kwargs.items() if k not in HARMLESS and k not in HANDLED and _given(k, v))
    if unknown:
        return f"keyword {unknown[0]!r}"
    if kwargs.get("output_attentions"):
        return "output_attentions"
    if kwargs.get("head_mask") is not None:
        return "head_mask"
    if sinks is not None and (not isinstance(sinks, torch.Tensor) or tuple(sinks.shape) != (query.shape[1],)):
        return f"s_aux of shape {tuple(getattr(sinks, 'shape', ()))}"
    return None


@dataclass
class _Run:
    """A call vtattn's kernels compute exactly: keys [:end] (see hf_masks.Plan), FlashAttention's
    left window (None: off), and the padded batch's plan for varlen_attention (None: attention)."""
    causal: bool
    window: int | None
    end: int
    varlen: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None


def _kernel_call(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: Any,
                 dropout: float, is_causal: bool | None, kwargs: dict[str, Any]) -> _Run | str:
    """The _Run for a call vtattn's kernels compute exactly, else the reason (a str) they do not."""
    if kwargs.get("position_bias") is not None:
        return "position_bias"
    if dropout and module.training:
        return "dropout"
    if any(kwargs.get(k) is not None for k in PACKED):
        return "packed sequences (cu_seq_lens)"
    reason = _shape_reason(query, key, value)
    if reason is not None:
        return reason
    Nq, Nk = query.shape[2], key.shape[2]
    if isinstance(mask, LazyMask):
        if mask.shape[0] != query.shape[0] or mask.shape[2] != Nq or mask.shape[3] != Nk:
            return f"mask of shape {tuple(mask.shape)} for {Nq} queries and {Nk} keys"
        plan = mask.spec.plan()
        if isinstance(plan, str):
            return plan
        window = None if mask.spec.window is None else mask.spec.window - 1  # W keys = the row + W - 1 before
        run = _Run(mask.spec.kind == "causal", window, plan.end, plan.varlen)
    elif mask is not None:
        return "an explicit mask"
    else:  # SDPA's rules without a mask: causal only with several queries, aligned top-left
        causal = Nq > 1 and bool(is_causal if is_causal is not None else getattr(module, "is_causal", True))
        if causal and Nk < Nq:
            return "causal with fewer keys than queries"
        run = _Run(causal, None, Nq if causal else Nk)
    return run


def _shape_reason(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> str | None:
    if not (query.dtype == key.dtype == value.dtype) or query.dtype not in (torch.float16, torch.bfloat16,
                                                                            torch.float32):
        return f"dtypes {query.dtype}, {key.dtype}, {value.dtype}"
    if value.shape != key.shape or query.shape[0] != key.shape[0] or query.shape[-1] != key.shape[-1]:
        return f"shapes q {tuple(query.shape)}, k {tuple(key.shape)}, v {tuple(value.shape)}"
    if key.shape[1] == 0 or query.shape[1] % key.shape[1] or 0 in query.shape or key.shape[2] == 0:
        return f"shapes q {tuple(query.shape)}, k {tuple(key.shape)}"
    return None


def _run_kernel(run: _Run, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scaling: float | None,
                softcap: float | None, sinks: torch.Tensor | None, probe: Probe | None) -> torch.Tensor:
    """out [B, Nq, H, D] of the kernel call `run`. The registered ops run through `_dispatch.Direct`
    with arguments in op form (the model's own tensors, checked by `_shape_reason`): the public
    functions' checks and canonicalisation would cost every layer of every step again."""
    if run.varlen is not None:
        count("varlen_attention")
        return _varlen(query, key, value, run, scaling, softcap, sinks)
    count("attention")
    if run.end != key.shape[2]:  # (two slicing ops saved when every key is visible)
        key, value = key[:, :, :run.end], value[:, :, :run.end]
    scale = query.shape[-1] ** -0.5 if scaling is None else float(scaling)
    options = (float(softcap or 0.0), -1 if run.window is None else run.window,
               None if sinks is None else sinks.to(query.device, torch.float32).contiguous())
    out, lse = _ATTENTION(query, key, value, run.causal, scale, *options)
    if probe is not None and probe.rows is not None:
        # The LSE of this very call turns q k^T into exact probabilities, row by row. Scores feed a
        # discrete choice of tokens: no gradient flows through them.
        probe.scores = scores(query.detach(), key.detach(), probe.rows, lse.detach(), scale, run.causal, options,
                              probe.reduce)
        if probe.parts is not None:
            probe.parts.append(probe.scores)
    if probe is not None and probe.keys:
        probe.key_states = key.detach().transpose(1, 2).flatten(2)  # similarities choose, as scores do
    return out.transpose(1, 2)  # free: out is laid out [B, N, H, D] in memory


def _decode_row(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, end: int,
                scaling: float | None) -> torch.Tensor:
    """A decode step's one query row over keys [:end], [B, 1, H, D]: no LSE is asked for, so SDPA runs it
    (the aten backend's kernels, without the attention op's layers: ~35 us a layer in a CPU model's
    step, more than the kernel). A forced backend (use_backend, VTATTN_BACKEND) runs the op instead."""
    count("sdpa: a decode row")
    if end != key.shape[2]:
        key, value = key[:, :, :end], value[:, :, :end]
    out = F.scaled_dot_product_attention(query, key, value, scale=scaling, enable_gqa=query.shape[1] != key.shape[1])
    return out.transpose(1, 2)


# The registered ops in op form: (out, lse), scores, (out, lse).
_ATTENTION: Direct[tuple[torch.Tensor, torch.Tensor]] = Direct("attention")
_KEY_IMPORTANCE: Direct[torch.Tensor] = Direct("key_importance")
_VARLEN: Direct[tuple[torch.Tensor, torch.Tensor]] = Direct("varlen_attention")
_REDUCE: dict[str, Callable[[torch.Tensor, int], torch.Tensor]] = {"mean": torch.mean, "sum": torch.sum,
                                                                   "max": torch.amax}


def scores(query: torch.Tensor, key: torch.Tensor, rows: Any, lse: torch.Tensor | None, scale: float, causal: bool,
           options: tuple[float, int, torch.Tensor | None] = (0.0, -1, None), reduce: str | None = "mean"
           ) -> torch.Tensor:
    """`vtattn.key_importance(query, key, rows=rows, lse=lse, ...)` for the stages' own, valid
    arguments (rows an int row, "all", or anything the public function takes), through the
    registered op: fp32 [B, Hq, Nk], or [B, Nk] reduced over heads."""
    B, _, Nq, _ = query.shape
    if isinstance(rows, int) and not isinstance(rows, bool) and -Nq <= rows < Nq:
        index = torch.full((B, 1), rows % Nq, dtype=torch.int64, device=query.device)
    elif isinstance(rows, str) and rows == "all":
        index = None
    else:  # other forms: the public function canonicalises (and checks) them
        return vtattn.key_importance(query, key, rows=rows, lse=lse, scale=scale, causal=causal, reduce_heads=reduce,
                                     softcap=options[0] or None, window=None if options[1] < 0 else options[1],
                                     sinks=options[2])
    out = _KEY_IMPORTANCE(query, key, lse, index, causal, scale, *options)
    return out if reduce is None else _REDUCE[reduce](out, 1)


def _varlen(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, run: _Run, scaling: float | None,
            softcap: float | None, sinks: torch.Tensor | None) -> torch.Tensor:
    """A padded batch: every query row against its sequence's visible keys, packed. Calls the
    registered op: the public function's cu_seqlens checks would sync in every layer, and these
    cu_seqlens are built valid (once per mask, hf_masks.Plan)."""
    B, Hq, Nq, D = query.shape
    assert run.varlen is not None  # (`_run_kernel` sends only these here)
    batch, index, cu_k = run.varlen
    q = query.transpose(1, 2).reshape(B * Nq, Hq, D)
    k, v = (t.transpose(1, 2)[batch, index] for t in (key, value))
    cu_q = torch.arange(0, (B + 1) * Nq, Nq, dtype=torch.int32, device=query.device)
    scale = D ** -0.5 if scaling is None else float(scaling)
    out, _ = _VARLEN(q, k, v, cu_q, cu_k, Nq, run.causal, scale, float(softcap or 0.0),
                     -1 if run.window is None else run.window,
                     None if sinks is None else sinks.to(torch.float32).contiguous())
    return out.view(B, Nq, Hq, D)


def _sdpa(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: Any,
          dropout: float, scaling: float | None, is_causal: bool | None, kwargs: dict[str, Any]) -> Output:
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    if isinstance(mask, LazyMask):
        mask = mask.spec.sdpa()
    keep = {k: v for k, v in kwargs.items() if k in HARMLESS or k in ("position_bias", *PACKED)}
    out: Output = sdpa_attention_forward(module, query, key, value, mask, dropout=dropout, scaling=scaling,
                                         is_causal=is_causal, **keep)
    return out


def _eager(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: Any,
           dropout: float, scaling: float | None, is_causal: bool | None, kwargs: dict[str, Any], reason: str
           ) -> Output:
    """The model's own eager attention, with the mask eager attention would get."""
    eager = getattr(sys.modules.get(type(module).__module__), "eager_attention_forward", None)
    if eager is None:
        if reason != "output_attentions":
            raise NotImplementedError(f"attn_implementation='vtattn' cannot run {type(module).__name__} with "
                                      f"{reason}: no vtattn kernel or SDPA does, and its module has no "
                                      "eager_attention_forward")
        _warn_once(("output_attentions", type(module)),
                   f"attn_implementation='vtattn' returns no attention weights for {type(module).__name__} (its "
                   "module has no eager_attention_forward); use attn_implementation='eager' for them")
        kwargs = {k: v for k, v in kwargs.items() if k != "output_attentions"}
        return attention_forward(module, query, key, value, mask, dropout=dropout, scaling=scaling,
                                 is_causal=is_causal, **kwargs)
    if reason.startswith("keyword"):
        _warn_once((reason, type(module)), f"attn_implementation='vtattn' runs {type(module).__name__}'s eager "
                   f"attention for its {reason} (vtattn does not know it)")
    count(f"eager: {reason}")
    out, weights = eager(module, query, key, value, _eager_mask(mask, query, key, module, is_causal),
                         dropout=dropout, scaling=scaling, **kwargs)
    return out, weights if kwargs.get("output_attentions") else None  # as SDPA, unless asked for


def _eager_mask(mask: torch.Tensor | None, query: torch.Tensor, key: torch.Tensor, module: torch.nn.Module,
                is_causal: bool | None) -> torch.Tensor | None:
    """The additive mask eager attention needs for what SDPA would do with `mask` (None: SDPA's
    top-left causal rule when causal with several queries)."""
    if isinstance(mask, LazyMask):
        return mask.spec.eager()
    low = torch.finfo(query.dtype).min
    if mask is None:
        Nq, Nk = query.shape[2], key.shape[2]
        if Nq == 1 or not (is_causal if is_causal is not None else getattr(module, "is_causal", True)):
            return None
        visible = torch.ones(Nq, Nk, dtype=torch.bool, device=query.device).tril()
        return torch.zeros((), dtype=query.dtype, device=query.device).masked_fill(~visible, low)[None, None]
    if mask.dtype == torch.bool:
        return torch.zeros((), dtype=query.dtype, device=mask.device).masked_fill(~mask, low)
    return mask


def _native(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: Any,
            dropout: float, scaling: float | None, is_causal: bool | None, kwargs: dict[str, Any]) -> Output:
    """A mask vtattn cannot read (a routed module of a model on another implementation: flash
    attention's 2-D padding mask, flex attention's BlockMask): the module's own attention runs it."""
    what = f"{mask.dim()}-D mask" if isinstance(mask, torch.Tensor) else f"{type(mask).__name__} mask"
    fn = core.native(module)
    if fn is None:
        raise NotImplementedError(f"vtattn's attention cannot read a {what} ({type(module).__name__})")
    count(f"native: {what}")
    out: Output = fn(module, query, key, value, mask, dropout=dropout, scaling=scaling,
                     **({} if is_causal is None else {"is_causal": is_causal}), **kwargs)
    return out


def _cache_mask(mask: Any) -> torch.Tensor | None:
    """The mask a CompressedCache layer reads: SDPA's or eager's 4-D mask (a LazyMask as SDPA's), or a
    2-D padding mask (flash attention's) as a [B, 1, 1, N] boolean one."""
    if isinstance(mask, LazyMask):
        return mask.spec.sdpa()
    if isinstance(mask, torch.Tensor) and mask.dim() == 2:
        return mask.bool()[:, None, None, :]
    if mask is not None and not (isinstance(mask, torch.Tensor) and mask.dim() == 4):
        raise NotImplementedError(f"a vtattn.kv.CompressedCache cannot read a {type(mask).__name__} mask")
    return mask


def _stage_refuses(module: torch.nn.Module, dropout: float, kwargs: dict[str, Any]) -> None:
    """A stage's own attention (FastV's / VisualExit's / SparseVLM's / AIM's pruned layers, VAR, CMAI) is
    plain causal attention by its rule: it has no weights to return (no N x N tensor), no dropout, no
    softcap / sinks / bias, so a call asking for any of them is refused by name."""
    extra = [k for k, v in kwargs.items() if k not in _CACHE_KEYWORDS and _given(k, v)]
    if dropout:
        extra.append("dropout")
    if extra:
        raise NotImplementedError(f"{type(module).__name__}: a vtattn stage computes this layer's attention "
                                  f"(pruned keys, or its own rule), which cannot take {min(extra)}; run the "
                                  "unpatched model for it (vtattn.patch.unpatch)")


def _cached(layer: Any, module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
            mask: Any, scaling: float | None, kwargs: dict[str, Any]) -> Output:
    """A vtattn.kv.CompressedCache layer attends over what it keeps (plain causal attention only)."""
    if not kwargs.keys() <= _CACHE_KEYWORDS:  # (a set comparison: every decode step of every layer comes here)
        extra = [k for k, v in kwargs.items() if k not in _CACHE_KEYWORDS and _given(k, v)]
        if extra:
            raise NotImplementedError(f"a vtattn.kv.CompressedCache cannot attend with {min(extra)} "
                                      f"({type(module).__name__})")
    if isinstance(mask, LazyMask) and mask.spec.window is not None:
        raise NotImplementedError(f"a vtattn.kv.CompressedCache cannot attend with a sliding window "
                                  f"({type(module).__name__})")
    # decoding: the kept tokens' positions say what each query sees, not a mask
    mask = None if layer.pages is not None else _cache_mask(mask)
    count("cache")
    return layer.attend(query, key, value, mask, scaling).transpose(1, 2), None


def register_hf_attention() -> None:
    """Register "vtattn" with transformers' AttentionInterface and its mask function with
    AttentionMaskInterface (`hf_masks.mask_function`), so `attn_implementation="vtattn"` works for
    any model. Idempotent."""
    from transformers import AttentionMaskInterface
    from .hf_masks import load, mask_function
    load()
    register_attention()
    AttentionMaskInterface.register(NAME, mask_function)


_REGISTERED: list[bool] = []


def register_attention() -> None:
    """Register only the attention function, once per process: what a routed module needs (`core.Patch.route`;
    its model builds its masks with its own implementation's mask function)."""
    if not _REGISTERED:
        from transformers import AttentionInterface
        AttentionInterface.register(NAME, attention_forward)
        _REGISTERED.append(True)
