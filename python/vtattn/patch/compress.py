"""KV-cache compression as a stage: every prefill (a call with no cache, or an empty one) gets a
`vtattn.kv.CompressedCache` in place of its cache, whose modality is the prompt's image (and video)
tokens, and `generate` goes on with the cache the forward returns. The language model's attention
modules are routed to vtattn's attention, where each call claims the cache layer whose keys it was
handed (`core.claim`) and lets it attend over what it keeps."""
from __future__ import annotations

import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from . import core


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
        self.replaced: weakref.WeakSet[Any] = weakref.WeakSet()  # caches a prefill replaced (generate goes on
        patch.route(block.self_attn for block in decoder.layers)  # with the one it returns)

    def forward(self, call: core.Call, proceed: Callable[[core.Call], Any]) -> Any:
        """On a prefill, a CompressedCache (the caller's own, else a new one) with the call's image
        tokens as its modality; then the rest of the forward."""
        from ..kv.cache import CompressedCache
        kwargs = call.kwargs
        name, cache = call.cache()
        if cache is not None and cache in self.replaced and cache.get_seq_length() == 0:
            mask = kwargs.get("attention_mask")
            if mask is None or mask.shape[-1] != call.new_tokens():  # not a new prompt: a continuation with no past
                raise ValueError("this cache was replaced by a vtattn.kv.CompressedCache at the prefill and "
                                 "holds nothing: continue with the cache the prefill returned "
                                 "(outputs.past_key_values; outputs.cache from transformers 5.25 on), or "
                                 "pass none / a new cache for a new prompt")
        empty = cache is None or (cache.host_seq_length() == 0 if isinstance(cache, CompressedCache)
                                  else cache.get_seq_length() == 0)  # a static CompressedCache's would sync
        if empty:  # a prefill
            compressed = cache if isinstance(cache, CompressedCache) else CompressedCache(
                self.policy, max_new_tokens=_static_room(cache, call))
            if cache is not None and compressed is not cache:
                self.replaced.add(cache)
            kwargs[name or call.cache_name] = compressed
            compressed.modality = call.images
        return proceed(call)


def _static_room(cache: Any, call: core.Call) -> int | None:
    """For a static cache (generate's cache_implementation="static": fixed capacity, compileable),
    the new tokens its capacity leaves after this prompt: the CompressedCache is then static too
    (device lengths, a decode step that compiles and replays in a CUDA graph). None otherwise."""
    if cache is None or not getattr(cache, "is_compileable", False):
        return None
    limit = cache.get_max_length()
    return None if limit is None or limit < 0 else max(int(limit) - call.new_tokens(), 0)
