"""Multimodal KV-cache compression: prefill keep-set policies (policies.py), budgets (budgets.py),
LOOK-M merging (merge.py), decode-time eviction (decode.py) and `CompressedCache` (cache.py,
paged storage in pages.py), the transformers Cache that holds only what a policy kept. Budgets per
layer come from one policy per layer, e.g.
`CompressedCache([kv.SnapKV(b) for b in kv.pyramid(num_layers, 0.2)])`."""
from typing import Any

from . import budgets
from .budgets import pyramid
from .merge import merge_kv
from .policies import H2O, AdaKV, DecodeH2O, KeepSet, KeyNorm, LookM, Modality, SnapKV, StreamingLLM

__all__ = ["CompressedCache", "KeepSet", "LookM", "SnapKV", "H2O", "KeyNorm", "StreamingLLM", "Modality", "AdaKV",
           "DecodeH2O", "pyramid", "merge_kv", "budgets"]


def __getattr__(name: str) -> Any:
    if name == "CompressedCache":  # imports transformers: on use only
        from .cache import CompressedCache
        return CompressedCache
    raise AttributeError(f"module 'vtattn.kv' has no attribute {name!r}")
