"""Block lists and their converters: to and from torch FlexAttention's BlockMask and dense block
masks, and the generic builders (top-k, sliding window, text + image). A block list is
(kv_num_blocks int32 [B, H, Q_blocks], kv_indices int32 [B, H, Q_blocks, K_blocks]): query block m
sees key blocks kv_indices[b, h, m, :kv_num_blocks[b, h, m]]. Builders list blocks in ascending order."""
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from torch.nn.attention.flex_attention import BlockMask

BlockList = tuple[torch.Tensor, torch.Tensor]


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def from_dense_blocks(blocks: torch.Tensor) -> BlockList:
    """bool [B, H, Q_blocks, K_blocks] (True: query block sees key block) -> (kv_num_blocks, kv_indices);
    entries past a row's count are the unlisted blocks (ignored by the op)."""
    kv_num_blocks = blocks.sum(-1, dtype=torch.int32)
    kv_indices = torch.argsort((~blocks).to(torch.int8), dim=-1, stable=True).to(torch.int32)  # listed first
    return kv_num_blocks, kv_indices


def to_dense_blocks(kv_num_blocks: torch.Tensor, kv_indices: torch.Tensor) -> torch.Tensor:
    """The inverse of from_dense_blocks: bool [B, H, Q_blocks, K_blocks]."""
    kb = kv_indices.shape[-1]
    listed = torch.arange(kb, device=kv_indices.device) < kv_num_blocks[..., None]
    idx = torch.where(listed, kv_indices.long(), kb)  # unlisted entries land in a spare column
    return torch.zeros(*idx.shape[:-1], kb + 1, dtype=torch.bool, device=idx.device).scatter_(-1, idx, True)[..., :kb]


def from_flex_block_mask(block_mask: "BlockMask") -> tuple[torch.Tensor, torch.Tensor, int]:
    """A FlexAttention BlockMask -> (kv_num_blocks, kv_indices, block_size). Its partial and full
    blocks are merged into one list; the mask_mod applied inside partial blocks is not carried over
    (pass causal=True to block_sparse_attention for a causal mask_mod; other mask_mods have no
    equivalent). Needs equal query and key block sizes."""
    q_bs, kv_bs = block_mask.BLOCK_SIZE
    if q_bs != kv_bs:
        raise ValueError(f"block_sparse_attention needs equal query and key block sizes, got {q_bs} and {kv_bs}")
    blocks = to_dense_blocks(block_mask.kv_num_blocks, block_mask.kv_indices)
    if block_mask.full_kv_num_blocks is not None and block_mask.full_kv_indices is not None:
        blocks |= to_dense_blocks(block_mask.full_kv_num_blocks, block_mask.full_kv_indices)
    # A BlockMask may carry more blocks than its sequence lengths need (built for a longer length).
    nq, nk = block_mask.seq_lengths
    blocks = blocks[..., :_cdiv(nq, q_bs), :_cdiv(nk, kv_bs)]
    return (*from_dense_blocks(blocks), int(q_bs))


def to_flex_block_mask(kv_num_blocks: torch.Tensor, kv_indices: torch.Tensor, block_size: int, Nq: int, Nk: int, *,
                       causal: bool = False) -> "BlockMask":
    """(kv_num_blocks, kv_indices, block_size) -> FlexAttention BlockMask over Nq queries and Nk keys that
    computes what block_sparse_attention(..., causal=causal) does. Listed blocks that every row sees
    whole become full blocks (no mask_mod call); the rest (causal diagonal) are partial. The mask_mod
    also encodes the block lists, as flex_attention without torch.compile evaluates only the mask_mod."""
    from torch.nn.attention.flex_attention import BlockMask

    blocks = to_dense_blocks(kv_num_blocks, kv_indices)
    Bm, Hm, qb, kb = blocks.shape
    off = Nk - Nq
    full = blocks
    partial = torch.zeros_like(blocks)
    if causal:
        m = torch.arange(qb, device=blocks.device)[:, None]
        j = torch.arange(kb, device=blocks.device)[None, :]
        whole = (torch.clamp((j + 1) * block_size, max=Nk) - 1 <= m * block_size + off)
        seen = (j * block_size <= torch.clamp((m + 1) * block_size, max=Nq) - 1 + off)
        full, partial = blocks & whole, blocks & seen & ~whole

    def mask_mod(b: torch.Tensor, h: torch.Tensor, q_idx: torch.Tensor, kv_idx: torch.Tensor) -> torch.Tensor:
        listed = blocks[b % Bm, h % Hm, q_idx // block_size, kv_idx // block_size]
        return listed & (kv_idx <= q_idx + off) if causal else listed

    return BlockMask.from_kv_blocks(*from_dense_blocks(partial), *from_dense_blocks(full), BLOCK_SIZE=block_size,
                                    mask_mod=mask_mod, seq_lengths=(Nq, Nk))


def dense_text_image_blocks(image_mask: torch.Tensor, image_blocks: torch.Tensor, block_size: int = 128) -> BlockList:
    """Self-attention over a sequence of text and image tokens (Nq = Nk = N): query blocks holding any
    text token see every key block; pure-image query blocks see every key block holding text, their
    own block, and the chosen image blocks.
    image_mask: bool [N] or [B, N], True at image tokens. image_blocks: bool [K_blocks] or [B, H, K_blocks],
    the image key blocks to keep (e.g. the top blocks by key_importance).
    Returns (kv_num_blocks, kv_indices) of shape [B or 1, H or 1, ...]."""
    image_mask = image_mask if image_mask.dim() == 2 else image_mask[None]
    B, N = image_mask.shape
    nb = _cdiv(N, block_size)
    pad = torch.ones(B, nb * block_size, dtype=torch.bool, device=image_mask.device)
    pad[:, :N] = image_mask
    text = ~pad.view(B, nb, block_size).all(-1)  # [B, blocks]: holds a text token
    chosen = image_blocks if image_blocks.dim() == 3 else image_blocks[None, None]
    diag = torch.eye(nb, dtype=torch.bool, device=image_mask.device)
    blocks = text[:, None, :, None] | text[:, None, None, :] | chosen[:, :, None, :] | diag
    return from_dense_blocks(blocks)


def pooled_scores(q: torch.Tensor, k: torch.Tensor, block_size: int = 128) -> torch.Tensor:
    """[B, Hq, Q_blocks, Nk] fp32: each query block's mean query against every key (GQA-expanded), a
    cheap stand-in for the block's attention used to pick key blocks with topk_blocks."""
    B, Hq, Nq, D = q.shape
    qb = _cdiv(Nq, block_size)
    pad = q.new_zeros(B, Hq, qb * block_size, D, dtype=torch.float32)
    pad[:, :, :Nq] = q
    counts = (torch.arange(qb * block_size, device=q.device) < Nq).view(qb, block_size).sum(-1).clamp(min=1)
    mean = pad.view(B, Hq, qb, block_size, D).sum(3) / counts[:, None]
    kf = k.float().repeat_interleave(Hq // k.shape[1], dim=1)
    return mean @ kf.transpose(-1, -2)


def topk_blocks(scores: torch.Tensor, k: int, block_size: int = 128) -> BlockList:
    """The k key blocks of highest summed score for each query block.
    scores: [B, H, Q_blocks, Nk] per-key scores of each query block (pooled_scores, or key_importance
    [B, H, Nk] expanded over the query blocks); k is capped at K_blocks. Ties go to the lower block."""
    Nk = scores.shape[-1]
    kb = _cdiv(Nk, block_size)
    k = min(int(k), kb)
    pad = scores.new_zeros(*scores.shape[:-1], kb * block_size, dtype=torch.float64)
    pad[..., :Nk] = scores
    sums = pad.view(*scores.shape[:-1], kb, block_size).sum(-1)
    # Stable descending sort: equal sums keep ascending block order.
    top = torch.sort(sums, dim=-1, descending=True, stable=True).indices[..., :k]
    blocks = torch.zeros_like(sums, dtype=torch.bool).scatter_(-1, top, True)
    return from_dense_blocks(blocks)


def sliding_window_blocks(Nq: int, Nk: int, window: int, sinks: int = 0, block_size: int = 128,
                          device: torch.device | str | None = None) -> BlockList:
    """Key blocks for a causal sliding window plus attention sinks, end-aligned like causal attention
    (row i sits at position i + Nk - Nq): each query block lists the blocks touching any key within
    `window` positions at or before one of its rows, and the blocks holding the first `sinks` keys.
    Block granularity: keys inside listed blocks but outside the window stay visible (the op masks
    only causal=True element by element). Returns (kv_num_blocks, kv_indices) [1, 1, ...]."""
    qb, kb = _cdiv(Nq, block_size), _cdiv(Nk, block_size)
    m = torch.arange(qb, device=device)
    hi = torch.clamp(torch.clamp((m + 1) * block_size, max=Nq) - 1 + Nk - Nq, max=Nk - 1)  # a block's last row's key
    lo = m * block_size + Nk - Nq - window + 1  # the oldest key its first row's window holds
    j = torch.arange(kb, device=device)
    blk_lo, blk_hi = j * block_size, (j + 1) * block_size - 1
    in_window = (blk_hi[None, :] >= lo[:, None]) & (blk_lo[None, :] <= hi[:, None])
    sink = blk_lo[None, :] < sinks
    return from_dense_blocks((in_window | sink)[None, None])
