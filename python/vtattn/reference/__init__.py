"""Pure-PyTorch specifications of every vtattn op: the ground truth the kernels are tested against."""
from .attention import attention
from .block_sparse_attention import block_sparse_attention
from .cmai_step import cmai_step
from .decode_attention import decode_attention
from .gather_tokens import gather_tokens
from .group_attention import group_attention, group_attention_chunked
from .index_attention import index_attention
from .key_importance import key_importance
from .merge_tokens import merge_tokens
from .paged_append import paged_append
from .paged_decode_attention import paged_decode_attention
from .paged_decode_step import paged_decode_step
from .paged_evict import paged_evict
from .paged_evict_step import paged_evict_step
from .select_tokens import select_tokens
from .varlen_attention import varlen_attention

__all__ = ["attention", "block_sparse_attention", "cmai_step", "decode_attention", "gather_tokens", "key_importance", "merge_tokens",
           "paged_append", "paged_decode_attention", "paged_decode_step", "paged_evict", "paged_evict_step", "select_tokens",
           "varlen_attention", "index_attention", "group_attention", "group_attention_chunked"]
