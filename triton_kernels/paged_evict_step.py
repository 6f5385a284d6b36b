"""paged_evict_step in Triton: a static DecodeH2O layer's decode step, a program per (batch, kv head),
on device counts (semantics in the reference, vtattn/reference/paged_evict_step.py).

1. the head's logits against the step's G query rows (fp32 products summed per key: one query row a
   head, no tile for `tl.dot` to fill), stored to a scratch row per query head;
2. each query head's max and sum over its row; each token's score grows by the mean over the G heads
   of exp(s - max) / sum;
3. on an eviction step (`since` + 1 reaches `every`, the same for every program) the head drops its
   max(n - floor, 0) lowest tokens: each token's key packs its score's order-preserving bits above
   its position (ties to the lower position, NaN last; positions below 2^32), the window's cutoff is
   found by `recent` passes of "the largest position below the last", the drops' threshold by
   `drop` passes of "the smallest key above the last" (drop <= every), then the freed slots below
   keep = n - drop take the kept tokens at or past keep, in order, through a list per head.
Passes that read what other threads wrote are separated by barriers. `since` moves after the
kernel (in-place ops in the launcher: every program reads it first). Scratch: fp32 logits
[B * H, G, width] and int64 slot lists [B * H, 2, every], allocated per call."""
import torch

from ._common import DTYPES, MAX_HEAD_DIM, on_device, tl, triton
from .select_tokens import device_reason

MAX_HEADS = 2**31 - 1  # a program per head on grid x
BLOCK_E = 16  # freed slots refilled at a time


def supports(k_pages, v_pages, pos, score, q, head_start, capacity, floor, lengths, next_slot, since, every, recent,
             width, scale) -> str | None:
    if k_pages.dtype not in DTYPES or v_pages.dtype != k_pages.dtype or q.dtype not in DTYPES:
        return f"k_pages, v_pages (one dtype) and q must be fp16/bf16/fp32, got {k_pages.dtype}, {q.dtype}"
    if q.shape[-1] > MAX_HEAD_DIM:
        return f"head dim {q.shape[-1]} > {MAX_HEAD_DIM}"
    if lengths.numel() > MAX_HEADS:
        return f"at most {MAX_HEADS} heads (B * H), got {lengths.numel()}"
    return device_reason(k_pages, v_pages, pos, score, q, head_start, capacity, floor, lengths, next_slot, since)


@triton.jit
def _order_key(sc, p):
    """int64 keys ordered as (score, position), NaN scores last: the score's float bits made
    order-preserving (-0 as +0), then the position (< 2^32) below them."""
    sc = sc + 0.0
    bits = sc.to(tl.int32, bitcast=True)
    bits = tl.where(sc != sc, 0x7FC00000, bits)
    bits = tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits)
    return (bits.to(tl.int64) << 32) | p


@triton.jit
def _keys(Pos, Score, s0, t, n, cut, ps, sp0, sp1, ss0, ss1, BY_POSITION: tl.constexpr):
    """Block t of a head's first n tokens (from slot s0): which exist, which are candidates (their
    position below cut), and their eviction keys: (score, position), or (score, index)."""
    tm = t < n
    slot = s0 + t
    p = tl.load(Pos + (slot // ps) * sp0 + (slot % ps) * sp1, mask=tm, other=-1)
    sc = tl.load(Score + (slot // ps) * ss0 + (slot % ps) * ss1, mask=tm, other=0.0)
    return tm, tm & (p < cut), _order_key(sc, p if BY_POSITION else t)


@triton.jit
def _threshold(Pos, Score, s0, n, cut, drop, ps, sp0, sp1, ss0, ss1, BY_POSITION: tl.constexpr,
               BLOCK_N: tl.constexpr):
    """The drop-th smallest key among the candidates of a head's first n tokens: `drop` passes of "the
    smallest key above the last"; every candidate up to it goes."""
    thr = tl.full([], -9223372036854775807 - 1, tl.int64)
    for _ in range(0, drop):
        best = tl.full([], 9223372036854775807, tl.int64)
        for t0 in range(0, n, BLOCK_N):
            tm, cand, key = _keys(Pos, Score, s0, t0 + tl.arange(0, BLOCK_N), n, cut, ps, sp0, sp1, ss0, ss1,
                                  BY_POSITION)
            best = tl.minimum(best, tl.min(tl.where(cand & (key > thr), key, best), 0))
        thr = best
    return thr


@triton.jit
def _paged_evict_step(KP, VP, Pos, Score, Q, Start, Floor, Lengths, Next, Since, Logits, Lists,
                      skp0, skp1, skp2, svp0, svp1, svp2, sp0, sp1, ss0, ss1, sq0, sq1, sq3,
                      sst0, sst1, sfl0, sfl1, sl0, sl1, sn0, sn1, H, G, D, ps, W, every, recent, scale,
                      BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_E: tl.constexpr):
    r = tl.program_id(0).to(tl.int64)
    b, h = r // H, r % H
    n = tl.load(Lengths + b * sl0 + h * sl1).to(tl.int64)
    s0 = tl.load(Start + b * sst0 + h * sst1)
    fl = tl.load(Floor + b * sfl0 + h * sfl1)
    due = tl.load(Since) + 1 >= every
    g = tl.arange(0, BLOCK_G)
    d = tl.arange(0, BLOCK_D)
    gm, dm = g < G, d < D
    row_logits = Logits + r * G * W + g[:, None] * W
    # 1. logits to scratch (fp32 products, reduced per key)
    for t0 in range(0, n, BLOCK_N):
        t = t0 + tl.arange(0, BLOCK_N)
        tm = t < n
        slot = s0 + t
        k = tl.load(KP + (slot // ps)[:, None] * skp0 + (slot % ps)[:, None] * skp1 + d[None, :] * skp2,
                    mask=tm[:, None] & dm[None, :], other=0.0).to(tl.float32)
        for gi in range(0, G):
            qg = tl.load(Q + b * sq0 + (h * G + gi) * sq1 + d * sq3, mask=dm, other=0.0).to(tl.float32)
            tl.store(Logits + (r * G + gi) * W + t, tl.sum(k * qg[None, :], 1) * scale, mask=tm)
    tl.debug_barrier()
    # 2. each query head's max and sum over its row
    m_i = tl.zeros([BLOCK_G], tl.float32)  # (padding rows: exp(-inf - 0) / 1, no NaN to mask out)
    l_i = tl.full([BLOCK_G], 1.0, tl.float32)
    for gi in range(0, G):
        mg = tl.full([], float("-inf"), tl.float32)
        lg = tl.zeros([], tl.float32)
        for t0 in range(0, n, BLOCK_N):
            t = t0 + tl.arange(0, BLOCK_N)
            s = tl.load(Logits + (r * G + gi) * W + t, mask=t < n, other=float("-inf"))
            mn = tl.maximum(mg, tl.max(s, 0))
            lg = lg * tl.exp(mg - mn) + tl.sum(tl.exp(s - mn), 0)
            mg = mn
        m_i = tl.where(g == gi, mg, m_i)
        l_i = tl.where(g == gi, lg, l_i)
    # 3. the scores grow by the step's mass (GQA mean)
    for t0 in range(0, n, BLOCK_N):
        t = t0 + tl.arange(0, BLOCK_N)
        tm = t < n
        slot = s0 + t
        s = tl.load(row_logits + t[None, :], mask=gm[:, None] & tm[None, :], other=float("-inf"))
        p = tl.where(gm[:, None], tl.exp(s - m_i[:, None]) / l_i[:, None], 0.0)
        at = Score + (slot // ps) * ss0 + (slot % ps) * ss1
        tl.store(at, tl.load(at, mask=tm) + tl.sum(p, 0) / G, mask=tm)
    drop = tl.maximum(n - fl, 0)
    if due & (drop > 0):
        tl.debug_barrier()
        keep = n - drop
        # the window: the recent-th largest position and those above it stay
        cut = tl.full([], 9223372036854775807, tl.int64)
        for _ in range(0, recent):
            best = tl.full([], -1, tl.int64)
            for t0 in range(0, n, BLOCK_N):
                t = t0 + tl.arange(0, BLOCK_N)
                slot = s0 + t
                p = tl.load(Pos + (slot // ps) * sp0 + (slot % ps) * sp1, mask=t < n, other=-1)
                best = tl.maximum(best, tl.max(tl.where(p < cut, p, -1), 0))
            cut = best
        thr = _threshold(Pos, Score, s0, n, cut, drop, ps, sp0, sp1, ss0, ss1, True, BLOCK_N)
        # the freed slots below keep, and the kept tokens at or past it, in order
        holes = Lists + r * 2 * every
        movers = holes + every
        nh = tl.zeros([], tl.int32)
        nm = tl.zeros([], tl.int32)
        for t0 in range(0, n, BLOCK_N):
            t = t0 + tl.arange(0, BLOCK_N)
            tm, cand, key = _keys(Pos, Score, s0, t, n, cut, ps, sp0, sp1, ss0, ss1, True)
            gone = cand & (key <= thr)
            hole = gone & (t < keep)
            mover = ~gone & tm & (t >= keep)
            tl.store(holes + nh + tl.cumsum(hole.to(tl.int32), 0) - 1, t, mask=hole)
            tl.store(movers + nm + tl.cumsum(mover.to(tl.int32), 0) - 1, t, mask=mover)
            nh += tl.sum(hole.to(tl.int32), 0)
            nm += tl.sum(mover.to(tl.int32), 0)
        tl.debug_barrier()
        for j0 in range(0, nh, BLOCK_E):
            j = j0 + tl.arange(0, BLOCK_E)
            jm = j < nh
            dst = s0 + tl.load(holes + j, mask=jm, other=0)
            src = s0 + tl.load(movers + j, mask=jm, other=0)
            dp, dr, sp_, sr = dst // ps, dst % ps, src // ps, src % ps
            both = jm[:, None] & dm[None, :]
            x = tl.load(KP + sp_[:, None] * skp0 + sr[:, None] * skp1 + d[None, :] * skp2, mask=both)
            tl.store(KP + dp[:, None] * skp0 + dr[:, None] * skp1 + d[None, :] * skp2, x, mask=both)
            y = tl.load(VP + sp_[:, None] * svp0 + sr[:, None] * svp1 + d[None, :] * svp2, mask=both)
            tl.store(VP + dp[:, None] * svp0 + dr[:, None] * svp1 + d[None, :] * svp2, y, mask=both)
            tl.store(Pos + dp * sp0 + dr * sp1, tl.load(Pos + sp_ * sp0 + sr * sp1, mask=jm), mask=jm)
            tl.store(Score + dp * ss0 + dr * ss1, tl.load(Score + sp_ * ss0 + sr * ss1, mask=jm), mask=jm)
        tl.debug_barrier()
        for t0 in range(keep, n, BLOCK_N):
            t = t0 + tl.arange(0, BLOCK_N)
            slot = s0 + t
            tl.store(Pos + (slot // ps) * sp0 + (slot % ps) * sp1, -1, mask=t < n)
        tl.store(Lengths + b * sl0 + h * sl1, keep.to(tl.int32))
        tl.store(Next + b * sn0 + h * sn1, s0 + keep)


def paged_evict_step(k_pages, v_pages, pos, score, q, head_start, capacity, floor, lengths, next_slot, since, every,
                     recent, width, scale) -> None:
    B, H = lengths.shape
    G, D = q.shape[1] // max(H, 1), q.shape[-1]
    if B * H > 0:
        block_d = triton.next_power_of_2(D)
        logits = torch.empty(B * H * G * max(width, 1), dtype=torch.float32, device=q.device)
        lists = torch.empty(B * H * 2 * every, dtype=torch.int64, device=q.device)
        with on_device(q):
            _paged_evict_step[(B * H,)](
                k_pages, v_pages, pos, score, q, head_start, floor, lengths, next_slot, since, logits, lists,
                *k_pages.stride(), *v_pages.stride(), *pos.stride(), *score.stride(), q.stride(0), q.stride(1),
                q.stride(3), *head_start.stride(), *floor.stride(), *lengths.stride(), *next_slot.stride(), H, G, D,
                k_pages.shape[1], max(width, 1), every, recent, scale, BLOCK_G=triton.next_power_of_2(G),
                BLOCK_N=max(16, 4096 // block_d), BLOCK_D=block_d, BLOCK_E=BLOCK_E, num_warps=4)
    since.add_(1)  # after every program read it
    since.masked_fill_(since >= every, 0)
