"""vtattn: fused kernels for visual-token attention in vision-language models.

Importing vtattn registers the torch.ops.vtattn ops; it loads no compiled code and touches
no GPU (the compiled kernels load on first use; `vtattn.info()` reports on them)."""
from . import _registry  # noqa: F401  (defines torch.ops.vtattn.*)
from ._dispatch import BackendUnavailable, forced_backend, use_backend
from ._info import info
from .ops import attention, key_importance

__version__ = "0.1.0"

__all__ = ["attention", "key_importance", "use_backend", "forced_backend", "BackendUnavailable",
           "info", "__version__"]
