import torch

from ._common import expand_kv, logits, probs


def block_mask(kv_num_blocks: torch.Tensor, kv_indices: torch.Tensor, block_size: int, nq: int, nk: int) -> torch.Tensor:
    """Dense bool [B', H', Nq, Nk] of a FlexAttention-style block list: key j is listed for row i iff
    block j // block_size is among the first kv_num_blocks[.., i // block_size] of kv_indices."""
    kb = kv_indices.shape[-1]
    listed = torch.arange(kb, device=kv_indices.device) < kv_num_blocks[..., None]
    # Unlisted entries are sent to a spare column kb, dropped after the scatter.
    idx = torch.where(listed, kv_indices.long(), kb)
    blocks = torch.zeros(*idx.shape[:-1], kb + 1, dtype=torch.bool, device=idx.device).scatter_(-1, idx, True)
    dense = blocks[..., :kb].repeat_interleave(block_size, -2).repeat_interleave(block_size, -1)
    return dense[..., :nq, :nk]


def block_sparse_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_num_blocks: torch.Tensor,
                           kv_indices: torch.Tensor, block_size: int, causal: bool,
                           scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """q [B, Hq, Nq, D], k/v [B, Hkv, Nk, D]; kv_num_blocks int32 [B or 1, Hq or 1, Q_blocks], kv_indices
    int32 [B or 1, Hq or 1, Q_blocks, K_blocks] (broadcast over batch / heads). Row i sees key j iff j's
    block is listed for i's block and, causal, j <= i + Nk - Nq. (out [B, Hq, Nq, D] in q's dtype,
    lse [B, Hq, Nq] fp32); rows that see no key: out 0, lse -inf. Keys of unlisted blocks are never
    read: NaN there never reaches the output."""
    listed = block_mask(kv_num_blocks, kv_indices, block_size, q.shape[2], k.shape[2])  # [B', H', Nq, Nk]
    s = logits(q, k, causal, scale).masked_fill(~listed, float("-inf"))
    lse = torch.logsumexp(s, dim=-1)
    p = probs(s, lse)
    v = expand_kv(v, q.shape[1]).to(p.dtype)
    out = p.new_empty(*p.shape[:3], v.shape[-1])
    # A query block lists the same keys for all its rows: zero the value rows it does not list (0 * NaN is NaN).
    for r0 in range(0, q.shape[2], block_size):
        rows = slice(r0, r0 + block_size)
        out[:, :, rows] = torch.matmul(p[:, :, rows], v.masked_fill(~listed[:, :, r0, :, None], 0.0))
    return out.to(q.dtype), lse.float()
