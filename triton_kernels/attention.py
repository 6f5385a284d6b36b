"""Flash-attention forward (out and LSE) in Triton; semantics in docs/internals.md."""
import torch

from ._common import (LOG2E_K, Tuned, add_sink, block_d, cap_logits, check_tensors, dot_precision, fill_empty_lse,
                      finish_lse, fp32_tiles, key_range, logit_scales, on_device, online_softmax, stride_align, strides,
                      tiles, tl, triton, tune_key, visible_keys, wide4, window_arg)


def supports(q, k, v, causal, scale, softcap=0.0, window=-1, sinks=None) -> str | None:
    """None when this backend can run the inputs, else why not (one line)."""
    return check_tensors(q, k, v)


@triton.jit
def attn_tile(acc, m_i, l_i, q, k, v, qk_scale, visible, MASKED: tl.constexpr, PRECISION: tl.constexpr,
              cap=1.0, SOFTCAP: tl.constexpr = False):
    """One key tile of the online-softmax loop: q [M, D], k/v [N, D], visible [M, N] (read when MASKED);
    logits from _common.logit_scales' qk_scale and cap (SOFTCAP off by default: index attention has none)."""
    qk = cap_logits(tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale, cap, SOFTCAP)
    if MASKED:
        qk = tl.where(visible, qk, float("-inf"))
    m_i, l_i, p, alpha = online_softmax(m_i, l_i, qk, MASKED)
    acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=PRECISION)
    return acc, m_i, l_i


@triton.jit
def key_tile(acc, m_i, l_i, q, k_ptrs, v_ptrs, stride_kn, stride_vn, start_n, offs_m, Nk, causal_off, qk_scale,
             MASKED: tl.constexpr, CAUSAL: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
             BLOCK_N: tl.constexpr, PRECISION: tl.constexpr, cap=1.0, window=0, SOFTCAP: tl.constexpr = False,
             WINDOW: tl.constexpr = False):
    """Keys [start_n, start_n + BLOCK_N) into the online softmax. MASKED for the ragged last tile, the
    causal diagonal and the window's edge; tiles every row sees whole skip the masks. Softcap and window
    are off by default (block-sparse attention has neither)."""
    d_ok = tl.arange(0, BLOCK_D) < HEAD_DIM
    if MASKED:
        cols = start_n + tl.arange(0, BLOCK_N)
        kv_mask = (cols < Nk)[:, None] & d_ok[None, :]
        k = tl.load(k_ptrs + start_n * stride_kn, mask=kv_mask, other=0.0)
        v = tl.load(v_ptrs + start_n * stride_vn, mask=kv_mask, other=0.0)
        visible = visible_keys(offs_m, cols, Nk, causal_off, window, CAUSAL, WINDOW)
        acc, m_i, l_i = attn_tile(acc, m_i, l_i, q, k, v, qk_scale, visible, True, PRECISION, cap, SOFTCAP)
    else:
        k = tl.load(k_ptrs + start_n * stride_kn, mask=d_ok[None, :], other=0.0)
        v = tl.load(v_ptrs + start_n * stride_vn, mask=d_ok[None, :], other=0.0)
        acc, m_i, l_i = attn_tile(acc, m_i, l_i, q, k, v, qk_scale, None, False, PRECISION, cap, SOFTCAP)
    return acc, m_i, l_i


@triton.jit
def sweep_keys(q, k_ptrs, v_ptrs, stride_kn, stride_vn, row_lo, offs_m, Nq, Nk, qk_scale, cap, window, sink,
               CAUSAL: tl.constexpr, SOFTCAP: tl.constexpr, WINDOW: tl.constexpr, HAS_SINK: tl.constexpr,
               HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr, BLOCK_M: tl.constexpr,
               BLOCK_N: tl.constexpr):
    """A query tile (rows offs_m, starting at row_lo) against every key it sees -> (out fp32, lse).
    k_ptrs/v_ptrs point at key 0's tile; shared by the dense and varlen kernels. sink: the head's sink
    logit in the log2 domain (read when HAS_SINK), folded in once after the keys."""
    causal_off = Nk - Nq
    lo, mid, full, end = key_range(row_lo, tl.minimum(row_lo + BLOCK_M, Nq) - 1, Nk, causal_off, window,
                                   CAUSAL, WINDOW, BLOCK_N)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for start_n in range(lo, mid, BLOCK_N):  # the window's left edge
        acc, m_i, l_i = key_tile(acc, m_i, l_i, q, k_ptrs, v_ptrs, stride_kn, stride_vn, start_n, offs_m, Nk,
                                 causal_off, qk_scale, True, CAUSAL, HEAD_DIM, BLOCK_D, BLOCK_N, PRECISION, cap,
                                 window, SOFTCAP, WINDOW)
    for start_n in range(mid, full, BLOCK_N):  # tiles every row sees entirely: no masks
        acc, m_i, l_i = key_tile(acc, m_i, l_i, q, k_ptrs, v_ptrs, stride_kn, stride_vn, start_n, offs_m, Nk,
                                 causal_off, qk_scale, False, CAUSAL, HEAD_DIM, BLOCK_D, BLOCK_N, PRECISION, cap,
                                 window, SOFTCAP, WINDOW)
    for start_n in range(tl.maximum(mid, full), end, BLOCK_N):  # the diagonal (causal) and the ragged last tile
        acc, m_i, l_i = key_tile(acc, m_i, l_i, q, k_ptrs, v_ptrs, stride_kn, stride_vn, start_n, offs_m, Nk,
                                 causal_off, qk_scale, True, CAUSAL, HEAD_DIM, BLOCK_D, BLOCK_N, PRECISION, cap,
                                 window, SOFTCAP, WINDOW)
    if HAS_SINK:
        m_i, l_i, alpha = add_sink(m_i, l_i, sink)
        acc = acc * alpha[:, None]
    out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]  # rows without visible keys: 0, not NaN
    return out, finish_lse(m_i, l_i)


def _space(esize, bd):
    if esize == 4:
        return tiles(*fp32_tiles(bd))
    if bd <= 128:
        return tiles((128, 64, 8, 3), (64, 64, 4, 3), (64, 64, 4, 4), (64, 64, 4, 2), (64, 128, 4, 2),
                     (64, 128, 8, 3), (128, 32, 4, 3), (128, 64, 8, 2), (128, 64, 8, 4),
                     (128, 128, 8, 2), (128, 128, 8, 3), (64, 32, 4, 4), (64, 32, 4, 3))
    return tiles((128, 64, 8, 2), (64, 64, 4, 2), (64, 32, 4, 3), (64, 32, 4, 2))


@triton.jit(do_not_specialize=["TUNE_KEY"])
def _attention_fwd_kernel(Q, K, V, Sinks, Out, Lse,
                          stride_qb, stride_qh, stride_qm, stride_qd,
                          stride_kb, stride_kh, stride_kn, stride_kd,
                          stride_vb, stride_vh, stride_vn, stride_vd,
                          stride_ob, stride_oh, stride_om, stride_od,
                          Hq, Nq, Nk, GROUP, qk_scale, cap, window, TUNE_KEY,
                          HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, CAUSAL: tl.constexpr,
                          SOFTCAP: tl.constexpr, WINDOW: tl.constexpr, HAS_SINK: tl.constexpr,
                          PRECISION: tl.constexpr, ALIGN: tl.constexpr, BLOCK_M: tl.constexpr,
                          BLOCK_N: tl.constexpr):
    """out = softmax(scale q k^T) v and the rows' lse; one query tile per program. Strides but the
    last come divided by ALIGN (see _common.stride_align); all become int64 (offsets may pass 2^31).
    Sinks: fp32 [Hq], read when HAS_SINK."""
    stride_qb, stride_qh, stride_qm, stride_qd = wide4(stride_qb, stride_qh, stride_qm, stride_qd, ALIGN)
    stride_kb, stride_kh, stride_kn, stride_kd = wide4(stride_kb, stride_kh, stride_kn, stride_kd, ALIGN)
    stride_vb, stride_vh, stride_vn, stride_vd = wide4(stride_vb, stride_vh, stride_vn, stride_vd, ALIGN)
    stride_ob, stride_oh, stride_om, stride_od = wide4(stride_ob, stride_oh, stride_om, stride_od, ALIGN)
    # 1-D grid, query tiles of one head adjacent (K/V stay in L2); GQA heads of a group are adjacent too.
    num_m = tl.cdiv(Nq, BLOCK_M)
    pid = tl.program_id(0)
    bh = pid // num_m
    tile_m = pid % num_m
    if CAUSAL:
        tile_m = num_m - 1 - tile_m  # the longest rows start first: shorter tail
    b = (bh // Hq).to(tl.int64)
    h = bh % Hq
    kvh = (h // GROUP).to(tl.int64)
    h = h.to(tl.int64)

    offs_m = tile_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    q = tl.load(Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qm + offs_d[None, :] * stride_qd,
                mask=(offs_m < Nq)[:, None] & d_ok[None, :], other=0.0)
    k_ptrs = K + b * stride_kb + kvh * stride_kh + offs_n[:, None] * stride_kn + offs_d[None, :] * stride_kd
    v_ptrs = V + b * stride_vb + kvh * stride_vh + offs_n[:, None] * stride_vn + offs_d[None, :] * stride_vd

    sink = 0.0
    if HAS_SINK:
        sink = tl.load(Sinks + h) * LOG2E_K
    out, lse = sweep_keys(q, k_ptrs, v_ptrs, stride_kn, stride_vn, tile_m * BLOCK_M, offs_m, Nq, Nk, qk_scale, cap,
                          window, sink, CAUSAL, SOFTCAP, WINDOW, HAS_SINK, HEAD_DIM, BLOCK_D, PRECISION, BLOCK_M,
                          BLOCK_N)
    tl.store(Out + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_om + offs_d[None, :] * stride_od,
             out.to(Out.dtype.element_ty), mask=(offs_m < Nq)[:, None] & d_ok[None, :])
    tl.store(Lse + bh.to(tl.int64) * Nq + offs_m, lse, mask=offs_m < Nq)


_attention_fwd = Tuned(_attention_fwd_kernel, key=["TUNE_KEY", "BLOCK_D", "CAUSAL", "WINDOW", "SOFTCAP"],
                       space=_space,
                       smem=lambda c, stages: c["BLOCK_M"] + 2 * c["BLOCK_N"] * stages,  # q + pipelined k, v
                       interp=({"BLOCK_M": 32, "BLOCK_N": 16}, 4, 1))


def attention(q, k, v, causal: bool, scale: float, softcap: float = 0.0, window: int = -1, sinks=None):
    """(out [B, Hq, Nq, D] in q's dtype stored token-major ([B, Nq, Hq, D] memory, as SDPA),
    lse [B, Hq, Nq] fp32); inputs read through their strides; sinks fp32 contiguous [Hq] or None."""
    B, Hq, Nq, D = q.shape
    Hkv, Nk = k.shape[1], k.shape[2]
    out = torch.empty((B, Nq, Hq, D), dtype=q.dtype, device=q.device).transpose(1, 2)
    lse = torch.empty((B, Hq, Nq), dtype=torch.float32, device=q.device)
    if out.numel() == 0 or Nk == 0:  # nothing to launch (and no pointer into an empty K/V)
        return out.zero_(), fill_empty_lse(lse, sinks)
    grid = lambda meta: (B * Hq * triton.cdiv(Nq, meta["BLOCK_M"]),)  # noqa: E731
    align = stride_align(q, k, v, out)
    window = window_arg(window, Nk)
    with on_device(q):
        _attention_fwd[grid](
            q, k, v, sinks, out, lse, *strides(q, align), *strides(k, align), *strides(v, align),
            *strides(out, align), Hq, Nq, Nk, Hq // Hkv, *logit_scales(scale, softcap), window,
            tune_key(Nq, Nk, B * Hq), HEAD_DIM=D, BLOCK_D=block_d(D), CAUSAL=bool(causal), SOFTCAP=softcap > 0,
            WINDOW=window >= 0, HAS_SINK=sinks is not None, PRECISION=dot_precision(q.dtype), ALIGN=align)
    return out, lse
