import torch

from . import _checks


def decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, lengths: torch.Tensor, *,
                     block_table: torch.Tensor | None = None, scale: float | None = None) -> torch.Tensor:
    """One decode step of attention over a KV cache whose valid length varies per (batch, kv head).

    q: [B, Hq, 1, D]; k_cache, v_cache: [B, Hkv, L_cap, D] (any strides with a unit last dim), Hq a
    multiple of Hkv (GQA: query head h reads kv head h // (Hq // Hkv)); fp16/bf16/fp32.
    lengths: int32 [B, Hkv] on the caches' device, each in [0, L_cap]: query heads of kv head
    (b, g) attend to keys [0, lengths[b, g]) only. A length of 0 gives an all-zero output row.
    block_table: int32 [B, Hkv, max_pages] for a paged cache. k_cache, v_cache are then page pools
    [num_pages, page_size, D] (any strides with a unit last dim, k and v may differ) and token t of
    kv head (b, g) is k_cache[block_table[b, g, t // page_size], t % page_size]; lengths lie in
    [0, max_pages * page_size] and table entries past ceil(lengths / page_size) are ignored (-1 is fine).
    vLLM's paged layout, as its attention backends hold it: k_cache, v_cache [num_blocks, block_size,
    Hkv, D] (e.g. `kv_cache.transpose(1, 2).split(D, -1)` of vLLM's [num_blocks, Hkv, block_size, 2 * D],
    views of any strides where a block's stride is Hkv times a head's, vLLM's default head-major
    layout), block_table int32 [B, max_blocks] and lengths int32 [B] (seq_lens): no copy of the cache
    (page (block b, kv head g) is a view of it; only the [B, Hkv, max_blocks] page table is derived).
    scale: defaults to D ** -0.5.
    Returns [B, Hq, 1, D] in q's dtype. No host synchronisation in the op itself (CUDA-graph
    safe); the eager checks of lengths (and page ids) sync once, and are skipped under
    torch.compile and while a CUDA graph is being captured. There, out-of-range lengths act clamped
    to the capacity and page ids to the pool (memory-safe); the C++ CPU kernel refuses them.
    """
    if isinstance(block_table, torch.Tensor) and block_table.dim() == 2 and isinstance(k_cache, torch.Tensor) \
            and k_cache.dim() == 4:  # vLLM's layout
        k_cache, v_cache, block_table, lengths = _vllm_pages(k_cache, v_cache, block_table, lengths)
    if block_table is not None:
        if _checks.checking():
            _checks.paged_decode_inputs(q, k_cache, v_cache, block_table, lengths)
        scale = _checks.resolve_scale(scale, q.shape[-1])
        return torch.ops.vtattn.paged_decode_attention(q, k_cache, v_cache, block_table, lengths, scale)
    if _checks.checking():
        _checks.decode_inputs(q, k_cache, v_cache, lengths)
    scale = _checks.resolve_scale(scale, q.shape[-1])
    return torch.ops.vtattn.decode_attention(q, k_cache, v_cache, lengths, scale)


def _vllm_pages(k_cache: torch.Tensor, v_cache: torch.Tensor, block_table: torch.Tensor,
                lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """vLLM's paged layout (see decode_attention) -> vtattn's page pools, table and lengths: page
    b * Hkv + g of the pools is kv head g of block b, a view of the cache."""
    if not isinstance(lengths, torch.Tensor):
        raise TypeError(f"lengths must be a torch.Tensor, got {type(lengths).__name__}")
    if lengths.dim() != 1 or lengths.shape[0] != block_table.shape[0]:
        raise ValueError(f"with a [B, max_blocks] block_table (vLLM's layout) lengths must be [B] = "
                         f"[{block_table.shape[0]}], got shape {tuple(lengths.shape)}")
    pools = []
    for name, cache in (("k_cache", k_cache), ("v_cache", v_cache)):
        if cache.dim() != 4:
            raise ValueError(f"with a [B, max_blocks] block_table (vLLM's layout) {name} must be [num_blocks, "
                             f"block_size, Hkv, D], got shape {tuple(cache.shape)}")
        blocks, size, heads, d = cache.shape
        if cache.stride(0) != heads * cache.stride(2) and blocks > 1 and heads > 1:
            raise ValueError(f"{name} must be vLLM's head-major layout (a block's stride = Hkv x a head's), got "
                             f"strides {cache.stride()}")
        page = cache.stride(2) if heads > 1 else cache.stride(0)
        pools.append(cache.as_strided((blocks * heads, size, d), (page, cache.stride(1), cache.stride(3))))
    heads = k_cache.shape[2]
    table = block_table[:, None, :] * heads + torch.arange(heads, dtype=block_table.dtype,
                                                             device=block_table.device)[:, None]
    return pools[0], pools[1], table, lengths[:, None].expand(-1, heads).contiguous()
