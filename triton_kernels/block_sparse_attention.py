"""Block-sparse attention forward in Triton (FlexAttention's BlockMask layout), structured as
FlexAttention's kernel so its loads pipeline: the launcher splits each query block's list into full
blocks (every row sees every key: no mask) and partial ones (the causal diagonal, the ragged last key
block), and the kernel runs one flat loop per list, a key tile per iteration, whose next K/V address
comes from the list inside the loop (no nested loop, no branch: num_stages overlaps its loads)."""
import functools

import torch

from ._common import (LOG2E, Tuned, block_d, check_tensors, dot_precision, finish_lse, on_device, stride_align,
                      strides, tl, triton, tune_key, visible_keys, wide4)
from .attention import _space, attn_tile

MIN_TILE = 16  # the smallest tl.dot tile: block_size must be a multiple of it


def supports(q, k, v, kv_num_blocks, kv_indices, block_size, causal, scale) -> str | None:
    """None when this backend can run the inputs, else why not (one line)."""
    if block_size % MIN_TILE:
        return f"block_size {block_size} is not a multiple of {MIN_TILE}"
    for name, t in (("kv_num_blocks", kv_num_blocks), ("kv_indices", kv_indices)):
        if t.device != q.device or t.dtype != torch.int32:
            return f"{name} must be int32 on q's device"
    return check_tensors(q, k, v)


def split_lists(kv_num_blocks, kv_indices, block_size: int, causal: bool, Nq: int, Nk: int):
    """(full counts, partial counts int32 [Bm, Hm, Q_blocks], lists int32 [Bm, Hm, Q_blocks, K_blocks]):
    each query block's listed blocks reordered full first, then partial (seen only in part: the ragged
    last key block, causal diagonal blocks), then the rest. Dropped: entries past the count, blocks
    outside [0, K_blocks) (unvalidated lists stay memory-safe) and, causal, blocks no row sees.
    A few small tensor ops on the lists, no host sync."""
    qb, kb = kv_indices.shape[-2], kv_indices.shape[-1]
    dev = kv_indices.device
    j = kv_indices.long()
    ok = (torch.arange(kb, device=dev) < kv_num_blocks[..., None]) & (j >= 0) & (j < kb)
    whole = (j + 1) * block_size <= Nk
    seen = torch.ones_like(ok)
    if causal:
        m = torch.arange(qb, device=dev)[:, None]
        off = Nk - Nq
        whole = whole & ((j + 1) * block_size - 1 <= m * block_size + off)
        seen = j * block_size <= torch.clamp((m + 1) * block_size, max=Nq) - 1 + off
    full, part = ok & whole, ok & seen & ~whole
    order = torch.argsort(torch.where(full, 0, torch.where(part, 1, 2)).to(torch.int8), dim=-1, stable=True)
    lists = torch.gather(kv_indices, -1, order)
    return full.sum(-1, dtype=torch.int32), part.sum(-1, dtype=torch.int32), lists


@triton.jit
def _sweep_list(acc, m_i, l_i, q, K, V, blocks, n_blocks, stride_ik, offs_m, offs_n, offs_d, stride_kn, stride_kd,
                stride_vn, stride_vd, Nk, causal_off, qk_scale, MASKED: tl.constexpr, CAUSAL: tl.constexpr,
                HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr, PRECISION: tl.constexpr):
    """Key tiles of the n_blocks blocks listed at `blocks`, one per iteration of a flat loop: the K/V
    pointers move by BLOCK_N inside a block and jump to the next listed block after its last tile.
    MASKED: the list's tiles take the causal / ragged-end mask (partial blocks); else no mask (full)."""
    MULT: tl.constexpr = BLOCK_SIZE // BLOCK_N
    d_ok = offs_d < HEAD_DIM
    start_n = tl.load(blocks, mask=n_blocks > 0, other=0).to(tl.int64) * BLOCK_SIZE
    k_ptrs = K + (start_n + offs_n)[:, None] * stride_kn + offs_d[None, :] * stride_kd
    v_ptrs = V + (start_n + offs_n)[:, None] * stride_vn + offs_d[None, :] * stride_vd
    for it in range(0, n_blocks * MULT):
        if MASKED:
            cols = start_n + offs_n
            kv_mask = (cols < Nk)[:, None] & d_ok[None, :]
            k = tl.load(k_ptrs, mask=kv_mask, other=0.0)
            v = tl.load(v_ptrs, mask=kv_mask, other=0.0)
            visible = visible_keys(offs_m, cols, Nk, causal_off, 0, CAUSAL, False)
            acc, m_i, l_i = attn_tile(acc, m_i, l_i, q, k, v, qk_scale, visible, True, PRECISION)
        else:
            k = tl.load(k_ptrs, mask=d_ok[None, :], other=0.0)
            v = tl.load(v_ptrs, mask=d_ok[None, :], other=0.0)
            acc, m_i, l_i = attn_tile(acc, m_i, l_i, q, k, v, qk_scale, None, False, PRECISION)
        # the next tile: BLOCK_N further, or the first tile of the next listed block
        entry = it // MULT
        cur = tl.load(blocks + entry * stride_ik).to(tl.int64)
        nxt = tl.load(blocks + (entry + 1) * stride_ik, mask=entry + 1 < n_blocks, other=0).to(tl.int64)
        last_tile = (it + 1) % MULT == 0
        step = tl.where(last_tile, (nxt - cur) * BLOCK_SIZE - (MULT - 1) * BLOCK_N, BLOCK_N)
        start_n += step
        k_ptrs += step * stride_kn
        v_ptrs += step * stride_vn
    return acc, m_i, l_i


@triton.jit(do_not_specialize=["TUNE_KEY"])
def _block_sparse_fwd_kernel(Q, K, V, Out, Lse, NumFull, NumPart, Idx,
                             stride_qb, stride_qh, stride_qm, stride_qd,
                             stride_kb, stride_kh, stride_kn, stride_kd,
                             stride_vb, stride_vh, stride_vn, stride_vd,
                             stride_ob, stride_oh, stride_om, stride_od,
                             stride_nb, stride_nh, stride_nm, stride_ib, stride_ih, stride_im, stride_ik,
                             Hq, Nq, Nk, GROUP, qk_scale, TUNE_KEY,
                             BLOCK_SIZE: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                             CAUSAL: tl.constexpr, PRECISION: tl.constexpr, ALIGN: tl.constexpr,
                             BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """One query tile (BLOCK_M divides BLOCK_SIZE: a tile lies in one query block) of one (batch, head)
    per program: its block's full blocks, then its partial ones (split_lists). List strides may be 0
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
    q_block = tile_m * BLOCK_M // BLOCK_SIZE
    counts = b * stride_nb + h * stride_nh + q_block * stride_nm
    n_full = tl.load(NumFull + counts)
    n_part = tl.load(NumPart + counts)
    blocks = Idx + b * stride_ib + h * stride_ih + q_block * stride_im

    offs_m = tile_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    row_ok = offs_m < Nq
    q = tl.load(Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qm + offs_d[None, :] * stride_qd,
                mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    K_head = K + b * stride_kb + kvh * stride_kh
    V_head = V + b * stride_vb + kvh * stride_vh
    causal_off = Nk - Nq

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    acc, m_i, l_i = _sweep_list(acc, m_i, l_i, q, K_head, V_head, blocks, n_full, stride_ik, offs_m, offs_n, offs_d,
                                stride_kn, stride_kd, stride_vn, stride_vd, Nk, causal_off, qk_scale, False, CAUSAL,
                                HEAD_DIM, BLOCK_SIZE, BLOCK_N, PRECISION)
    acc, m_i, l_i = _sweep_list(acc, m_i, l_i, q, K_head, V_head, blocks + n_full * stride_ik, n_part, stride_ik,
                                offs_m, offs_n, offs_d, stride_kn, stride_kd, stride_vn, stride_vd, Nk, causal_off,
                                qk_scale, True, CAUSAL, HEAD_DIM, BLOCK_SIZE, BLOCK_N, PRECISION)

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
    n_full, n_part, lists = split_lists(kv_num_blocks, kv_indices, block_size, causal, Nq, Nk)
    n_full, n_part = n_full.expand(B, Hq, -1), n_part.expand(B, Hq, -1)
    lists = lists.expand(B, Hq, -1, -1)
    grid = lambda meta: (B * Hq * triton.cdiv(Nq, meta["BLOCK_M"]),)  # noqa: E731
    align = stride_align(q, k, v, out)
    with on_device(q):
        _kernel(block_size)[grid](
            q, k, v, out, lse, n_full, n_part, lists,
            *strides(q, align), *strides(k, align), *strides(v, align), *strides(out, align),
            *n_full.stride(), *lists.stride(), Hq, Nq, Nk, Hq // Hkv, scale * LOG2E,
            tune_key(Nq, Nk, B * Hq),
            BLOCK_SIZE=block_size, HEAD_DIM=D, BLOCK_D=block_d(D), CAUSAL=bool(causal),
            PRECISION=dot_precision(q.dtype), ALIGN=align)
    return out, lse
