"""Public functions: validate arguments, then call torch.ops.vtattn.<op>."""
from .attention import attention
from .key_importance import key_importance

__all__ = ["attention", "key_importance"]
