"""Block-sparse attention forward in Triton: the attention kernel's online softmax over only the
key blocks a query block lists (FlexAttention's BlockMask layout); empty blocks cost nothing and
tiles that need no mask (not causal-diagonal, not past Nk) skip it."""
import functools

import torch

from ._common import (LOG2E, Tuned, block_d, check_tensors, dot_precision, finish_lse, on_device, stride_align,
                      strides, tl, triton, tune_key, wide4)
from .attention import _space, key_tile

MIN_TILE = 16  # the smallest tl.dot tile: block_size must be a multiple of it


def supports(q, k, v, kv_num_blocks, kv_indices, block_size, causal, scale) -> str | None:
    """None when this backend can run the inputs, else why not (one line)."""
    if block_size % MIN_TILE:
        return f"block_size {block_size} is not a multiple of {MIN_TILE}"
    for name, t in (("kv_num_blocks", kv_num_blocks), ("kv_indices", kv_indices)):
        if t.device != q.device or t.dtype != torch.int32:
            return f"{name} must be int32 on q's device"
    return check_tensors(q, k, v)


@triton.jit(do_not_specialize=["TUNE_KEY"])
def _block_sparse_fwd_kernel(Q, K, V, Out, Lse, Num, Idx,
                             stride_qb, stride_qh, stride_qm, stride_qd,
                             stride_kb, stride_kh, stride_kn, stride_kd,
                             stride_vb, stride_vh, stride_vn, stride_vd,
                             stride_ob, stride_oh, stride_om, stride_od,
                             stride_nb, stride_nh, stride_nm, stride_ib, stride_ih, stride_im, stride_ik,
                             Hq, Nq, Nk, GROUP, KV_BLOCKS, qk_scale, TUNE_KEY,
                             BLOCK_SIZE: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                             CAUSAL: tl.constexpr, PRECISION: tl.constexpr, ALIGN: tl.constexpr,
                             BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """One query tile (BLOCK_M divides BLOCK_SIZE: a tile lies in one query block) of one (batch, head)
    per program, over its block's listed key blocks in BLOCK_N tiles. Block-list strides may be 0
    (shared over batch / heads). Strides of q/k/v/out but the last come divided by ALIGN; all become
    int64 (offsets may pass 2^31)."""
    stride_qb, stride_qh, stride_qm, stride_qd = wide4(stride_qb, stride_qh, stride_qm, stride_qd, ALIGN)
    stride_kb, stride_kh, stride_kn, stride_kd = wide4(stride_kb, stride_kh, stride_kn, stride_kd, ALIGN)
    stride_vb, stride_vh, stride_vn, stride_vd = wide4(stride_vb, stride_vh, stride_vn, stride_vd, ALIGN)
    stride_ob, stride_oh, stride_om, stride_od = wide4(stride_ob, stride_oh, stride_om, stride_od, ALIGN)
    num_m = tl.cdiv(Nq, BLOCK_M)
    pid = tl.program_id(0)
    bh = pid // num_m
    tile_m = pid % num_m
    b = (bh // Hq).to(tl.int64)
    h = (bh % Hq).to(tl.int64)
    kvh = h // GROUP
    row_lo = tile_m * BLOCK_M
    row_hi = tl.minimum(row_lo + BLOCK_M, Nq) - 1
    q_block = row_lo // BLOCK_SIZE
    # Block lists go unvalidated under torch.compile and internal calls: a count is clamped to the
    # list's KV_BLOCKS entries and a block outside the keys is skipped, never read.
    count = tl.minimum(tl.maximum(tl.load(Num + b * stride_nb + h * stride_nh + q_block * stride_nm), 0), KV_BLOCKS)
    idx_base = Idx + b * stride_ib + h * stride_ih + q_block * stride_im

    offs_m = row_lo + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    row_ok = offs_m < Nq
    q = tl.load(Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qm + offs_d[None, :] * stride_qd,
                mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    k_ptrs = K + b * stride_kb + kvh * stride_kh + offs_n[:, None] * stride_kn + offs_d[None, :] * stride_kd
    v_ptrs = V + b * stride_vb + kvh * stride_vh + offs_n[:, None] * stride_vn + offs_d[None, :] * stride_vd
    causal_off = Nk - Nq
    # Keys past `end` are hidden from every row of the tile; keys below `full` are visible to all of them.
    end = Nk
    full = Nk
    if CAUSAL:
        end = tl.minimum(row_hi + causal_off + 1, Nk)
        full = tl.minimum(row_lo + causal_off + 1, Nk)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for j in range(0, count):
        k_block = tl.load(idx_base + j * stride_ik)
        block_ok = (k_block >= 0) & (k_block < tl.cdiv(Nk, BLOCK_SIZE))
        lo = tl.where(block_ok, k_block, 0) * BLOCK_SIZE
        hi = tl.where(block_ok, tl.minimum(lo + BLOCK_SIZE, end), lo)  # empty: hidden (causal) or skipped
        for start_n in range(lo, hi, BLOCK_N):
            if start_n + BLOCK_N <= full:  # no mask: every row sees the whole tile
                acc, m_i, l_i = key_tile(acc, m_i, l_i, q, k_ptrs, v_ptrs, stride_kn, stride_vn, start_n, offs_m, Nk,
                                         causal_off, qk_scale, False, CAUSAL, HEAD_DIM, BLOCK_D, BLOCK_N, PRECISION)
            else:  # the causal diagonal or the ragged last key block
                acc, m_i, l_i = key_tile(acc, m_i, l_i, q, k_ptrs, v_ptrs, stride_kn, stride_vn, start_n, offs_m, Nk,
                                         causal_off, qk_scale, True, CAUSAL, HEAD_DIM, BLOCK_D, BLOCK_N, PRECISION)

    out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]  # rows without visible keys: 0, not NaN
    tl.store(Out + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_om + offs_d[None, :] * stride_od,
             out.to(Out.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])
    tl.store(Lse + bh.to(tl.int64) * Nq + offs_m, finish_lse(m_i, l_i), mask=row_ok)


@functools.cache
def _kernel(block_size: int) -> Tuned:
    """The tuned kernel for one block size: only tiles that divide it (a query tile in one query
    block, a key tile in one key block); MIN_TILE squares when none of the usual ones do."""
    def space(esize, bd):
        fits = [c for c in _space(esize, bd) if block_size % c[0]["BLOCK_M"] == 0 and block_size % c[0]["BLOCK_N"] == 0]
        return fits or [({"BLOCK_M": MIN_TILE, "BLOCK_N": MIN_TILE}, 4, 2)]

    return Tuned(_block_sparse_fwd_kernel, key=["TUNE_KEY", "BLOCK_D", "CAUSAL"], space=space,
                 smem=lambda c, stages: c["BLOCK_M"] + 2 * c["BLOCK_N"] * stages,
                 interp=({"BLOCK_M": MIN_TILE, "BLOCK_N": MIN_TILE}, 4, 1))


def block_sparse_attention(q, k, v, kv_num_blocks, kv_indices, block_size: int, causal: bool, scale: float):
    """(out [B, Hq, Nq, D] in q's dtype over [B, Nq, Hq, D] memory, lse [B, Hq, Nq] fp32); q/k/v and the
    block lists ([B or 1, Hq or 1, ...]) read through their strides."""
    B, Hq, Nq, D = q.shape
    Hkv, Nk = k.shape[1], k.shape[2]
    out = torch.empty((B, Nq, Hq, D), dtype=q.dtype, device=q.device).transpose(1, 2)
    lse = torch.empty((B, Hq, Nq), dtype=torch.float32, device=q.device)
    if out.numel() == 0 or Nk == 0:  # nothing to launch (and no pointer into an empty K/V)
        return out.zero_(), lse.fill_(float("-inf"))
    num = kv_num_blocks.expand(B, Hq, -1)
    idx = kv_indices.expand(B, Hq, -1, -1)
    grid = lambda meta: (B * Hq * triton.cdiv(Nq, meta["BLOCK_M"]),)  # noqa: E731
    align = stride_align(q, k, v, out)
    with on_device(q):
        _kernel(block_size)[grid](
            q, k, v, out, lse, num, idx,
            *strides(q, align), *strides(k, align), *strides(v, align), *strides(out, align),
            *num.stride(), *idx.stride(), Hq, Nq, Nk, Hq // Hkv, idx.shape[3], scale * LOG2E,
            tune_key(Nq, Nk, B * Hq),
            BLOCK_SIZE=block_size, HEAD_DIM=D, BLOCK_D=block_d(D), CAUSAL=bool(causal),
            PRECISION=dot_precision(q.dtype), ALIGN=align)
    return out, lse
