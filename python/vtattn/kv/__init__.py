"""Multimodal KV-cache compression: prefill keep-set policies (policies.py) and budgets
(budgets.py). Budgets per layer come from one policy per layer, e.g.
`[kv.SnapKV(b) for b in kv.pyramid(num_layers, 0.2)]`."""
from . import budgets
from .budgets import pyramid
from .policies import H2O, AdaKV, KeepSet, KeyNorm, LookM, Modality, SnapKV, StreamingLLM

__all__ = ["KeepSet", "LookM", "SnapKV", "H2O", "KeyNorm", "StreamingLLM", "Modality", "AdaKV", "pyramid", "budgets"]
