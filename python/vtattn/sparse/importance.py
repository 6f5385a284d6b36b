"""key_importance of a block-sparse attention: the attention mass each key receives from chosen query
rows under the block lists (the probabilities block_sparse_attention really used), so a pruning stage
that scores tokens (FastV, SnapKV, LOOK-M) in a sparse-prefill layer scores what the model attended.

A correctness path in PyTorch: chosen rows in chunks, logits against every key, masked by the lists
(and causal), normalised by the sparse LSE. Work O(R * Nk * D) per head for R rows (rows="all": the
cost of one dense attention), memory bounded by the chunk; no [Nq, Nk] tensor."""
import torch

from ..ops.key_importance import _REDUCE, _row_index

CHUNK_LOGITS = 1 << 24  # logits per chunk of rows (all heads)


def key_importance(q: torch.Tensor, k: torch.Tensor, kv_num_blocks: torch.Tensor, kv_indices: torch.Tensor, *,
                   block_size: int, rows: int | slice | str | torch.Tensor | list[int], lse: torch.Tensor | None = None,
                   causal: bool = False, scale: float | None = None, reduce_heads: str | None = None) -> torch.Tensor:
    """scores[b, h, j] = sum over the chosen rows i of P[b, h, i, j], P the probabilities of
    block_sparse_attention(q, k, v, kv_num_blocks, kv_indices, block_size=, causal=, scale=): 0 for a key
    outside the row's listed blocks (or after its causal horizon), exp(scale q_i.k_j - lse_i) otherwise.

    rows: as vtattn.key_importance (int, slice, index tensor, bool mask, "all"). lse: optional fp32
    [B, Hq, Nq] from block_sparse_attention(..., return_lse=True) (else computed from the same logits).
    Lists as block_sparse_attention (checked by it: pass lists that op accepts). reduce_heads: None ->
    fp32 [B, Hq, Nk]; "mean" | "sum" | "max" -> fp32 [B, Nk]."""
    if reduce_heads is not None and reduce_heads not in _REDUCE:
        raise ValueError(f"reduce_heads must be None, 'mean', 'sum' or 'max', got {reduce_heads!r}")
    if q.dim() != 4 or k.dim() != 4 or q.shape[1] % k.shape[1] or q.shape[0] != k.shape[0]:
        raise ValueError(f"q [B, Hq, Nq, D] and k [B, Hkv, Nk, D] with Hq a multiple of Hkv, got {tuple(q.shape)} "
                         f"and {tuple(k.shape)}")
    B, Hq, Nq, D = q.shape
    Nk, dev = k.shape[2], q.device
    if lse is not None and tuple(lse.shape) != (B, Hq, Nq):
        raise ValueError(f"lse must have shape [B, Hq, Nq] = {(B, Hq, Nq)}, got {tuple(lse.shape)}")
    index = _row_index(rows, B, Nq, dev, True)
    if index is None:
        index = torch.arange(Nq, device=dev).expand(B, Nq)
    scale = D ** -0.5 if scale is None else float(scale)
    kb = kv_indices.shape[-1]
    listed = torch.arange(kb, device=dev) < kv_num_blocks[..., None]  # [Bm, Hm, Qb, Kb] listed entries
    blocks = torch.zeros(*listed.shape[:-1], kb + 1, dtype=torch.bool, device=dev).scatter_(
        -1, torch.where(listed, kv_indices.long(), kb), True)[..., :kb].expand(B, Hq, -1, -1)
    key_block = torch.arange(Nk, device=dev) // block_size
    kf = k.float().repeat_interleave(Hq // k.shape[1], 1)  # [B, Hq, Nk, D]
    scores = torch.zeros(B, Hq, Nk, dtype=torch.float32, device=dev)
    step = max(1, CHUNK_LOGITS // max(1, Hq * Nk))
    bb = torch.arange(B, device=dev)[:, None, None]
    hh = torch.arange(Hq, device=dev)[None, :, None]
    for r0 in range(0, index.shape[1], step):
        idx = index[:, r0:r0 + step]  # [B, r]; -1: no row
        ok = idx >= 0
        i = idx.clamp(min=0)
        qr = q[bb, hh, i[:, None, :]].float()  # [B, Hq, r, D]
        s = (qr @ kf.transpose(-1, -2)) * scale  # [B, Hq, r, Nk]
        sees = blocks[bb, hh, (i // block_size)[:, None, :]][..., key_block]  # [B, Hq, r, Nk]
        if causal:
            sees = sees & (torch.arange(Nk, device=dev) <= (i + Nk - Nq)[:, None, :, None])
        s = s.masked_fill(~(sees & ok[:, None, :, None]), float("-inf"))
        row_lse = torch.logsumexp(s, -1) if lse is None else lse[bb, hh, i[:, None, :]].float()
        p = torch.exp(s - torch.where(torch.isinf(row_lse) & (row_lse < 0), 0.0, row_lse)[..., None])
        scores += p.sum(-2)
    return scores if reduce_heads is None else _REDUCE[reduce_heads](scores)
