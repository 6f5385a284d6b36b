import torch

from .decode_attention import decode_attention


def paged_decode_attention(q: torch.Tensor, k_pages: torch.Tensor, v_pages: torch.Tensor, block_table: torch.Tensor,
                           lengths: torch.Tensor, scale: float) -> torch.Tensor:
    """decode_attention over a paged cache: token t of kv head (b, g) is
    k_pages[block_table[b, g, t // page_size], t % page_size] (likewise v); table entries past
    the first ceil(lengths[b, g] / page_size) are never read, and a used id outside the pool reads its
    nearest page (as the GPU kernels, which must stay in the pool where the public checks are skipped).
    Gathers a dense cache, then the dense specification."""
    B, Hkv, max_pages = block_table.shape
    page, D = k_pages.shape[1], k_pages.shape[2]
    used = torch.arange(max_pages, device=block_table.device) * page < lengths[..., None]
    # unused entries (maybe -1) read page 0, masked
    ids = torch.where(used, block_table, 0).long().clamp(0, max(k_pages.shape[0] - 1, 0))
    if k_pages.shape[0] == 0:  # an empty pool: every length is 0
        k = v = k_pages.new_zeros(B, Hkv, max_pages * page, D)
    else:
        k, v = (x[ids].flatten(2, 3) for x in (k_pages, v_pages))  # [B, Hkv, max_pages * page, D]
    return decode_attention(q, k, v, lengths, scale)
