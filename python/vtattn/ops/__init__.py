"""Public functions: validate arguments, then call torch.ops.vtattn.<op>."""
from .attention import attention
from .block_sparse_attention import block_sparse_attention
from .decode_attention import decode_attention
from .gather_tokens import gather_tokens
from .group_attention import group_attention
from .index_attention import index_attention
from .key_importance import key_importance
from .merge_tokens import merge_tokens
from .select_tokens import Selection, select_tokens
from .varlen_attention import varlen_attention

__all__ = ["attention", "decode_attention", "gather_tokens", "key_importance", "merge_tokens", "select_tokens",
           "Selection", "varlen_attention", "index_attention",
           "block_sparse_attention", "group_attention"]
