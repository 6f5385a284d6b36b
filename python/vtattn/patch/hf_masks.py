"""vtattn's mask function for transformers' `AttentionMaskInterface` (the masks of
`attn_implementation="vtattn"`).

transformers builds one mask per forward and mask type (`create_causal_mask`, ...) by calling the
registered function with the 2-D padding mask, the query / key lengths and offsets and a
`mask_function`. For the standard patterns (causal, sliding-window causal, bidirectional) this one
returns a `LazyMask`: a tensor that *is* SDPA's boolean mask for any code that reads it (model code
slicing or adding it, the CompressedCache, SDPA fallbacks: it is built then, once), while vtattn's
attention function reads its `spec` instead and runs `vtattn.attention` on a view of the keys, or
`varlen_attention` on the padded batch, without a dense mask. Every other pattern (token-type /
image bidirectional blocks, packed sequences, chunked attention, custom overlays), and any call
under torch.compile / tracing, gets SDPA's own mask: the attention then runs SDPA exactly."""
from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.utils import _pytree as pytree

_TRANSFORMERS: list[Any] = []  # [masking_utils, is_tracing], loaded by `load` (torch 2.11's dynamo cannot trace the import)


def load() -> list[Any]:
    """Import what the mask function needs from transformers; `register_hf_attention` calls it, outside
    any compiled region."""
    if not _TRANSFORMERS:
        from transformers import masking_utils
        from transformers.utils.import_utils import is_tracing
        _TRANSFORMERS.extend([masking_utils, is_tracing])
    return _TRANSFORMERS


@dataclass
class Plan:
    """How a mask runs on vtattn's kernels. Row i (query position q_offset + i) sits at key index
    end - Nq + i, so causal attention over keys [:end] is vtattn's end-aligned rule; keys past end
    are never visible (a static cache's empty slots). varlen: None when nothing is padded, else
    (batch index [T], key index [T], cu_seqlens_k int32 [B + 1]) of the visible keys, every query
    row kept (rows before a sequence's first key see nothing: 0, as SDPA gives them)."""
    end: int
    varlen: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None


@dataclass
class MaskSpec:
    """A standard mask: kind "causal" or "bidirectional", transformers' `sliding_window` W (key
    position > query position - W) or None, and the mask interface's arguments (to build SDPA's or
    eager's mask exactly when a fallback needs one)."""
    kind: str
    window: int | None
    kwargs: dict[str, Any]
    plan_: Plan | str | None = field(default=None, repr=False)  # Plan, or the reason none fits; None: not yet built
    dense_: dict[str, torch.Tensor | None] = field(default_factory=dict, repr=False)

    def plan(self) -> Plan | str:
        """The Plan, or a str saying why the mask does not fit one (then SDPA / eager run it).
        Built once per mask object (so once per forward and mask type), with at most one host sync."""
        if self.plan_ is None:
            self.plan_ = _plan(self)
        return self.plan_

    def sdpa(self) -> torch.Tensor | None:
        """What transformers' `sdpa_mask` returns for these arguments (None where SDPA relies on
        is_causal). Under torch.compile (a mask built outside the compiled region, e.g. compiled
        decoder layers) it is traced into the graph, never cached."""
        sdpa_mask = load()[0].sdpa_mask
        if torch.compiler.is_compiling():
            traced: torch.Tensor | None = sdpa_mask(**self.kwargs)
            return traced
        if "sdpa" not in self.dense_:
            self.dense_["sdpa"] = sdpa_mask(**self.kwargs)
        return self.dense_["sdpa"]

    def full(self) -> torch.Tensor:
        """SDPA's boolean mask [B, 1, Nq, Nk], always materialised (what model code reading the mask sees)."""
        if "full" not in self.dense_:
            sdpa_mask = load()[0].sdpa_mask
            self.dense_["full"] = sdpa_mask(**{**self.kwargs, "allow_is_causal_skip": False,
                                               "allow_is_bidirectional_skip": False})
        full = self.dense_["full"]
        assert full is not None  # built with every skip off
        return full

    def eager(self) -> torch.Tensor | None:
        """What transformers' `eager_mask` returns (additive float mask, or None)."""
        if "eager" not in self.dense_:
            self.dense_["eager"] = load()[0].eager_mask(**self.kwargs)
        return self.dense_["eager"]


class LazyMask(torch.Tensor):
    """SDPA's boolean mask [B, 1, Nq, Nk] for a standard mask, materialised on first use by any op
    (then every op runs on that dense tensor: exactly SDPA's mask). vtattn's attention reads `spec`."""
    spec: MaskSpec

    @staticmethod
    def __new__(cls, spec: MaskSpec, shape: tuple[int, ...], device: torch.device | str) -> LazyMask:
        mask = torch.Tensor._make_wrapper_subclass(cls, shape, dtype=torch.bool,
                                                   device=device)  # type: ignore[arg-type]  # a str works too
        mask.spec = spec
        return mask

    __torch_function__ = torch._C._disabled_torch_function_impl  # type: ignore[assignment]  # torch's stubs

    @classmethod
    def __torch_dispatch__(cls, func: Any, types: Any, args: tuple[Any, ...] = (),  # type: ignore[override]
                           kwargs: dict[str, Any] | None = None) -> Any:  # (torch's stubs: Tensor's is disabled)
        dense = lambda x: x.spec.full() if isinstance(x, LazyMask) else x  # noqa: E731
        return func(*pytree.tree_map(dense, args), **pytree.tree_map(dense, kwargs or {}))

    def __repr__(self) -> str:  # type: ignore[override]  # torch's stubs: Tensor's takes tensor_contents
        return f"LazyMask({self.spec.kind}, window={self.spec.window}, shape={tuple(self.shape)})"


def _closure(fn: Any, name: str) -> Any:
    names = fn.__code__.co_freevars
    return fn.__closure__[names.index(name)].cell_contents if name in names else None


def structure(mask_function: Callable[..., Any]) -> tuple[str, int | None] | None:
    """(kind, window) of a standard transformers mask function, else None. Recognised by identity
    (causal, bidirectional) and by the closures of `and_masks(sliding_window_overlay(W), causal)`."""
    mu = load()[0]
    if mask_function is mu.causal_mask_function:
        return "causal", None
    if mask_function is mu.bidirectional_mask_function:
        return "bidirectional", None
    if getattr(mask_function, "__module__", None) != mu.__name__ \
            or getattr(mask_function, "__qualname__", None) != "and_masks.<locals>.and_mask":
        return None
    parts = _closure(mask_function, "mask_functions") or ()
    windows = [_closure(f, "sliding_window") for f in parts
               if getattr(f, "__qualname__", None) == "sliding_window_overlay.<locals>.inner_mask"]
    if len(parts) != 2 or mu.causal_mask_function not in parts or len(windows) != 1:
        return None
    window = windows[0]
    return ("causal", window) if isinstance(window, int) and not isinstance(window, bool) and window > 0 else None


def mask_function(batch_size: int, q_length: int, kv_length: int, q_offset: int | torch.Tensor = 0, kv_offset: int = 0,
                  mask_function: Callable[..., Any] | None = None, attention_mask: torch.Tensor | None = None,
                  **kwargs: Any) -> torch.Tensor | None:
    """The `AttentionMaskInterface` entry of "vtattn": a LazyMask for the standard patterns, SDPA's
    own mask otherwise (and under torch.compile / tracing)."""
    mu, is_tracing = load()
    _check_interface(kwargs.get("config"))
    if mask_function is None:
        mask_function = mu.causal_mask_function
    args = dict(batch_size=batch_size, q_length=q_length, kv_length=kv_length, q_offset=q_offset,
                kv_offset=kv_offset, mask_function=mask_function, attention_mask=attention_mask, **kwargs)
    kind = structure(mask_function)
    traced = is_tracing(attention_mask) or (isinstance(q_offset, torch.Tensor) and is_tracing(q_offset))
    if kind is None or traced or not isinstance(kv_offset, int):
        mask: torch.Tensor | None = mu.sdpa_mask(**args)
        return mask
    if isinstance(q_offset, torch.Tensor):  # a static cache's length: it grows in place after this call
        args["q_offset"] = q_offset.clone()
    spec = MaskSpec(*kind, args)
    return LazyMask(spec, (batch_size, 1, q_length, kv_length), kwargs.get("device", "cpu"))


def _check_interface(config: Any) -> None:
    """Refuse a model whose modeling file attends without transformers' attention interface (it
    branches on the implementation's name itself, e.g. Falcon in transformers 5.17, and would add
    this boolean mask to its eager logits)."""
    if config is None:
        return
    name = type(config).__module__.replace(".configuration_", ".modeling_")
    module = sys.modules.get(name)
    if module is not None and not hasattr(module, "ALL_ATTENTION_FUNCTIONS"):
        raise NotImplementedError(f"attn_implementation='vtattn' needs a model that attends through transformers' "
                                  f"attention interface; {name} does not (use 'sdpa' or 'eager')")


def _plan(spec: MaskSpec) -> Plan | str:
    """Plan for `spec`, or why none fits (one host sync at most: the offsets / padding statistics)."""
    a = spec.kwargs
    B, Nq, Nk, kv_offset = a["batch_size"], a["q_length"], a["kv_length"], a["kv_offset"]
    q_offset, padding = a["q_offset"], a["attention_mask"]
    causal = spec.kind == "causal"
    device = padding.device if padding is not None else (
        q_offset.device if isinstance(q_offset, torch.Tensor) else torch.device("cpu"))
    end = q_offset + Nq - kv_offset if causal else Nk  # int, or a 0-d tensor (static caches)
    if padding is None:
        end = int(end)  # the one sync, for a tensor offset
        return Plan(end) if Nq <= end <= Nk else f"queries at keys [{end - Nq}, {end}) of {Nk}"
    keys = torch.arange(Nk, device=device)
    valid = padding[:, kv_offset:kv_offset + Nk].bool()
    if valid.shape[1] < Nk:
        valid = torch.nn.functional.pad(valid, (0, Nk - valid.shape[1]))
    if causal:
        valid = valid & (keys < end)
    counts = valid.sum(1)
    if causal and spec.window is not None:
        # Distances must survive packing: the visible keys are one block ending at `end`.
        ok = (valid == ((keys >= end - counts[:, None]) & (keys < end))).all()
    elif causal:
        # Packing keeps the order, so holes are fine as long as each query row i still has exactly
        # as many real keys up to its own position as the end-aligned rule gives it in the packed
        # sequence: max(0, i + count - Nq + 1). Fails where a query is itself padding (right padding).
        rows = torch.arange(Nq, device=device)
        seen = valid.cumsum(1).gather(1, (rows + end - Nq).clamp(0, Nk - 1).expand(B, Nq))
        ok = (seen == (rows + counts[:, None] - Nq + 1).clamp(min=0)).all()
    else:
        ok = torch.ones((), dtype=torch.bool, device=device)
    stats = [torch.as_tensor(end, device=device).reshape(()), counts.sum(), (counts == end).all(), ok]
    end, total, whole, ok = torch.stack([s.to(torch.int64) for s in stats]).tolist()
    if not Nq <= end <= Nk:
        return f"queries at keys [{end - Nq}, {end}) of {Nk}"
    if whole:
        return Plan(end)
    if not ok:
        return "padding among the queries (right padding)" if spec.window is None else \
            "padding not one block ending at the queries, under a sliding window"
    flat = torch.nonzero_static(valid.flatten(), size=total)[:, 0]
    cu_k = torch.nn.functional.pad(counts.cumsum(0, dtype=torch.int32), (1, 0))
    return Plan(end, (flat // Nk, flat % Nk, cu_k))
