"""paged_decode_attention in Triton: decode_attention's split-KV kernel and LSE merge with the
paged address path (PAGE > 0): key j of (b, g) is row j % page_size of page
block_table[b, g, j // page_size], looked up per key, so any page size works."""
from ._common import check_tensors
from .decode_attention import launch


def supports(q, k_pages, v_pages, block_table, lengths, scale) -> str | None:
    """None when this backend can run the inputs, else why not (one line)."""
    return check_tensors(q, k_pages, v_pages)


def paged_decode_attention(q, k_pages, v_pages, block_table, lengths, scale: float):
    """out [B, Hq, 1, D] contiguous in q's dtype; pools [num_pages, page_size, D] read through their strides."""
    return launch(q, k_pages, v_pages, lengths, block_table, block_table.shape[1],
                  block_table.shape[2] * k_pages.shape[1], scale)
