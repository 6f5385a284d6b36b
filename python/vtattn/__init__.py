"""vtattn: fused kernels for visual-token attention in vision-language models.

Importing vtattn registers the torch.ops.vtattn ops; it loads no compiled code and touches
no GPU (the compiled kernels load on first use; `vtattn.info()` reports on them)."""
from . import _registry  # noqa: F401  (defines torch.ops.vtattn.*)
from ._dispatch import BackendUnavailable, forced_backend, use_backend
from ._info import info
from .ops import (Selection, attention, block_sparse_attention, decode_attention, gather_tokens, group_attention,
                  index_attention, key_importance, merge_tokens, select_tokens, varlen_attention)
from . import kv, patch, pruning, sparse  # noqa: F401  (patch imports transformers on use only)

__version__ = "0.1.0"

__all__ = ["attention", "key_importance", "select_tokens", "gather_tokens", "merge_tokens", "Selection",
           "varlen_attention", "index_attention", "decode_attention", "block_sparse_attention",
           "group_attention",
           "kv", "patch", "pruning", "sparse",
           "use_backend", "forced_backend", "BackendUnavailable",
           "info", "__version__"]


def __getattr__(name: str) -> object:
    if name == "selection":  # the old name of vtattn.pruning: importing it warns and aliases
        import importlib
        return importlib.import_module(".selection", __name__)
    raise AttributeError(f"module 'vtattn' has no attribute {name!r}")
