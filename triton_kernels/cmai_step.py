"""cmai_step in Triton: CMAI's pass 2 for a decode step's R text rows against the layer's record
(semantics in the reference, vtattn/reference/cmai_step.py), in three launches as the C++ kernel's
three passes; fp32 products reduced per key (a row a head: no tile for `tl.dot` to fill).

1. a program per (batch, query head), its rows in order: the row's logits against the text and image
   entries it sees, to scratch (-inf elsewhere), their log-sum-exp, its P_ti row written, then the
   head's share of its focus, sum over the visible text entries t of P_tt[t] * P_ti[t, :] (this row's
   P_ti row among them: barriers between);
2. a program per (batch, row): the head mean of the focus, the visible image keys' count n and the
   budget max(1, round(keep * n)) (half to even, in fp64 as Python's), each visible key's int64 key
   (the focus's order-preserving bits above its inverted index: ties to the lower index, NaN above
   every number; -1 off the row's keys) and the threshold, the budget-th largest key: 63 passes, one
   a bit from the top, counting the keys at or above a candidate (whatever the budget);
3. a program per (batch, query head): each row's softmax with the visible image keys below the
   threshold shifted by log(weight) (-inf for weight 0), times the values.
Scratch, allocated per call: fp32 logits [B * Hq, R, T + I] and focus shares [B * Hq, R, I], int64
keys [B * R, I] and thresholds [B * R]."""
import math
import struct

import torch

from ._common import DTYPES, MAX_HEAD_DIM, interpreting, on_device, tl, triton, wide, wide4
from .select_tokens import device_reason

MAX_PROGRAMS = 2**31 - 1  # grid x: B * Hq and B * R programs
MAX_IMAGE = 2**31  # a key's index field holds 31 bits


def supports(q, k_t, v_t, text, text_ok, k_i, v_i, image, image_ok, p_ti, keep, weight, scale) -> str | None:
    if q.dtype not in DTYPES or any(t.dtype != q.dtype for t in (k_t, v_t, k_i, v_i)):
        return f"q, k_t, v_t, k_i and v_i must share one of fp16/bf16/fp32, got {q.dtype}, {k_t.dtype}, {k_i.dtype}"
    if text.dtype != torch.int64 or image.dtype != torch.int64 or text_ok.dtype != torch.bool \
            or image_ok.dtype != torch.bool or p_ti.dtype != torch.float32:
        return "text / image must be int64, text_ok / image_ok bool and p_ti float32"
    if q.shape[-1] > MAX_HEAD_DIM:
        return f"head dim {q.shape[-1]} > {MAX_HEAD_DIM}"
    B, Hq, R = q.shape[:3]
    if B * max(Hq, R) > MAX_PROGRAMS:
        return f"at most {MAX_PROGRAMS} programs (B * Hq and B * R), got B {B}, Hq {Hq}, R {R}"
    if image.shape[1] >= MAX_IMAGE:
        return f"at most {MAX_IMAGE - 1} image entries, got {image.shape[1]}"
    return device_reason(q, k_t, v_t, text, text_ok, k_i, v_i, image, image_ok, p_ti)


@triton.jit
def _sees(Pos, sp, Ok, so, j, jm, at):
    """Which of entries j (jm: they exist) a row at position `at` sees: those holding a token at or before it."""
    p = tl.load(Pos + j * sp, mask=jm, other=0)
    ok = tl.load(Ok + j * so, mask=jm, other=0)
    return jm & (ok != 0) & (p <= at)


@triton.jit
def _logits(K, skn, skd, Pos, sp, Ok, so, n, at, ok, qr, scale, Row, m, total, d, dm, BLOCK_N: tl.constexpr):
    """A row's logits (query qr, position at; ok: it holds a token) against n entries, to Row (-inf
    where it does not see them), folded into the running max m and sum total."""
    for j0 in range(0, n, BLOCK_N):
        j = j0 + tl.arange(0, BLOCK_N)
        jm = j < n
        vis = _sees(Pos, sp, Ok, so, j, jm, at) & ok
        k = tl.load(K + j[:, None] * skn + d[None, :] * skd, mask=vis[:, None] & dm[None, :], other=0.0)
        s = tl.where(vis, tl.sum(k.to(tl.float32) * qr[None, :], 1) * scale, float("-inf"))
        tl.store(Row + j, s, mask=jm)
        mn = tl.maximum(m, tl.max(s, 0))
        safe = tl.where(mn == float("-inf"), 0.0, mn)  # (nothing seen yet: no NaN)
        total = total * tl.exp(m - safe) + tl.sum(tl.exp(s - safe), 0)
        m = mn
    return m, total


@triton.jit
def _share(P, sp2, sp3, Pos, sp, Ok, so, Row, lse, at, ok, T, I, Out,
           BLOCK_T: tl.constexpr, BLOCK_I: tl.constexpr):
    """A head's share of a row's focus to Out: sum over the text entries t it sees of exp(s_t - lse) * P[t, :]
    (only those: another entry's P_ti row may hold anything)."""
    for i0 in range(0, I, BLOCK_I):
        i = i0 + tl.arange(0, BLOCK_I)
        im = i < I
        acc = tl.zeros([BLOCK_I], tl.float32)
        for t0 in range(0, T, BLOCK_T):
            t = t0 + tl.arange(0, BLOCK_T)
            vis = _sees(Pos, sp, Ok, so, t, t < T, at) & ok
            w = tl.exp(tl.load(Row + t, mask=vis, other=float("-inf")) - lse)
            p = tl.load(P + t[:, None] * sp2 + i[None, :] * sp3, mask=vis[:, None] & im[None, :], other=0.0)
            acc += tl.sum(w[:, None] * p, 0)
        tl.store(Out + i, acc, mask=im)


@triton.jit
def _cmai_scores(Q, KT, KI, Text, TextOk, Image, ImageOk, P, Logits, Part,
                 sq0, sq1, sq2, sq3, skt0, skt1, skt2, skt3, ski0, ski1, ski2, ski3, st0, st1, sto0, sto1,
                 si0, si1, sio0, sio1, sp0, sp1, sp2, sp3, Hq, rep, R, T, I, D, scale,
                 BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_I: tl.constexpr):
    bh = tl.program_id(0).to(tl.int64)
    b, h = bh // Hq, bh % Hq
    sq0, sq1, sq2, sq3 = wide4(sq0, sq1, sq2, sq3, 1)
    skt0, skt1, skt2, skt3 = wide4(skt0, skt1, skt2, skt3, 1)
    ski0, ski1, ski2, ski3 = wide4(ski0, ski1, ski2, ski3, 1)
    sp0, sp1, sp2, sp3 = wide4(sp0, sp1, sp2, sp3, 1)
    st1, sto1, si1, sio1 = wide(st1, 1), wide(sto1, 1), wide(si1, 1), wide(sio1, 1)
    d = tl.arange(0, BLOCK_D)
    dm = d < D
    kt, ki = KT + b * skt0 + (h // rep) * skt1, KI + b * ski0 + (h // rep) * ski1
    text, text_ok, image, image_ok = Text + b * st0, TextOk + b * sto0, Image + b * si0, ImageOk + b * sio0
    for r in range(0, R):
        e = (T - R + r).to(tl.int64)
        at = tl.load(text + e * st1)
        ok = tl.load(text_ok + e * sto1) != 0
        qr = tl.load(Q + b * sq0 + h * sq1 + r * sq2 + d * sq3, mask=dm, other=0.0).to(tl.float32)
        row = Logits + (bh * R + r) * (T + I)
        m = tl.full([], float("-inf"), tl.float32)
        total = tl.zeros([], tl.float32)
        m, total = _logits(kt, skt2, skt3, text, st1, text_ok, sto1, T, at, ok, qr, scale, row, m, total, d, dm,
                           BLOCK_N)
        m, total = _logits(ki, ski2, ski3, image, si1, image_ok, sio1, I, at, ok, qr, scale, row + T, m, total, d,
                           dm, BLOCK_N)
        lse = tl.where(total > 0.0, m + tl.log(tl.where(total > 0.0, total, 1.0)), 0.0)  # (seeing nothing: P_ti 0)
        tl.debug_barrier()
        p_row = P + b * sp0 + h * sp1 + e * sp2
        for i0 in range(0, I, BLOCK_N):
            i = i0 + tl.arange(0, BLOCK_N)
            s = tl.load(row + T + i, mask=i < I, other=float("-inf"))
            tl.store(p_row + i * sp3, tl.exp(s - lse), mask=i < I)
        tl.debug_barrier()  # the row's own P_ti row is among those its focus reads
        _share(P + b * sp0 + h * sp1, sp2, sp3, text, st1, text_ok, sto1, row, lse, at, ok, T, I,
               Part + (bh * R + r) * I, BLOCK_T, BLOCK_I)


@triton.jit
def _key(f, i):
    """int64 keys ordered as (focus, -index): the focus's order-preserving bits (-0 as +0, NaN above
    every number) offset to [0, 2^32), above 2^31 - 1 - index (index < 2^31)."""
    bits = f.to(tl.int32, bitcast=True)
    bits = tl.where(f != f, 0x7FC00000, tl.where(f == 0.0, 0, bits))
    bits = tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits)  # negative floats: larger magnitude, smaller key
    return ((bits.to(tl.int64) + 0x7FFFFFFF + 1) << 31) | (0x7FFFFFFF - i)


@triton.jit
def _budget(keep, n):
    """max(1, round(keep * n)) as Python computes it (fp64 product, half to even); 0 for n = 0. The
    product is only compared, never subtracted from: a subtraction could fuse into an unrounded FMA."""
    x = keep * n.to(tl.float64)
    lo = x.to(tl.int64)  # (x >= 0: truncation is the floor)
    half = lo.to(tl.float64) + 0.5
    up = (x > half) | ((x == half) & (lo % 2 == 1))
    return tl.where(n > 0, tl.maximum(lo + up.to(tl.int64), 1), 0)


@triton.jit
def _threshold(Keys, I, budget, BLOCK_K: tl.constexpr):
    """The budget-th largest of I keys in [-1, 2^63): the largest candidate with `budget` keys at or above
    it, built a bit at a time from the top (every key at or above it is kept)."""
    thr = tl.zeros([], tl.int64)
    bit = tl.full([], 1 << 62, tl.int64)
    for _ in range(0, 63):
        cand = thr | bit
        count = tl.zeros([], tl.int32)
        for i0 in range(0, I, BLOCK_K):
            i = i0 + tl.arange(0, BLOCK_K)
            key = tl.load(Keys + i, mask=i < I, other=-1)
            count += tl.sum((key >= cand).to(tl.int32), 0)
        thr = tl.where(count >= budget, cand, thr)
        bit = bit >> 1
    return thr


@triton.jit
def _cmai_select(Text, TextOk, Image, ImageOk, Part, Keys, Thr, st0, st1, sto0, sto1, si0, si1, sio0, sio1,
                 Hq, R, T, I, keep_bits, BLOCK_K: tl.constexpr):
    br = tl.program_id(0).to(tl.int64)
    b, r = br // R, br % R
    e = T - R + r
    at = tl.load(Text + b * wide(st0, 1) + e * wide(st1, 1))
    ok = tl.load(TextOk + b * wide(sto0, 1) + e * wide(sto1, 1)) != 0
    image, image_ok, si1, sio1 = Image + b * wide(si0, 1), ImageOk + b * wide(sio0, 1), wide(si1, 1), wide(sio1, 1)
    keys = Keys + br * I
    n = tl.zeros([], tl.int32)
    for i0 in range(0, I, BLOCK_K):
        i = i0 + tl.arange(0, BLOCK_K)
        im = i < I
        f = tl.zeros([BLOCK_K], tl.float32)
        for h in range(0, Hq):  # (the C++ kernel's order: the sum over heads, then / Hq)
            f += tl.load(Part + ((b * Hq + h) * R + r) * I + i, mask=im, other=0.0)
        vis = _sees(image, si1, image_ok, sio1, i, im, at) & ok
        n += tl.sum(vis.to(tl.int32), 0)
        tl.store(keys + i, tl.where(vis, _key(tl.div_rn(f, tl.cast(Hq, tl.float32)), i), -1), mask=im)
    budget = _budget(tl.cast(keep_bits, tl.int64).to(tl.float64, bitcast=True), n)
    tl.debug_barrier()
    tl.store(Thr + br, _threshold(keys, I, budget, BLOCK_K))


@triton.jit
def _fold(V, svn, svd, Row, Keys, thr, shift, n, m, total, acc, d, dm, IMAGE: tl.constexpr, BLOCK_N: tl.constexpr):
    """n entries' logits in Row (image entries below the threshold shifted) times their values V, folded
    into the running max m, sum total and output acc."""
    for j0 in range(0, n, BLOCK_N):
        j = j0 + tl.arange(0, BLOCK_N)
        jm = j < n
        s = tl.load(Row + j, mask=jm, other=float("-inf"))
        if IMAGE:
            key = tl.load(Keys + j, mask=jm, other=-1)
            s = tl.where((key >= 0) & (key < thr), s + shift, s)
        live = s > float("-inf")
        v = tl.load(V + j[:, None] * svn + d[None, :] * svd, mask=live[:, None] & dm[None, :], other=0.0)
        mn = tl.maximum(m, tl.max(s, 0))
        safe = tl.where(mn == float("-inf"), 0.0, mn)
        alpha = tl.exp(m - safe)
        p = tl.exp(s - safe)
        total = total * alpha + tl.sum(p, 0)
        acc = acc * alpha + tl.sum(p[:, None] * v.to(tl.float32), 0)
        m = mn
    return m, total, acc


@triton.jit
def _cmai_attend(VT, VI, Logits, Keys, Thr, Out, svt0, svt1, svt2, svt3, svi0, svi1, svi2, svi3,
                 Hq, rep, R, T, I, D, shift, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    bh = tl.program_id(0).to(tl.int64)
    b, h = bh // Hq, bh % Hq
    svt0, svt1, svt2, svt3 = wide4(svt0, svt1, svt2, svt3, 1)
    svi0, svi1, svi2, svi3 = wide4(svi0, svi1, svi2, svi3, 1)
    d = tl.arange(0, BLOCK_D)
    dm = d < D
    vt, vi = VT + b * svt0 + (h // rep) * svt1, VI + b * svi0 + (h // rep) * svi1
    for r in range(0, R):
        row = Logits + (bh * R + r) * (T + I)
        keys = Keys + (b * R + r) * I
        thr = tl.load(Thr + b * R + r)
        m = tl.full([], float("-inf"), tl.float32)
        total = tl.zeros([], tl.float32)
        acc = tl.zeros([BLOCK_D], tl.float32)
        m, total, acc = _fold(vt, svt2, svt3, row, keys, thr, shift, T, m, total, acc, d, dm, False, BLOCK_N)
        m, total, acc = _fold(vi, svi2, svi3, row + T, keys, thr, shift, I, m, total, acc, d, dm, True, BLOCK_N)
        out = tl.where(total > 0.0, acc / tl.where(total > 0.0, total, 1.0), 0.0)
        tl.store(Out + (bh * R + r) * D + d, out, mask=dm)


def _blocks(block_d: int) -> dict:
    """Tile sizes: 2048 fp32 elements a key / value / P_ti tile (no spills at 4 warps on sm_80 / sm_90; 4096
    spill at D 128); small under the interpreter (several tiles on small inputs)."""
    if interpreting():
        return dict(BLOCK_N=8, BLOCK_T=4, BLOCK_I=8, BLOCK_K=8)
    return dict(BLOCK_N=max(16, 2048 // block_d), BLOCK_T=16, BLOCK_I=128, BLOCK_K=1024)


def cmai_step(q, k_t, v_t, text, text_ok, k_i, v_i, image, image_ok, p_ti, keep, weight, scale):
    B, Hq, R, D = q.shape
    T, I = text.shape[1], image.shape[1]
    out = torch.empty(B, Hq, R, D, dtype=torch.float32, device=q.device)
    if out.numel() == 0:
        return out
    rep = Hq // k_t.shape[1]
    logits = torch.empty(B * Hq * R * (T + I), dtype=torch.float32, device=q.device)
    part = torch.empty(B * Hq * R * I, dtype=torch.float32, device=q.device)
    keys = torch.empty(B * R * I, dtype=torch.int64, device=q.device)
    thr = torch.empty(B * R, dtype=torch.int64, device=q.device)
    block_d = triton.next_power_of_2(D)
    blocks = _blocks(block_d)
    keep_bits = struct.unpack("<q", struct.pack("<d", keep))[0]  # keep as fp64: the budget rounds as Python's
    shift = math.log(weight) if weight > 0 else float("-inf")
    positions = (*text.stride(), *text_ok.stride(), *image.stride(), *image_ok.stride())
    with on_device(q):
        _cmai_scores[(B * Hq,)](
            q, k_t, k_i, text, text_ok, image, image_ok, p_ti, logits, part, *q.stride(), *k_t.stride(),
            *k_i.stride(), *positions, *p_ti.stride(), Hq, rep, R, T, I, D, scale, BLOCK_N=blocks["BLOCK_N"],
            BLOCK_D=block_d, BLOCK_T=blocks["BLOCK_T"], BLOCK_I=blocks["BLOCK_I"], num_warps=4)
        _cmai_select[(B * R,)](text, text_ok, image, image_ok, part, keys, thr, *positions, Hq, R, T, I, keep_bits,
                               BLOCK_K=blocks["BLOCK_K"], num_warps=4)
        _cmai_attend[(B * Hq,)](v_t, v_i, logits, keys, thr, out, *v_t.stride(), *v_i.stride(), Hq, rep, R, T, I, D,
                                shift, BLOCK_N=blocks["BLOCK_N"], BLOCK_D=block_d, num_warps=4)
    return out
