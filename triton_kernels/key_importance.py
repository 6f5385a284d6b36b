"""Key importance (column sums of softmax probabilities over selected query rows) in Triton,
without an [Nq, Nk] tensor; semantics in docs/internals.md.

Paths: lse given -> one column kernel. lse missing and few rows (R <= 16) -> logits of the rows
plus per-chunk (max, sum-exp) partials in one read of K, then a normalising pass. lse missing and
many rows -> a row-LSE kernel (the QK^T half of flash attention), then the column kernel."""
import torch

from ._common import (LOG2E_K, Tuned, add_sink, block_d, cap_logits, check_tensors, dot_precision, finish_lse,
                      fp32_tiles, interpreting, key_range, logit_scales, on_device, online_softmax, stride_align,
                      strides, tiles, tl, triton, tune_key, visible_keys, wide, wide4, window_arg)

FEW_ROWS = 16  # up to this many rows without lse take the one-read-of-K path
# Keys per program of the few-rows path (a multiple of every BLOCK_N below). Small under the
# interpreter so tiny test inputs still span several chunks.
_CHUNK = 32 if interpreting() else 256


def supports(q, k, lse, rows, causal, scale, softcap=0.0, window=-1, sinks=None) -> str | None:
    """None when this backend can run the inputs, else why not (one line)."""
    return check_tensors(q, k)


@triton.jit
def _load_rows(Rows, b, slots, R, Nq, stride_rb, stride_rr, HAS_ROWS: tl.constexpr):
    """Query row of each slot and whether it is used: rows None -> slot = row; -1 (padding) skipped."""
    if HAS_ROWS:
        rows = tl.load(Rows + b * stride_rb + slots * stride_rr, mask=slots < R, other=-1)
    else:
        rows = slots
    return rows, (slots < R) & (rows >= 0) & (rows < Nq)


@triton.jit
def _load_q(Q, b, h, rows, ok, stride_qb, stride_qh, stride_qm, stride_qd, HEAD_DIM: tl.constexpr,
            BLOCK_D: tl.constexpr):
    """Rows of q (zeros where not ok); int64 strides in elements."""
    offs_d = tl.arange(0, BLOCK_D)
    return tl.load(Q + b * stride_qb + h * stride_qh + rows[:, None] * stride_qm + offs_d[None, :] * stride_qd,
                   mask=ok[:, None] & (offs_d < HEAD_DIM)[None, :], other=0.0)


@triton.jit
def _head(pid, num_tiles, Hq, GROUP):
    """(batch, q head, kv head, tile) of a program of a 1-D grid of num_tiles tiles per head."""
    bh = pid // num_tiles
    h = bh % Hq
    return (bh // Hq).to(tl.int64), h.to(tl.int64), (h // GROUP).to(tl.int64), pid % num_tiles


@triton.jit(do_not_specialize=["TUNE_KEY"])
def _row_lse_kernel(Q, K, Rows, Sinks, Lse,
                    stride_qb, stride_qh, stride_qm, stride_qd, stride_kb, stride_kh, stride_kn, stride_kd,
                    stride_rb, stride_rr, Hq, Nq, Nk, R, GROUP, qk_scale, cap, window, TUNE_KEY,
                    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, CAUSAL: tl.constexpr, SOFTCAP: tl.constexpr,
                    WINDOW: tl.constexpr, HAS_SINK: tl.constexpr, HAS_ROWS: tl.constexpr, PRECISION: tl.constexpr,
                    ALIGN: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Lse [B, Hq, R] (natural log) of the selected rows: flash attention's max/sum-exp without V (and the
    head's sink, when HAS_SINK). Strides of q and k but the last come divided by ALIGN (see
    _common.stride_align); all become int64."""
    stride_qb, stride_qh, stride_qm, stride_qd = wide4(stride_qb, stride_qh, stride_qm, stride_qd, ALIGN)
    stride_kb, stride_kh, stride_kn, stride_kd = wide4(stride_kb, stride_kh, stride_kn, stride_kd, ALIGN)
    num_m = tl.cdiv(R, BLOCK_M)
    b, h, kvh, tile_m = _head(tl.program_id(0), num_m, Hq, GROUP)
    slots = tile_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rows, ok = _load_rows(Rows, b, slots, R, Nq, stride_rb, stride_rr, HAS_ROWS)
    q = _load_q(Q, b, h, rows, ok, stride_qb, stride_qh, stride_qm, stride_qd, HEAD_DIM, BLOCK_D)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    k_ptrs = K + b * stride_kb + kvh * stride_kh + offs_n[:, None] * stride_kn + offs_d[None, :] * stride_kd

    causal_off = Nk - Nq
    lo, mid, full, end = key_range(tl.min(tl.where(ok, rows, Nq), 0), tl.max(tl.where(ok, rows, -1), 0), Nk,
                                   causal_off, window, CAUSAL, WINDOW, BLOCK_N)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    for start_n in range(lo, mid, BLOCK_N):  # the window's left edge
        m_i, l_i = _masked_lse_tile(m_i, l_i, q, k_ptrs, stride_kn, start_n, rows, Nk, causal_off, qk_scale, cap,
                                    window, CAUSAL, SOFTCAP, WINDOW, HEAD_DIM, BLOCK_D, BLOCK_N, PRECISION)
    for start_n in range(mid, full, BLOCK_N):  # visible to every row
        k = tl.load(k_ptrs + start_n * stride_kn, mask=d_ok[None, :], other=0.0)
        qk = cap_logits(tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale, cap, SOFTCAP)
        m_i, l_i, _, _ = online_softmax(m_i, l_i, qk, False)
    for start_n in range(tl.maximum(mid, full), end, BLOCK_N):  # the causal diagonal, the ragged last tile
        m_i, l_i = _masked_lse_tile(m_i, l_i, q, k_ptrs, stride_kn, start_n, rows, Nk, causal_off, qk_scale, cap,
                                    window, CAUSAL, SOFTCAP, WINDOW, HEAD_DIM, BLOCK_D, BLOCK_N, PRECISION)
    if HAS_SINK:
        m_i, l_i, _ = add_sink(m_i, l_i, tl.load(Sinks + h) * LOG2E_K)
    tl.store(Lse + (b * Hq + h) * R + slots, finish_lse(m_i, l_i), mask=slots < R)


@triton.jit
def _masked_lse_tile(m_i, l_i, q, k_ptrs, stride_kn, start_n, rows, Nk, causal_off, qk_scale, cap, window,
                     CAUSAL: tl.constexpr, SOFTCAP: tl.constexpr, WINDOW: tl.constexpr, HEAD_DIM: tl.constexpr,
                     BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, PRECISION: tl.constexpr):
    """Keys [start_n, start_n + BLOCK_N) into the rows' running max and sum, invisible keys masked."""
    cols = start_n + tl.arange(0, BLOCK_N)
    k = tl.load(k_ptrs + start_n * stride_kn, mask=(cols < Nk)[:, None] & (tl.arange(0, BLOCK_D) < HEAD_DIM)[None, :],
                other=0.0)
    qk = cap_logits(tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale, cap, SOFTCAP)
    visible = visible_keys(rows, cols, Nk, causal_off, window, CAUSAL, WINDOW)
    m_i, l_i, _, _ = online_softmax(m_i, l_i, tl.where(visible, qk, float("-inf")), True)
    return m_i, l_i


def _flash_space(esize, bd):
    if esize == 4:
        return tiles(*fp32_tiles(bd))
    if bd <= 128:
        return tiles((128, 64, 8, 3), (64, 64, 4, 3), (64, 128, 4, 3), (128, 128, 8, 3), (128, 64, 4, 3),
                     (64, 64, 4, 4), (64, 32, 4, 3))
    return tiles((128, 64, 8, 2), (64, 64, 4, 3), (64, 32, 4, 3))


_row_lse = Tuned(_row_lse_kernel, key=["TUNE_KEY", "BLOCK_D", "CAUSAL", "WINDOW", "HAS_ROWS"], space=_flash_space,
                 smem=lambda c, stages: c["BLOCK_M"] + c["BLOCK_N"] * stages,  # q + pipelined k
                 interp=({"BLOCK_M": 32, "BLOCK_N": 16}, 4, 1))


@triton.jit(do_not_specialize=["TUNE_KEY"])
def _column_sums_kernel(Q, K, Lse, Rows, Out,
                        stride_qb, stride_qh, stride_qm, stride_qd, stride_kb, stride_kh, stride_kn, stride_kd,
                        stride_lb, stride_lh, stride_ln, stride_rb, stride_rr, Hq, Nq, Nk, R, GROUP, qk_scale, cap,
                        window, TUNE_KEY, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, CAUSAL: tl.constexpr,
                        SOFTCAP: tl.constexpr, WINDOW: tl.constexpr, HAS_ROWS: tl.constexpr,
                        LSE_BY_SLOT: tl.constexpr, PRECISION: tl.constexpr, ALIGN: tl.constexpr,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Out[b, h, j] = sum over slots of exp(s[row, j] - lse[row]); one key tile per program, which loops
    over all row tiles itself (deterministic, no atomics). Lse is indexed by slot or by row. Strides of q
    and k but the last come divided by ALIGN (see _common.stride_align); all become int64."""
    stride_qb, stride_qh, stride_qm, stride_qd = wide4(stride_qb, stride_qh, stride_qm, stride_qd, ALIGN)
    stride_kb, stride_kh, stride_kn, stride_kd = wide4(stride_kb, stride_kh, stride_kn, stride_kd, ALIGN)
    stride_ln = wide(stride_ln, 1)
    num_n = tl.cdiv(Nk, BLOCK_N)
    b, h, kvh, tile_n = _head(tl.program_id(0), num_n, Hq, GROUP)
    cols = tile_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    k = tl.load(K + b * stride_kb + kvh * stride_kh + cols[:, None] * stride_kn + offs_d[None, :] * stride_kd,
                mask=(cols < Nk)[:, None] & (offs_d < HEAD_DIM)[None, :], other=0.0)
    causal_off = Nk - Nq
    start = 0
    stop = R
    if not HAS_ROWS:
        if CAUSAL:  # rows above the first that sees this tile's first key add nothing
            start = tl.maximum(tile_n * BLOCK_N - causal_off, 0) // BLOCK_M * BLOCK_M
        if WINDOW:  # nor do rows below the last whose window reaches this tile's last key
            stop = tl.minimum(tile_n * BLOCK_N + BLOCK_N - causal_off + window, R)
    col_sum = tl.zeros([BLOCK_N], tl.float32)
    for r0 in range(start, stop, BLOCK_M):
        slots = r0 + tl.arange(0, BLOCK_M)
        rows, ok = _load_rows(Rows, b, slots, R, Nq, stride_rb, stride_rr, HAS_ROWS)
        q = _load_q(Q, b, h, rows, ok, stride_qb, stride_qh, stride_qm, stride_qd, HEAD_DIM, BLOCK_D)
        if LSE_BY_SLOT:
            lse_pos = slots
        else:
            lse_pos = rows
        lse = tl.load(Lse + b * stride_lb + h * stride_lh + lse_pos * stride_ln, mask=ok, other=float("-inf"))
        ok = ok & (lse != float("-inf"))  # a row without visible keys adds nothing
        lse = tl.where(ok, lse * LOG2E_K, 0.0)
        qk = cap_logits(tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale, cap, SOFTCAP)
        visible = ok[:, None] & visible_keys(rows, cols, Nk, causal_off, window, CAUSAL, WINDOW)
        col_sum += tl.sum(tl.where(visible, tl.math.exp2(qk - lse[:, None]), 0.0), 0)
    tl.store(Out + (b * Hq + h) * Nk + cols, col_sum, mask=cols < Nk)


def _column_space(esize, bd):  # BLOCK_M: query rows per step, BLOCK_N: keys per program
    if esize == 4:
        return tiles(*fp32_tiles(bd))
    if bd <= 128:
        return tiles((64, 128, 8, 3), (16, 64, 4, 3), (16, 128, 4, 3), (64, 64, 4, 3), (64, 128, 4, 3),
                     (128, 64, 8, 3), (128, 128, 8, 2), (64, 64, 4, 4), (32, 64, 4, 3))
    return tiles((64, 64, 4, 3), (16, 64, 4, 3), (64, 128, 8, 2), (32, 64, 4, 2))


_column_sums = Tuned(_column_sums_kernel, key=["TUNE_KEY", "BLOCK_D", "CAUSAL", "WINDOW", "HAS_ROWS"],
                     space=_column_space,
                     smem=lambda c, stages: c["BLOCK_N"] + c["BLOCK_M"] * stages,  # k + pipelined q
                     interp=({"BLOCK_M": 16, "BLOCK_N": 32}, 4, 1))


@triton.jit(do_not_specialize=["TUNE_KEY"])
def _few_rows_logits_kernel(Q, K, Rows, S, Mpart, Lpart, stride_s,
                            stride_qb, stride_qh, stride_qm, stride_qd, stride_kb, stride_kh, stride_kn, stride_kd,
                            stride_rb, stride_rr, Hq, Nq, Nk, R, n_chunks, GROUP, qk_scale, cap, window, TUNE_KEY,
                            HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, CAUSAL: tl.constexpr,
                            SOFTCAP: tl.constexpr, WINDOW: tl.constexpr, PRECISION: tl.constexpr, ALIGN: tl.constexpr,
                            BLOCK_R: tl.constexpr, CHUNK: tl.constexpr, BLOCK_N: tl.constexpr):
    """For one chunk of keys: log2-domain logits of the R rows into S [B, Hq, R, >= Nk] (-inf = invisible)
    and each row's (max, sum-exp) over the chunk into Mpart/Lpart [B, Hq, R, n_chunks]. Strides of q and k
    but the last come divided by ALIGN (see _common.stride_align); all become int64."""
    stride_qb, stride_qh, stride_qm, stride_qd = wide4(stride_qb, stride_qh, stride_qm, stride_qd, ALIGN)
    stride_kb, stride_kh, stride_kn, stride_kd = wide4(stride_kb, stride_kh, stride_kn, stride_kd, ALIGN)
    b, h, kvh, chunk = _head(tl.program_id(0), n_chunks, Hq, GROUP)
    slots = tl.arange(0, BLOCK_R)
    rows, ok = _load_rows(Rows, b, slots, R, Nq, stride_rb, stride_rr, True)
    q = _load_q(Q, b, h, rows, ok, stride_qb, stride_qh, stride_qm, stride_qd, HEAD_DIM, BLOCK_D)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    k_ptrs = K + b * stride_kb + kvh * stride_kh + offs_n[:, None] * stride_kn + offs_d[None, :] * stride_kd
    slot_base = (b * Hq + h) * R + slots
    m_i = tl.full([BLOCK_R], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_R], tl.float32)
    for start_n in range(chunk * CHUNK, tl.minimum(chunk * CHUNK + CHUNK, Nk), BLOCK_N):
        cols = start_n + offs_n
        k = tl.load(k_ptrs + start_n * stride_kn, mask=(cols < Nk)[:, None] & (offs_d < HEAD_DIM)[None, :],
                    other=0.0)
        visible = ok[:, None] & visible_keys(rows, cols, Nk, Nk - Nq, window, CAUSAL, WINDOW)
        qk = cap_logits(tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale, cap, SOFTCAP)
        qk = tl.where(visible, qk, float("-inf"))
        m_i, l_i, _, _ = online_softmax(m_i, l_i, qk, True)
        tl.store(S + slot_base[:, None] * stride_s + cols[None, :], qk,
                 mask=(slots < R)[:, None] & (cols < Nk)[None, :])
    tl.store(Mpart + slot_base * n_chunks + chunk, m_i, mask=slots < R)
    tl.store(Lpart + slot_base * n_chunks + chunk, l_i, mask=slots < R)


def _few_rows_space(esize, bd):
    if esize == 4:
        return [({"BLOCK_N": n}, w, s) for _, n, w, s in fp32_tiles(bd)]
    return [({"BLOCK_N": n}, w, s) for n, w, s in [(64, 4, 3), (32, 4, 3), (64, 4, 4), (128, 4, 3), (128, 8, 3),
                                                   (64, 2, 3), (32, 4, 2)]]


_few_rows_logits = Tuned(_few_rows_logits_kernel, key=["TUNE_KEY", "BLOCK_D", "CAUSAL", "WINDOW"],
                         space=_few_rows_space,
                         smem=lambda c, stages: FEW_ROWS + c["BLOCK_N"] * stages,  # q + pipelined k
                         interp=({"BLOCK_N": 16}, 4, 1))


@triton.jit
def _few_rows_normalize_kernel(S, Mpart, Lpart, Sinks, Out, stride_s, Hq, Nk, R, n_chunks, HAS_SINK: tl.constexpr,
                               BLOCK_R: tl.constexpr, CHUNK: tl.constexpr, BLOCK_N: tl.constexpr,
                               BLOCK_C: tl.constexpr):
    """Combine the partials (and the head's sink, when HAS_SINK) into each row's log2 lse, then write
    sum_r exp2(S - lse_r) for one chunk."""
    pid = tl.program_id(0)
    bh = (pid // n_chunks).to(tl.int64)
    chunk = pid % n_chunks
    slots = tl.arange(0, BLOCK_R)
    slot_base = bh * R + slots
    m = tl.full([BLOCK_R], float("-inf"), tl.float32)
    l = tl.zeros([BLOCK_R], tl.float32)
    for c0 in range(0, n_chunks, BLOCK_C):
        cs = c0 + tl.arange(0, BLOCK_C)
        mask = (slots < R)[:, None] & (cs < n_chunks)[None, :]
        mp = tl.load(Mpart + slot_base[:, None] * n_chunks + cs[None, :], mask=mask, other=float("-inf"))
        lp = tl.load(Lpart + slot_base[:, None] * n_chunks + cs[None, :], mask=mask, other=0.0)
        m_new = tl.maximum(m, tl.max(mp, 1))
        m_sub = tl.where(m_new == float("-inf"), 0.0, m_new)  # -inf - -inf is NaN
        l = l * tl.math.exp2(m - m_sub) + tl.sum(lp * tl.math.exp2(mp - m_sub[:, None]), 1)
        m = m_new
    if HAS_SINK:
        m, l, _ = add_sink(m, l, tl.load(Sinks + bh % Hq) * LOG2E_K)
    # rows without visible keys (and padding slots) add nothing; a NaN row (l NaN) stays NaN
    has_keys = (l != 0.0) & (slots < R)
    lse = tl.where(has_keys, m + tl.math.log2(tl.where(has_keys, l, 1.0)), 0.0)
    offs_n = tl.arange(0, BLOCK_N)
    for start_n in range(chunk * CHUNK, tl.minimum(chunk * CHUNK + CHUNK, Nk), BLOCK_N):
        cols = start_n + offs_n
        s = tl.load(S + slot_base[:, None] * stride_s + cols[None, :], mask=has_keys[:, None] & (cols < Nk)[None, :],
                    other=float("-inf"))
        p = tl.where(s == float("-inf"), 0.0, tl.math.exp2(s - lse[:, None]))  # unseen keys: 0, even in a NaN row
        tl.store(Out + bh * Nk + cols, tl.sum(p, 0), mask=cols < Nk)


_few_rows_normalize = Tuned(_few_rows_normalize_kernel, key=["BLOCK_R", "HAS_SINK"], smem=None,
                            space=lambda esize, bd: [({"BLOCK_N": 128, "BLOCK_C": 64}, 4, 1)],
                            interp=({"BLOCK_N": 16, "BLOCK_C": 2}, 4, 1))


def key_importance(q, k, lse, rows, causal: bool, scale: float, softcap: float = 0.0, window: int = -1, sinks=None):
    """fp32 [B, Hq, Nk]: per key, the sum over rows (int64 [B, R], -1 skipped; None = all rows) of the
    softmax probability; lse (fp32 [B, Hq, Nq], any strides) is used when given, else computed (with the
    sinks, fp32 contiguous [Hq] or None)."""
    B, Hq, Nq, D = q.shape
    Hkv, Nk = k.shape[1], k.shape[2]
    R = Nq if rows is None else rows.shape[1]
    out = torch.empty((B, Hq, Nk), dtype=torch.float32, device=q.device)
    if out.numel() == 0 or R == 0 or Nq == 0:
        return out.zero_()
    has_rows = rows is not None
    row_strides = rows.stride() if has_rows else (0, 0)
    align = stride_align(q, k)
    qk_args = (*strides(q, align), *strides(k, align))
    sizes = (Hq, Nq, Nk, R)
    window = window_arg(window, Nk)
    consts = dict(HEAD_DIM=D, BLOCK_D=block_d(D), CAUSAL=bool(causal), SOFTCAP=softcap > 0, WINDOW=window >= 0,
                  PRECISION=dot_precision(q.dtype), ALIGN=align)
    logit_args = (*logit_scales(scale, softcap), window)
    with on_device(q):
        if lse is None and has_rows and R <= FEW_ROWS:
            n_chunks = triton.cdiv(Nk, _CHUNK)
            block_r = max(16, triton.next_power_of_2(R))  # tl.dot needs M >= 16
            # rows padded to 16 floats: aligned, vectorised stores and loads
            s = torch.empty((B, Hq, R, triton.cdiv(Nk, 16) * 16), dtype=torch.float32, device=q.device)
            m_part = torch.empty((B, Hq, R, n_chunks), dtype=torch.float32, device=q.device)
            l_part = torch.empty_like(m_part)
            grid = (B * Hq * n_chunks,)
            _few_rows_logits[grid](q, k, rows, s, m_part, l_part, s.stride(2), *qk_args, *row_strides, *sizes, n_chunks,
                                   Hq // Hkv, *logit_args, tune_key(Nk, B * Hq), BLOCK_R=block_r, CHUNK=_CHUNK,
                                   **consts)
            _few_rows_normalize[grid](s, m_part, l_part, sinks, out, s.stride(2), Hq, Nk, R, n_chunks,
                                      HAS_SINK=sinks is not None, BLOCK_R=block_r, CHUNK=_CHUNK)
            return out
        lse_by_slot = False
        if lse is None:  # rows' own lse, indexed by slot
            lse = torch.empty((B, Hq, R), dtype=torch.float32, device=q.device)
            lse_by_slot = True
            grid = lambda meta: (B * Hq * triton.cdiv(R, meta["BLOCK_M"]),)  # noqa: E731
            _row_lse[grid](q, k, rows, sinks, lse, *qk_args, *row_strides, *sizes, Hq // Hkv, *logit_args,
                           tune_key(R, Nk, B * Hq), HAS_SINK=sinks is not None, HAS_ROWS=has_rows, **consts)
        grid = lambda meta: (B * Hq * triton.cdiv(Nk, meta["BLOCK_N"]),)  # noqa: E731
        _column_sums[grid](q, k, lse, rows, out, *qk_args, *lse.stride(), *row_strides, *sizes, Hq // Hkv,
                           *logit_args, tune_key(R, Nk, B * Hq), HAS_ROWS=has_rows, LSE_BY_SLOT=lse_by_slot,
                           **consts)
    return out
