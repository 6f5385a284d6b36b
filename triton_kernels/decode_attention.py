"""Decode attention over a per-(batch, kv head) variable-length KV cache in Triton (flash-decoding).

A split kernel runs one program per (batch, kv head, split of the key range): the query heads of
the GQA group share each K/V tile, so the cache is read once per group. It writes the split's
normalised partial output and log2-domain LSE; a merge kernel combines the splits of each query
head by their LSE. The split count depends on shapes and the SM count only, never on `lengths`
(no host sync, CUDA-graph safe): splits that start past a head's length do no work and the merge
kernel skips them.

The paged variant (paged_decode_attention.py) is the same kernel with a PAGE address path: key j of
(b, g) is row j % PAGE of page BlockTable[b, g, j // PAGE] of the pool, looked up per key, so any
page size works and a tile may straddle pages."""
import functools

import torch

from ._common import LOG2E, block_d, check_tensors, dot_precision, interpreting, on_device, stride_align, strides, \
    tl, triton, wide

# Keys per split at least this many (a split's fixed cost must stay small next to its reads);
# tiny under the interpreter so small test caches still span several splits.
_MIN_CHUNK = 16 if interpreting() else 256
_MAX_SPLITS = 128
_PROGRAMS_PER_SM = 8  # enough resident programs per SM to keep the loads in flight


def supports(q, k_cache, v_cache, lengths, scale) -> str | None:
    """None when this backend can run the inputs, else why not (one line)."""
    return check_tensors(q, k_cache, v_cache)


@functools.cache
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def num_splits(cap: int, heads: int, device: torch.device) -> int:
    """Splits of the cache's key range: enough programs to fill the device when every head is full,
    each split at least _MIN_CHUNK keys. Shapes only: never reads lengths."""
    most = max(1, min(-(-cap // _MIN_CHUNK), _MAX_SPLITS))
    if device.type != "cuda":  # the interpreter: as many splits as allowed, to test the merge
        return most
    sms = _sm_count(device.index if device.index is not None else torch.cuda.current_device())
    return min(most, max(1, -(-_PROGRAMS_PER_SM * sms // max(heads, 1))))


@triton.jit
def _length(Lengths, b, g, stride_lb, stride_lh, CAP):
    """lengths[b, g] clamped to [0, CAP]: the kernels stay inside the cache whatever lengths holds (the
    public range check is skipped under torch.compile and graph capture); valid lengths are unchanged."""
    return tl.minimum(tl.maximum(tl.load(Lengths + b * stride_lb + g * stride_lh), 0), CAP)


@triton.jit
def _split_kernel(Q, K, V, Lengths, Table, PartO, PartLse,
                  stride_qb, stride_qh, stride_qd, stride_kb, stride_kh, stride_kn, stride_kd,
                  stride_vb, stride_vh, stride_vn, stride_vd, stride_lb, stride_lh, stride_tb, stride_th, stride_tp,
                  Hkv, Hq, GROUP, CHUNK, NUM_SPLITS, CAP, NUM_PAGES, qk_scale,
                  HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr,
                  PRECISION: tl.constexpr, ALIGN: tl.constexpr, PAGE: tl.constexpr):
    """Keys [split * CHUNK, min((split + 1) * CHUNK, length)) of one (batch, kv head) for its GROUP
    query heads: PartO[b, h, split] = softmax-weighted V of those keys, PartLse = their log2 LSE.
    PAGE == 0: dense caches [B, Hkv, CAP, D]. PAGE > 0: K, V are page pools [NUM_PAGES, PAGE, D]
    (stride_kb / stride_kn: page / slot strides; stride_kh unused) addressed through Table.
    Strides of q, k, v but the last come divided by ALIGN (see _common.stride_align): offsets are int64
    sums of int64 index * stride products, times ALIGN."""
    stride_qd, stride_kd, stride_vd = wide(stride_qd, 1), wide(stride_kd, 1), wide(stride_vd, 1)
    bg = tl.program_id(0)  # B * Hkv on axis 0: axis 1 is limited to 65535
    split = tl.program_id(1)
    b = (bg // Hkv).to(tl.int64)
    g = (bg % Hkv).to(tl.int64)
    length = _length(Lengths, b, g, stride_lb, stride_lh, CAP)
    start = split * CHUNK
    end = tl.minimum(start + CHUNK, length)  # start >= end: a split past the length, no work

    offs_g = tl.arange(0, BLOCK_G)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    g_ok = offs_g < GROUP
    d_ok = offs_d < HEAD_DIM
    heads = g * GROUP + offs_g
    # tl.dot needs at least 16 rows: rows past the group are zeros and never stored.
    q = tl.load(Q + (b * stride_qb + heads[:, None] * stride_qh) * ALIGN + offs_d[None, :] * stride_qd,
                mask=g_ok[:, None] & d_ok[None, :], other=0.0)
    if PAGE == 0:  # the loop then steps the pointers by int64 tile strides
        rows_n = start.to(tl.int64) + offs_n
        k_ptrs = K + (b * stride_kb + g * stride_kh + rows_n[:, None] * stride_kn) * ALIGN + offs_d[None, :] * stride_kd
        v_ptrs = V + (b * stride_vb + g * stride_vh + rows_n[:, None] * stride_vn) * ALIGN + offs_d[None, :] * stride_vd
    else:
        table = Table + b * stride_tb + g * stride_th

    m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
    for n0 in range(start, end, BLOCK_N):
        ok = (n0 + offs_n) < end
        if PAGE == 0:
            k = tl.load(k_ptrs, mask=ok[:, None] & d_ok[None, :], other=0.0)
            v = tl.load(v_ptrs, mask=ok[:, None] & d_ok[None, :], other=0.0)
            k_ptrs += wide(stride_kn, BLOCK_N * ALIGN)
            v_ptrs += wide(stride_vn, BLOCK_N * ALIGN)
        else:  # keys past `end` read no table entry (it may be -1) and no page
            j = n0 + offs_n
            page = tl.load(table + (j // PAGE) * stride_tp, mask=ok, other=0)
            page = tl.minimum(tl.maximum(page, 0), NUM_PAGES - 1).to(tl.int64)  # outside the pool: nearest page
            slot = (j % PAGE).to(tl.int64)
            k = tl.load(K + ((page * stride_kb + slot * stride_kn) * ALIGN)[:, None] + offs_d[None, :] * stride_kd,
                        mask=ok[:, None] & d_ok[None, :], other=0.0)
            v = tl.load(V + ((page * stride_vb + slot * stride_vn) * ALIGN)[:, None] + offs_d[None, :] * stride_vd,
                        mask=ok[:, None] & d_ok[None, :], other=0.0)
        qk = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
        qk = tl.where(ok[None, :], qk, float("-inf"))
        # Every tile has a valid key, so m_new is finite and exp2(-inf - m_new) = 0 on the first tile.
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        p = tl.math.exp2(qk - m_new[:, None])
        alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m_i = m_new

    store = g_ok & (start < end)
    rows = (b * Hq + heads) * NUM_SPLITS + split
    l_safe = tl.where(l_i == 0.0, 1.0, l_i)
    tl.store(PartO + rows[:, None] * HEAD_DIM + offs_d[None, :], acc / l_safe[:, None],
             mask=store[:, None] & d_ok[None, :])
    tl.store(PartLse + rows, m_i + tl.math.log2(l_safe), mask=store)


@triton.jit
def _merge_kernel(PartO, PartLse, Lengths, Out, stride_lb, stride_lh, stride_ob, stride_oh, stride_od,
                  Hq, GROUP, CHUNK, NUM_SPLITS, CAP, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                  BLOCK_S: tl.constexpr, ALIGN: tl.constexpr):
    """Out[b, h] = LSE-weighted mean of the partial outputs of the splits that saw keys; 0 when none did."""
    bh = tl.program_id(0).to(tl.int64)
    b = bh // Hq
    h = bh % Hq
    length = _length(Lengths, b, h // GROUP, stride_lb, stride_lh, CAP)
    offs_s = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, BLOCK_D)
    s_ok = offs_s < tl.cdiv(length, CHUNK)  # the splits the split kernel wrote
    d_ok = offs_d < HEAD_DIM
    lse = tl.load(PartLse + bh * NUM_SPLITS + offs_s, mask=s_ok, other=float("-inf"))
    m = tl.max(lse, 0)
    w = tl.where(s_ok, tl.math.exp2(lse - tl.where(m == float("-inf"), 0.0, m)), 0.0)
    o = tl.load(PartO + (bh * NUM_SPLITS + offs_s)[:, None] * HEAD_DIM + offs_d[None, :],
                mask=s_ok[:, None] & d_ok[None, :], other=0.0)
    den = tl.sum(w, 0)
    out = tl.sum(w[:, None] * o, 0) / tl.where(den == 0.0, 1.0, den)
    tl.store(Out + (b * stride_ob + h * stride_oh) * ALIGN + offs_d * stride_od, out.to(Out.dtype.element_ty),
             mask=d_ok)


def decode_attention(q, k_cache, v_cache, lengths, scale: float):
    """out [B, Hq, 1, D] contiguous in q's dtype; inputs read through their strides."""
    return launch(q, k_cache, v_cache, lengths, None, k_cache.shape[1], k_cache.shape[2], scale)


def launch(q, k, v, lengths, table, Hkv, cap, scale):
    """The split and merge kernels over `cap` key slots per (batch, kv head); table None: dense caches."""
    B, Hq, _, D = q.shape
    out = torch.empty((B, Hq, 1, D), dtype=q.dtype, device=q.device)
    if out.numel() == 0 or cap == 0 or k.numel() == 0:  # nothing to launch (and no pointer into an empty cache)
        return out.zero_()
    fp32 = q.dtype == torch.float32
    block_n = 32 if fp32 else 64  # fp32 dots run on FMA units: smaller tiles avoid spills
    splits = num_splits(cap, B * Hkv, q.device)
    chunk = -(-(-(-cap // splits)) // block_n) * block_n  # keys per split, whole tiles
    splits = -(-cap // chunk)
    part_o = torch.empty((B * Hq * splits, D), dtype=torch.float32, device=q.device)
    part_lse = torch.empty((B * Hq * splits,), dtype=torch.float32, device=q.device)
    q2 = q[:, :, 0]  # [B, Hq, D]: the singleton token dim carries no stride information
    align = stride_align(q2, k, v)
    if table is None:
        k_strides, v_strides, t_strides, page = strides(k, align), strides(v, align), (0, 0, 0), 0
        table = lengths  # an unused pointer argument
    else:  # pools [P, S, D] take the (batch, head, row) stride slots as (page, -, slot)
        (kp, ks, kd), (vp, vs, vd) = strides(k, align), strides(v, align)
        k_strides, v_strides, t_strides, page = (kp, 0, ks, kd), (vp, 0, vs, vd), table.stride(), k.shape[1]
    bd = block_d(D)
    with on_device(q):
        _split_kernel[(B * Hkv, splits)](
            q2, k, v, lengths, table, part_o, part_lse, *strides(q2, align), *k_strides, *v_strides,
            *lengths.stride(), *t_strides, Hkv, Hq, Hq // Hkv, chunk, splits, cap, k.shape[0], scale * LOG2E,
            HEAD_DIM=D, BLOCK_D=bd, BLOCK_G=max(16, triton.next_power_of_2(Hq // Hkv)), BLOCK_N=block_n,
            PRECISION=dot_precision(q.dtype), ALIGN=align, PAGE=page, num_warps=4, num_stages=2 if fp32 else 3)
        out2 = out[:, :, 0]
        out_align = stride_align(out2)
        _merge_kernel[(B * Hq,)](
            part_o, part_lse, lengths, out2, *lengths.stride(), *strides(out2, out_align), Hq, Hq // Hkv, chunk,
            splits, cap, HEAD_DIM=D, BLOCK_D=bd, BLOCK_S=triton.next_power_of_2(splits), ALIGN=out_align, num_warps=4)
    return out
