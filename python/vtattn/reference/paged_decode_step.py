import torch

from .paged_append import paged_append
from .paged_decode_attention import paged_decode_attention


def paged_decode_step(q: torch.Tensor, k_pages: torch.Tensor, v_pages: torch.Tensor, pos: torch.Tensor,
                      next_slot: torch.Tensor, lengths: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                      start: torch.Tensor, last: torch.Tensor | None, score: torch.Tensor | None,
                      block_table: torch.Tensor, scale: float) -> torch.Tensor:
    """A compressed layer's decode step (`kv.cache.CompressedLayer.attend`): `paged_append` of k, v,
    then `paged_decode_attention` of q over the heads so grown. One op so that a step crosses from
    Python into the kernels once; the two specifications, in that order."""
    paged_append(k_pages, v_pages, pos, next_slot, lengths, k, v, start, last, score)
    return paged_decode_attention(q, k_pages, v_pages, block_table, lengths, scale)
