"""KV-cache compression as a stage: every prefill (a call with no cache, or an empty one) gets a
`vtattn.kv.CompressedCache` in place of its cache, whose modality is the prompt's image (and video)
tokens, and `generate` goes on with the cache the forward returns. The language model's attention
modules are routed to vtattn's attention, where each call claims the cache layer whose keys it was
handed (`core.claim`) and lets it attend over what it keeps."""
from __future__ import annotations

import functools
import inspect
import warnings
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from . import core
from .filled import Filled


@dataclass(frozen=True)
class KVCompress(core.Stage):
    """policy: a `vtattn.kv` policy for every decoder layer, or a list with one per layer (None keeps a
    layer whole)."""
    policy: Any

    def __post_init__(self) -> None:
        from ..kv.cache import CompressedCache
        CompressedCache(self.policy)  # checks the policy now

    def install(self, patch: core.Patch) -> core.Installed:
        return _KVCompress(self, patch)


class _KVCompress(core.Installed):
    phase = core.CACHE

    def __init__(self, options: KVCompress, patch: core.Patch) -> None:
        decoder = core.language_model(patch.model)
        core.check_full_attention(decoder.config)
        self.options, self.policy = options, options.policy
        # caches a prefill replaced (generate goes on with the one it returns), marked on the cache: read in
        # every step, where a set of caches would have a compiled step guard on its members
        self.replaced = Filled()
        self.uncached = False  # warned of a forward with use_cache=False
        patch.route(block.self_attn for block in decoder.layers)
        # generate's length (prompt and new tokens but the last), by the cache it made or was given: the tokens
        # it will append size the prefill's CompressedCache (a short decode then never relayouts)
        self.limits: weakref.WeakKeyDictionary[Any, int] = weakref.WeakKeyDictionary()
        self.model, self.previous = patch.model, patch.model.__dict__.get("_prepare_cache_for_generation")
        prepare: Callable[..., Any] | None = getattr(patch.model, "_prepare_cache_for_generation", None)
        if callable(prepare) and "max_cache_length" in inspect.signature(prepare).parameters:
            setattr(patch.model, "_prepare_cache_for_generation", self._noting(prepare))

    def _noting(self, prepare: Callable[..., Any]) -> Callable[..., Any]:
        signature = inspect.signature(prepare)

        @functools.wraps(prepare)
        def noted(*args: Any, **kwargs: Any) -> Any:
            out = prepare(*args, **kwargs)
            self._note(signature.bind(*args, **kwargs).arguments)
            return out
        return noted

    def _note(self, arguments: dict[str, Any]) -> None:
        """generate prepared its cache for `max_cache_length` tokens, its prompt's included."""
        kwargs, limit = arguments.get("model_kwargs"), arguments.get("max_cache_length")
        cache = core.cache_arg(kwargs)[1] if isinstance(kwargs, dict) else None
        if cache is not None and isinstance(limit, int):
            try:
                self.limits[cache] = limit
            except TypeError:  # an object without weak references (no transformers Cache): left unsized
                pass

    def uninstall(self) -> None:
        if self.previous is not None:
            setattr(self.model, "_prepare_cache_for_generation", self.previous)
        else:
            self.model.__dict__.pop("_prepare_cache_for_generation", None)

    def forward(self, call: core.Call, proceed: Callable[[core.Call], Any]) -> Any:
        """On a prefill, a CompressedCache (the caller's own, else a new one) with the call's image
        tokens as its modality; then the rest of the forward."""
        from ..kv.cache import CompressedCache
        kwargs = call.kwargs
        name, cache = call.cache()
        if cache in self.replaced and cache.get_seq_length() == 0:
            mask = kwargs.get("attention_mask")
            if mask is None or mask.shape[-1] != call.new_tokens():  # not a new prompt: a continuation with no past
                raise ValueError("this cache was replaced by a vtattn.kv.CompressedCache at the prefill and "
                                 "holds nothing: continue with the cache the prefill returned "
                                 "(outputs.past_key_values; outputs.cache from transformers 5.25 on), or "
                                 "pass none / a new cache for a new prompt")
        empty = cache is None or (cache.host_seq_length() == 0 if isinstance(cache, CompressedCache)
                                  else cache.get_seq_length() == 0)  # a static CompressedCache's would sync
        if cache is None and kwargs.get("use_cache") is False:  # no cache, nothing to compress
            if not self.uncached:
                self.uncached = True
                warnings.warn("vtattn kv=: use_cache=False keeps no cache, so nothing is compressed: each forward "
                              "attends to every token (generate(use_cache=False) is the uncompressed model's)",
                              stacklevel=2)
            return proceed(call)
        if empty:  # a prefill
            compressed = cache if isinstance(cache, CompressedCache) else CompressedCache(
                self.policy, max_new_tokens=core.static_room(cache, call.given))
            try:
                limit = None if cache is None else self.limits.pop(cache, None)
            except TypeError:  # (as in _note)
                limit = None
            if limit is not None and not compressed.static:
                compressed.upcoming = max(limit - call.given, 0)
            if cache is not None and compressed is not cache:
                self.replaced[cache] = True
            kwargs[name or call.cache_name] = compressed
            compressed.modality = call.images
        return proceed(call)

