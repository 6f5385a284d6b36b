"""Group attention forward in Triton: the flash loop (online softmax over key tiles) with one output
accumulator and one mass accumulator per key group, all rescaled by the same running max; the key
tile's group ids pick each probability's accumulator (a hidden key, group -1, joins none and is
masked out of the softmax)."""
import torch

from ._common import (LOG2E, Tuned, block_d, check_tensors, dot_precision, on_device, online_softmax,
                      stride_align, strides, tiles, tl, triton, tune_key, wide4)

MAX_GROUPS = 4  # accumulators are unrolled: registers grow with each group


def supports(q, k, v, groups, num_groups, causal, scale) -> str | None:
    """None when this backend can run the inputs, else why not (one line)."""
    if num_groups > MAX_GROUPS:
        return f"num_groups {num_groups} > {MAX_GROUPS} (the Triton kernel unrolls one accumulator per group)"
    if groups.device != q.device or groups.dtype != torch.int64 or not groups.is_contiguous():
        return "groups must be contiguous int64 on q's device"
    return check_tensors(q, k, v)


def _space(esize, bd):
    """G fp32 [BLOCK_M, BLOCK_D] accumulators live in registers: tiles that compile without spills for
    sm_90 at G = 3 and 4 with triton 3.6 and 3.9 (compile_triton.py fails on a spill; numbers in
    docs/gpu-status.md): BLOCK_N = 64 spills at every head dim, BLOCK_M = 64 past D = 64 (and
    128 x 32 with two stages at 64), and fp32's FMA dots need BLOCK_N = 16 (one stage past D = 64)."""
    if esize == 4:
        if bd <= 64:
            return tiles((32, 16, 8, 2), (16, 16, 4, 2))
        return tiles((16, 16, 8, 1), (16, 16, 4, 1)) if bd <= 128 else tiles((16, 16, 8, 1))
    if bd <= 64:
        return tiles((32, 32, 4, 2), (128, 32, 8, 3))
    if bd <= 128:
        return tiles((32, 32, 4, 2), (16, 16, 4, 2))
    return tiles((32, 32, 8, 2), (32, 16, 8, 2), (16, 16, 8, 2), (16, 16, 4, 2))


@triton.jit
def _accumulate(acc, mass, p, grp, g: tl.constexpr, v, alpha, PRECISION: tl.constexpr):
    """Group g's share of a tile's probabilities p [M, N] into its output and mass accumulators."""
    pg = tl.where(grp[None, :] == g, p, 0.0)
    acc = tl.dot(pg.to(v.dtype), v, acc * alpha[:, None], input_precision=PRECISION)
    return acc, mass * alpha + tl.sum(pg, 1)


@triton.jit
def _store(Out, Mass, acc, mass, inv, g: tl.constexpr, out_rows, mass_rows, offs_d, row_ok, d_ok,
           G: tl.constexpr, HEAD_DIM: tl.constexpr):
    tl.store(Out + out_rows[:, None] + g * HEAD_DIM + offs_d[None, :], acc * inv[:, None],
             mask=row_ok[:, None] & d_ok[None, :])
    tl.store(Mass + mass_rows + g, mass * inv, mask=row_ok)


@triton.jit(do_not_specialize=["TUNE_KEY"])
def _group_fwd_kernel(Q, K, V, Grp, Out, Mass,
                      stride_qb, stride_qh, stride_qm, stride_qd,
                      stride_kb, stride_kh, stride_kn, stride_kd,
                      stride_vb, stride_vh, stride_vn, stride_vd,
                      Hq, Nq, Nk, GROUP, qk_scale, TUNE_KEY,
                      G: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, CAUSAL: tl.constexpr,
                      PRECISION: tl.constexpr, ALIGN: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """One query tile of one (batch, head) per program. Out: contiguous fp32 [B, Nq, Hq, G, D]; Mass:
    contiguous fp32 [B, Hq, Nq, G]. Input strides but the last come divided by ALIGN."""
    stride_qb, stride_qh, stride_qm, stride_qd = wide4(stride_qb, stride_qh, stride_qm, stride_qd, ALIGN)
    stride_kb, stride_kh, stride_kn, stride_kd = wide4(stride_kb, stride_kh, stride_kn, stride_kd, ALIGN)
    stride_vb, stride_vh, stride_vn, stride_vd = wide4(stride_vb, stride_vh, stride_vn, stride_vd, ALIGN)
    num_m = tl.cdiv(Nq, BLOCK_M)
    pid = tl.program_id(0)
    bh = pid // num_m
    tile_m = pid % num_m
    b = (bh // Hq).to(tl.int64)
    h = (bh % Hq).to(tl.int64)
    kvh = h // GROUP

    offs_m = tile_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    row_ok = offs_m < Nq
    q = tl.load(Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qm + offs_d[None, :] * stride_qd,
                mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    k_base = K + b * stride_kb + kvh * stride_kh + offs_d[None, :] * stride_kd
    v_base = V + b * stride_vb + kvh * stride_vh + offs_d[None, :] * stride_vd
    causal_off = Nk - Nq
    end = Nk
    if CAUSAL:  # tiles right of the tile's last row see nothing
        end = tl.minimum(Nk, tl.maximum(0, (tile_m + 1) * BLOCK_M + causal_off))

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc0 = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    acc1 = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    acc2 = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    acc3 = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    mass0 = tl.zeros([BLOCK_M], tl.float32)
    mass1 = tl.zeros([BLOCK_M], tl.float32)
    mass2 = tl.zeros([BLOCK_M], tl.float32)
    mass3 = tl.zeros([BLOCK_M], tl.float32)
    for start_n in range(0, end, BLOCK_N):
        cols = start_n + offs_n
        col_ok = cols < Nk
        grp = tl.load(Grp + b * Nk + cols, mask=col_ok, other=-1)
        kv_ok = (col_ok & (grp >= 0))[:, None] & d_ok[None, :]  # a hidden key is never read (NaN stays out)
        k = tl.load(k_base + cols[:, None] * stride_kn, mask=kv_ok, other=0.0)
        v = tl.load(v_base + cols[:, None] * stride_vn, mask=kv_ok, other=0.0)
        visible = (grp >= 0)[None, :] & row_ok[:, None]
        if CAUSAL:
            visible = visible & (cols[None, :] <= offs_m[:, None] + causal_off)
        qk = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
        qk = tl.where(visible, qk, float("-inf"))
        m_i, l_i, p, alpha = online_softmax(m_i, l_i, qk, True)
        acc0, mass0 = _accumulate(acc0, mass0, p, grp, 0, v, alpha, PRECISION)
        if G > 1:
            acc1, mass1 = _accumulate(acc1, mass1, p, grp, 1, v, alpha, PRECISION)
        if G > 2:
            acc2, mass2 = _accumulate(acc2, mass2, p, grp, 2, v, alpha, PRECISION)
        if G > 3:
            acc3, mass3 = _accumulate(acc3, mass3, p, grp, 3, v, alpha, PRECISION)

    inv = 1.0 / tl.where(l_i == 0.0, 1.0, l_i)  # rows without visible keys: 0, not NaN
    out_rows = ((b * Nq + offs_m) * Hq + h) * (G * HEAD_DIM)
    mass_rows = ((b * Hq + h) * Nq + offs_m) * G
    _store(Out, Mass, acc0, mass0, inv, 0, out_rows, mass_rows, offs_d, row_ok, d_ok, G, HEAD_DIM)
    if G > 1:
        _store(Out, Mass, acc1, mass1, inv, 1, out_rows, mass_rows, offs_d, row_ok, d_ok, G, HEAD_DIM)
    if G > 2:
        _store(Out, Mass, acc2, mass2, inv, 2, out_rows, mass_rows, offs_d, row_ok, d_ok, G, HEAD_DIM)
    if G > 3:
        _store(Out, Mass, acc3, mass3, inv, 3, out_rows, mass_rows, offs_d, row_ok, d_ok, G, HEAD_DIM)


_group_fwd = Tuned(_group_fwd_kernel, key=["TUNE_KEY", "BLOCK_D", "CAUSAL", "G"], space=_space,
                   smem=lambda c, stages: c["BLOCK_M"] + 2 * c["BLOCK_N"] * stages,
                   interp=({"BLOCK_M": 16, "BLOCK_N": 16}, 4, 1))


def group_attention(q, k, v, groups, num_groups: int, causal: bool, scale: float):
    """(out [B, Hq, Nq, G, D] fp32 over [B, Nq, Hq, G, D] memory, mass [B, Hq, Nq, G] fp32)."""
    B, Hq, Nq, D = q.shape
    Hkv, Nk = k.shape[1], k.shape[2]
    G = num_groups
    out = torch.empty((B, Nq, Hq, G, D), dtype=torch.float32, device=q.device).transpose(1, 2)
    mass = torch.empty((B, Hq, Nq, G), dtype=torch.float32, device=q.device)
    if out.numel() == 0 or Nk == 0:  # nothing to launch (and no pointer into an empty K/V)
        return out.zero_(), mass.zero_()
    grid = lambda meta: (B * Hq * triton.cdiv(Nq, meta["BLOCK_M"]),)  # noqa: E731
    align = stride_align(q, k, v)
    with on_device(q):
        _group_fwd[grid](
            q, k, v, groups, out, mass, *strides(q, align), *strides(k, align), *strides(v, align),
            Hq, Nq, Nk, Hq // Hkv, scale * LOG2E, tune_key(Nq, Nk, B * Hq),
            G=G, HEAD_DIM=D, BLOCK_D=block_d(D), CAUSAL=bool(causal), PRECISION=dot_precision(q.dtype), ALIGN=align)
    return out, mass
