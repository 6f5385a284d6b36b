"""Pure-PyTorch specifications of every vtattn op: the ground truth the kernels are tested against."""
from .attention import attention
from .key_importance import key_importance

__all__ = ["attention", "key_importance"]
