"""paged_decode_step in Triton: the paged_append launcher, then the paged_decode_attention one (a
compressed layer's decode step in one op call; no kernel of its own, semantics in the reference,
vtattn/reference/paged_decode_step.py)."""
from . import paged_append as _append
from . import paged_decode_attention as _decode


def supports(q, k_pages, v_pages, pos, next_slot, lengths, k, v, start, last, score, block_table,
             scale) -> str | None:
    return (_append.supports(k_pages, v_pages, pos, next_slot, lengths, k, v, start, last, score)
            or _decode.supports(q, k_pages, v_pages, block_table, lengths, scale))


def paged_decode_step(q, k_pages, v_pages, pos, next_slot, lengths, k, v, start, last, score, block_table, scale):
    _append.paged_append(k_pages, v_pages, pos, next_slot, lengths, k, v, start, last, score)
    return _decode.paged_decode_attention(q, k_pages, v_pages, block_table, lengths, scale)
