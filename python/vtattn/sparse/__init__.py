"""vtattn.sparse: block lists for vtattn.block_sparse_attention.

- Converters: from_dense_blocks / to_dense_blocks (bool block masks), from_flex_block_mask /
  to_flex_block_mask (torch FlexAttention's BlockMask).
- Generic builders: topk_blocks (+ pooled_scores), sliding_window_blocks, dense_text_image_blocks.
- Sparse-prefill policies (contract names), each with a reference in vtattn.sparse.reference and its
  estimation cost in FLOPs (*_flops): flexprefill (FlexPrefill), moa (MoA; MoAConfig), hip (HiP),
  region_routing (BiFormer-style routing over image regions). They list blocks for causal prefill
  self-attention: block_sparse_attention(q, k, v, *lists, block_size=..., causal=True).
- key_importance: vtattn.key_importance under block lists (the probabilities block_sparse_attention used).
- Policy objects for the drop-in (patch.llm(model, sparse_prefill=...)): FlexPrefill, MoA, HiP,
  RegionRouting.
docs/sparse.md says when to use which.
"""
from ._blocks import (dense_text_image_blocks, from_dense_blocks, from_flex_block_mask, pooled_scores,
                      sliding_window_blocks, to_dense_blocks, to_flex_block_mask, topk_blocks)
from .flexprefill import flexprefill, flexprefill_flops
from .hip import hip, hip_flops
from .importance import key_importance
from .moa import MoAConfig, moa
from .policies import HiP, FlexPrefill, MoA, RegionRouting, SparsePrefill
from .region_routing import region_ids, region_routing, region_routing_flops

__all__ = ["from_dense_blocks", "to_dense_blocks", "from_flex_block_mask", "to_flex_block_mask", "topk_blocks",
           "pooled_scores", "sliding_window_blocks", "dense_text_image_blocks", "flexprefill", "flexprefill_flops",
           "moa", "MoAConfig", "hip", "hip_flops", "region_routing", "region_ids", "region_routing_flops",
           "SparsePrefill", "FlexPrefill", "MoA", "HiP", "RegionRouting", "key_importance"]
