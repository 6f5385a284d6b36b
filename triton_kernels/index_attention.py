"""Index attention forward in Triton: the attention kernel's online softmax over key tiles whose
rows are loaded by index (no gathered K/V copy), the causal mask by original positions."""
import torch

from ._common import (LOG2E, Tuned, block_d, check_tensors, dot_precision, on_device, stride_align, strides, tl,
                      triton, tune_key, wide4)
from .attention import _space, attn_tile


def supports(q, k, v, kv_indices, kv_counts, q_positions, kv_positions, causal, scale) -> str | None:
    """None when this backend can run the inputs, else why not (one line)."""
    for name, t, dtype in (("kv_indices", kv_indices, torch.int64), ("kv_counts", kv_counts, torch.int32),
                           ("q_positions", q_positions, torch.int64), ("kv_positions", kv_positions, torch.int64)):
        if t.device != q.device or t.dtype != dtype or not t.is_contiguous():
            return f"{name} must be contiguous {dtype} on q's device"
    return check_tensors(q, k, v)


@triton.jit(do_not_specialize=["TUNE_KEY"])
def _index_fwd_kernel(Q, K, V, Out, Idx, Cnt, QPos, KPos,
                      stride_qb, stride_qh, stride_qm, stride_qd,
                      stride_kb, stride_kh, stride_kn, stride_kd,
                      stride_vb, stride_vh, stride_vn, stride_vd,
                      stride_ob, stride_oh, stride_om, stride_od,
                      Hq, Hkv, Nq, Nk, L, GROUP, qk_scale, TUNE_KEY,
                      HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, CAUSAL: tl.constexpr,
                      PRECISION: tl.constexpr, ALIGN: tl.constexpr, BLOCK_M: tl.constexpr,
                      BLOCK_N: tl.constexpr):
    """One query tile of one (batch, head) per program over the head's listed keys. Strides but
    the last come divided by ALIGN (see _common.stride_align); all become int64 (offsets may pass 2^31)."""
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
    # Counts and indices go unvalidated under torch.compile and internal calls: a count is clamped to
    # [0, L] and an index outside [0, Nk) is skipped, never read (results for such lists are unspecified).
    count = tl.minimum(tl.maximum(tl.load(Cnt + b * Hkv + kvh), 0), L)
    idx_base = Idx + (b * Hkv + kvh) * L

    offs_m = tile_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    row_ok = offs_m < Nq
    q = tl.load(Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qm + offs_d[None, :] * stride_qd,
                mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    if CAUSAL:
        q_pos = tl.load(QPos + b * Nq + offs_m, mask=row_ok, other=0)
    k_base = K + b * stride_kb + kvh * stride_kh + offs_d[None, :] * stride_kd
    v_base = V + b * stride_vb + kvh * stride_vh + offs_d[None, :] * stride_vd

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for start_n in range(0, count, BLOCK_N):
        listed = start_n + offs_n < count
        idx = tl.load(idx_base + start_n + offs_n, mask=listed, other=0)
        listed = listed & (idx >= 0) & (idx < Nk)
        idx = tl.where(listed, idx, 0)
        kv_mask = listed[:, None] & d_ok[None, :]
        k = tl.load(k_base + idx[:, None] * stride_kn, mask=kv_mask, other=0.0)
        v = tl.load(v_base + idx[:, None] * stride_vn, mask=kv_mask, other=0.0)
        visible = listed[None, :]
        if CAUSAL:
            k_pos = tl.load(KPos + b * Nk + idx, mask=listed, other=0)
            visible = visible & (k_pos[None, :] <= q_pos[:, None])
        acc, m_i, l_i = attn_tile(acc, m_i, l_i, q, k, v, qk_scale, visible, True, PRECISION)

    out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]  # rows without visible keys: 0, not NaN
    tl.store(Out + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_om + offs_d[None, :] * stride_od,
             out.to(Out.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])


_index_fwd = Tuned(_index_fwd_kernel, key=["TUNE_KEY", "BLOCK_D", "CAUSAL"], space=_space,
                   smem=lambda c, stages: c["BLOCK_M"] + 2 * c["BLOCK_N"] * stages,
                   interp=({"BLOCK_M": 16, "BLOCK_N": 16}, 4, 1))


def index_attention(q, k, v, kv_indices, kv_counts, q_positions, kv_positions, causal: bool, scale: float):
    """out [B, Hq, Nq, D] in q's dtype over [B, Nq, Hq, D] memory; q/k/v read through their strides."""
    B, Hq, Nq, D = q.shape
    Hkv, Nk = k.shape[1], k.shape[2]
    L = kv_indices.shape[2]
    out = torch.empty((B, Nq, Hq, D), dtype=q.dtype, device=q.device).transpose(1, 2)
    if out.numel() == 0 or Nk == 0 or L == 0:  # nothing to launch (and no pointer into an empty K/V)
        return out.zero_()
    grid = lambda meta: (B * Hq * triton.cdiv(Nq, meta["BLOCK_M"]),)  # noqa: E731
    align = stride_align(q, k, v, out)
    with on_device(q):
        _index_fwd[grid](
            q, k, v, out, kv_indices, kv_counts, q_positions, kv_positions,
            *strides(q, align), *strides(k, align), *strides(v, align), *strides(out, align),
            Hq, Hkv, Nq, Nk, L, Hq // Hkv, scale * LOG2E, tune_key(Nq, L, B * Hq),
            HEAD_DIM=D, BLOCK_D=block_d(D), CAUSAL=bool(causal), PRECISION=dot_precision(q.dtype), ALIGN=align)
    return out
