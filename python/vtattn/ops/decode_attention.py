import torch

from . import _checks


def decode_attention(q, k_cache, v_cache, lengths, *, block_table=None, scale=None):
    """One decode step of attention over a KV cache whose valid length varies per (batch, kv head).

    q: [B, Hq, 1, D]; k_cache, v_cache: [B, Hkv, L_cap, D] (any strides with a unit last dim), Hq a
    multiple of Hkv (GQA: query head h reads kv head h // (Hq // Hkv)); fp16/bf16/fp32.
    lengths: int32 [B, Hkv] on the caches' device, each in [0, L_cap]: query heads of kv head
    (b, g) attend to keys [0, lengths[b, g]) only. A length of 0 gives an all-zero output row.
    block_table: int32 [B, Hkv, max_pages] for a paged cache. k_cache, v_cache are then page pools
    [num_pages, page_size, D] (any strides with a unit last dim, k and v may differ) and token t of
    kv head (b, g) is k_cache[block_table[b, g, t // page_size], t % page_size]; lengths lie in
    [0, max_pages * page_size] and table entries past ceil(lengths / page_size) are ignored (-1 is fine).
    scale: defaults to D ** -0.5.
    Returns [B, Hq, 1, D] in q's dtype. No host synchronisation in the op itself (CUDA-graph
    safe); the eager checks of lengths (and page ids) sync once, and are skipped under
    torch.compile and while a CUDA graph is being captured. There, out-of-range lengths act clamped
    to the capacity and page ids to the pool (memory-safe); the C++ CPU kernel refuses them.
    """
    if block_table is not None:
        if _checks.checking():
            _checks.paged_decode_inputs(q, k_cache, v_cache, block_table, lengths)
        scale = _checks.resolve_scale(scale, q.shape[-1])
        return torch.ops.vtattn.paged_decode_attention(q, k_cache, v_cache, block_table, lengths, scale)
    if _checks.checking():
        _checks.decode_inputs(q, k_cache, v_cache, lengths)
    scale = _checks.resolve_scale(scale, q.shape[-1])
    return torch.ops.vtattn.decode_attention(q, k_cache, v_cache, lengths, scale)
