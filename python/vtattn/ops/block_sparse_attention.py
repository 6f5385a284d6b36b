from typing import Literal, overload

import torch

from . import _checks


@overload
def block_sparse_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_num_blocks: torch.Tensor,
                           kv_indices: torch.Tensor, *, block_size: int = ..., causal: bool = ...,
                           scale: float | None = ..., return_lse: Literal[False] = ...) -> torch.Tensor: ...
@overload
def block_sparse_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_num_blocks: torch.Tensor,
                           kv_indices: torch.Tensor, *, block_size: int = ..., causal: bool = ...,
                           scale: float | None = ...,
                           return_lse: Literal[True]) -> tuple[torch.Tensor, torch.Tensor]: ...
@overload
def block_sparse_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_num_blocks: torch.Tensor,
                           kv_indices: torch.Tensor, *, block_size: int = ..., causal: bool = ...,
                           scale: float | None = ...,
                           return_lse: bool) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]: ...
def block_sparse_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_num_blocks: torch.Tensor,
                           kv_indices: torch.Tensor, *, block_size: int = 128, causal: bool = False,
                           scale: float | None = None,
                           return_lse: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Attention where each block of block_size query rows sees only its listed blocks of keys: the
    layout of torch FlexAttention's BlockMask (vtattn.sparse converts both ways and builds patterns).

    q: [B, Hq, Nq, D]; k, v: [B, Hkv, Nk, D] (GQA: query head h uses kv head h // (Hq // Hkv)).
    kv_num_blocks: int32 [B, H, Q_blocks]; kv_indices: int32 [B, H, Q_blocks, K_blocks] with
    Q_blocks = ceil(Nq / block_size), K_blocks = ceil(Nk / block_size). H is Hq (per query head) or 1
    (shared by all heads), B may be 1 (shared by the batch), as in a BlockMask. Query block m attends
    to key blocks kv_indices[b, h, m, :kv_num_blocks[b, h, m]] (distinct, any order); later entries
    are ignored. The last query / key block may be partial.
    causal: additionally row i sees key j only if j <= i + Nk - Nq (end-aligned, as vtattn.attention),
    applied element by element inside the listed blocks, so a listed block on the diagonal is
    partially visible and a listed block wholly above it contributes nothing.
    scale: defaults to D ** -0.5.
    Rows that see no key (no listed block, or all hidden by causal) give out 0 and LSE -inf.
    Returns out [B, Hq, Nq, D] in q's dtype laid out as [B, Nq, Hq, D] (like vtattn.attention) and,
    with return_lse=True, the fp32 log-sum-exp [B, Hq, Nq].
    """
    if _checks.checking():
        _checks.attention_inputs(q, k, v)
        _checks.tensor("kv_num_blocks", kv_num_blocks, 3, (torch.int32,))
        _checks.tensor("kv_indices", kv_indices, 4, (torch.int32,))
        _checks.same_device({"q": q, "kv_num_blocks": kv_num_blocks, "kv_indices": kv_indices})
        _check_blocks(q, k, kv_num_blocks, kv_indices, block_size)
    scale = _checks.resolve_scale(scale, q.shape[-1])
    out, lse = torch.ops.vtattn.block_sparse_attention(q, k, v, kv_num_blocks, kv_indices, int(block_size),
                                                       bool(causal), scale)
    return (out, lse) if return_lse else out


def _check_blocks(q: torch.Tensor, k: torch.Tensor, kv_num_blocks: torch.Tensor, kv_indices: torch.Tensor,
                  block_size: int) -> None:
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size <= 0:
        raise ValueError(f"block_size must be a positive int, got {block_size!r}")
    B, Hq, Nq = q.shape[:3]
    Nk = k.shape[2]
    qb, kb = -(-Nq // block_size), -(-Nk // block_size)
    Bm, Hm = kv_num_blocks.shape[:2]
    if Bm not in (1, B) or Hm not in (1, Hq):
        raise ValueError(f"kv_num_blocks must be [B={B} or 1, Hq={Hq} or 1, Q_blocks], "
                         f"got {tuple(kv_num_blocks.shape)}")
    if kv_num_blocks.shape[2] != qb:
        raise ValueError(f"kv_num_blocks has {kv_num_blocks.shape[2]} query blocks but Nq={Nq} with "
                         f"block_size={block_size} needs {qb}")
    if tuple(kv_indices.shape) != (Bm, Hm, qb, kb):
        raise ValueError(f"kv_indices must be [{Bm}, {Hm}, Q_blocks={qb}, K_blocks={kb}] (Nk={Nk}, "
                         f"block_size={block_size}), got {tuple(kv_indices.shape)}")
    if not kv_num_blocks.numel() or not _checks.concrete(kv_num_blocks):
        return
    # The values: one sync (the kernels trust them).
    bad_num = (kv_num_blocks < 0) | (kv_num_blocks > kb)
    listed = torch.arange(kb, device=q.device) < kv_num_blocks[..., None]
    bad = listed & ((kv_indices < 0) | (kv_indices >= kb))
    # A repeated block would count its keys twice in the kernels but once in the dense mask.
    srt = torch.where(listed, kv_indices, -1 - torch.arange(kb, device=q.device, dtype=torch.int32)).sort(-1).values
    num_bad, index_bad, repeated = torch.stack([bad_num.any(), bad.any(),
                                                (srt[..., 1:] == srt[..., :-1]).any()]).tolist()
    if num_bad:
        raise ValueError(f"kv_num_blocks must lie in [0, K_blocks={kb}], got min {int(kv_num_blocks.min())} "
                         f"max {int(kv_num_blocks.max())}")
    if index_bad:
        raise ValueError(f"kv_indices must lie in [0, K_blocks={kb}) within kv_num_blocks, got "
                         f"{int(kv_indices[bad][0])} at {tuple(bad.nonzero()[0].tolist())}")
    if repeated:
        raise ValueError("kv_indices lists a key block twice for one query block")
