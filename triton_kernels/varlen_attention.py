"""Varlen (packed) flash-attention forward in Triton: the attention kernel's loop per sequence."""
import torch

from ._common import (LOG2E_K, Tuned, block_d, check_tensors, dot_precision, fill_empty_lse, logit_scales, on_device,
                      stride_align, strides, tl, triton, tune_key, wide, window_arg)
from .attention import _space, sweep_keys


def supports(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, causal, scale, softcap=0.0, window=-1,
             sinks=None) -> str | None:
    """None when this backend can run the inputs, else why not (one line)."""
    for name, cu in (("cu_seqlens_q", cu_seqlens_q), ("cu_seqlens_k", cu_seqlens_k)):
        if cu.device != q.device or cu.dtype != torch.int32:
            return f"{name} must be int32 on q's device"
    return check_tensors(q, k, v)


@triton.jit(do_not_specialize=["TUNE_KEY"])
def _varlen_fwd_kernel(Q, K, V, Sinks, Out, Lse, CuQ, CuK,
                       stride_qt, stride_qh, stride_qd, stride_kt, stride_kh, stride_kd,
                       stride_vt, stride_vh, stride_vd, stride_ot, stride_oh, stride_od,
                       Tq, Tk, Hq, MAX_SEQ, GROUP, qk_scale, cap, window, TUNE_KEY,
                       HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, CAUSAL: tl.constexpr,
                       SOFTCAP: tl.constexpr, WINDOW: tl.constexpr, HAS_SINK: tl.constexpr,
                       PRECISION: tl.constexpr, ALIGN: tl.constexpr, BLOCK_M: tl.constexpr,
                       BLOCK_N: tl.constexpr):
    """One query tile of one (sequence, head) per program; tiles past the sequence's end store
    nothing. Strides but the last come divided by ALIGN (see _common.stride_align); all become int64
    (offsets may pass 2^31)."""
    stride_qt, stride_qh, stride_qd = wide(stride_qt, ALIGN), wide(stride_qh, ALIGN), wide(stride_qd, 1)
    stride_kt, stride_kh, stride_kd = wide(stride_kt, ALIGN), wide(stride_kh, ALIGN), wide(stride_kd, 1)
    stride_vt, stride_vh, stride_vd = wide(stride_vt, ALIGN), wide(stride_vh, ALIGN), wide(stride_vd, 1)
    stride_ot, stride_oh, stride_od = wide(stride_ot, ALIGN), wide(stride_oh, ALIGN), wide(stride_od, 1)
    num_m = tl.cdiv(MAX_SEQ, BLOCK_M)
    pid = tl.program_id(0)
    bh = pid // num_m  # query tiles of one (sequence, head) adjacent: its K/V stay in L2
    tile_m = pid % num_m
    b = bh // Hq
    h = (bh % Hq).to(tl.int64)
    kvh = h // GROUP
    # cu_seqlens go unvalidated under torch.compile and internal calls: clamped into [0, T] and
    # non-decreasing, so no offset leaves the packed tensors. Lengths and loop bounds stay int32.
    q_lo = tl.minimum(tl.maximum(tl.load(CuQ + b), 0), Tq)
    Nq = tl.minimum(tl.maximum(tl.load(CuQ + b + 1), q_lo), Tq) - q_lo
    k_lo = tl.minimum(tl.maximum(tl.load(CuK + b), 0), Tk)
    Nk = tl.minimum(tl.maximum(tl.load(CuK + b + 1), k_lo), Tk) - k_lo
    q0 = q_lo.to(tl.int64)
    k0 = k_lo.to(tl.int64)

    offs_m = tile_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    row_ok = offs_m < Nq
    q = tl.load(Q + (q0 + offs_m)[:, None] * stride_qt + h * stride_qh + offs_d[None, :] * stride_qd,
                mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    k_ptrs = K + (k0 + offs_n)[:, None] * stride_kt + kvh * stride_kh + offs_d[None, :] * stride_kd
    v_ptrs = V + (k0 + offs_n)[:, None] * stride_vt + kvh * stride_vh + offs_d[None, :] * stride_vd

    sink = 0.0
    if HAS_SINK:
        sink = tl.load(Sinks + h) * LOG2E_K
    # A tile past the sequence's end has row_hi < row_lo: an empty key range.
    out, lse = sweep_keys(q, k_ptrs, v_ptrs, stride_kt, stride_vt, tile_m * BLOCK_M, offs_m, Nq, Nk, qk_scale, cap,
                          window, sink, CAUSAL, SOFTCAP, WINDOW, HAS_SINK, HEAD_DIM, BLOCK_D, PRECISION, BLOCK_M,
                          BLOCK_N)
    tl.store(Out + (q0 + offs_m)[:, None] * stride_ot + h * stride_oh + offs_d[None, :] * stride_od,
             out.to(Out.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])
    tl.store(Lse + h * Tq + q0 + offs_m, lse, mask=row_ok)


_varlen_fwd = Tuned(_varlen_fwd_kernel, key=["TUNE_KEY", "BLOCK_D", "CAUSAL", "WINDOW", "SOFTCAP"],
                    space=_space,
                    smem=lambda c, stages: c["BLOCK_M"] + 2 * c["BLOCK_N"] * stages,
                    interp=({"BLOCK_M": 16, "BLOCK_N": 16}, 4, 1))


def varlen_attention(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q: int, causal: bool, scale: float,
                     softcap: float = 0.0, window: int = -1, sinks=None):
    """(out [Tq, Hq, D] contiguous in q's dtype, lse [Hq, Tq] fp32); inputs read through their strides;
    sinks fp32 contiguous [Hq] or None."""
    Tq, Hq, D = q.shape
    Tk, Hkv = k.shape[:2]
    B = cu_seqlens_q.numel() - 1
    out = torch.empty((Tq, Hq, D), dtype=q.dtype, device=q.device)
    lse = torch.empty((Hq, Tq), dtype=torch.float32, device=q.device)
    if Tq == 0 or Tk == 0 or max_seqlen_q == 0:  # nothing to launch (and no pointer into an empty K/V)
        return out.zero_(), fill_empty_lse(lse, sinks)
    grid = lambda meta: (B * Hq * triton.cdiv(max_seqlen_q, meta["BLOCK_M"]),)  # noqa: E731
    align = stride_align(q, k, v, out)
    window = window_arg(window, Tk)  # Tk bounds every sequence's key count
    with on_device(q):
        _varlen_fwd[grid](
            q, k, v, sinks, out, lse, cu_seqlens_q, cu_seqlens_k,
            *strides(q, align), *strides(k, align), *strides(v, align), *strides(out, align),
            Tq, Tk, Hq, max_seqlen_q, Hq // Hkv, *logit_scales(scale, softcap), window,
            tune_key(max_seqlen_q, Tk // max(B, 1), B * Hq), HEAD_DIM=D, BLOCK_D=block_d(D), CAUSAL=bool(causal),
            SOFTCAP=softcap > 0, WINDOW=window >= 0, HAS_SINK=sinks is not None, PRECISION=dot_precision(q.dtype),
            ALIGN=align)
    return out, lse
