"""paged_evict in Triton: decode-time H2O eviction of a paged cache, a program per (batch, kv head)
(semantics in the reference, vtattn/reference/paged_evict.py). The counts are the host's: copied to
the device in one transfer from pinned memory, no wait.

1. the head's logits against its G * n query rows (fp32 products summed per key; query i sees the
   tokens at positions <= start + i), stored to a scratch row per query row; rows in chunks so that
   the scratch stays within MAX_LOGITS (the keys are read once a chunk);
2. each row's max and sum to scratch (a row that sees no token adds nothing); each token's score
   grows by the rows' probabilities summed, over G, in one update;
3. the lengths - keep lowest-scored of the first lengths - recent tokens go: the threshold by `drop`
   passes of "the smallest (score, index) key above the last" (paged_evict_step's keys, the index
   in place of the position: ties to the older); the kept tokens move to the front of the run in
   order, a block at a time (a destination is never past its source: loads, a barrier, stores);
   pos = -1 on the slots after them; the pools' counts follow where given."""
import numpy as np
import torch

from ._common import DTYPES, MAX_HEAD_DIM, on_device, tl, triton
from .paged_evict_step import MAX_HEADS, _order_key, _threshold
from .select_tokens import device_reason

MAX_LOGITS = 1 << 25  # fp32 logits of scratch in all (128 MiB, as the reference's chunks): rows in chunks


def supports(k_pages, v_pages, pos, score, queries, head_start, lengths, keep, start, recent, scale, counts=None,
             next_slot=None) -> str | None:
    if k_pages.dtype not in DTYPES or v_pages.dtype != k_pages.dtype or queries.dtype not in DTYPES:
        return f"k_pages, v_pages (one dtype) and queries must be fp16/bf16/fp32, got {k_pages.dtype}, {queries.dtype}"
    if queries.shape[-1] > MAX_HEAD_DIM:
        return f"head dim {queries.shape[-1]} > {MAX_HEAD_DIM}"
    if lengths.numel() > MAX_HEADS:
        return f"at most {MAX_HEADS} heads (B * H), got {lengths.numel()}"
    if any(t.device.type != "cpu" for t in (head_start, lengths, keep)):
        return "head_start, lengths and keep must be CPU tensors (the host's counts)"
    return device_reason(k_pages, v_pages, pos, score, queries, *(t for t in (counts, next_slot) if t is not None))


@triton.jit(do_not_specialize=["W", "start"])  # both move from one eviction to the next: one compile
def _paged_evict(KP, VP, Pos, Score, Q, Heads, Counts, Next, Logits, Stats,
                 skp0, skp1, skp2, svp0, svp1, svp2, sp0, sp1, ss0, ss1, sq0, sq1, sq2, sq3,
                 sc0, sc1, sn0, sn1, BH, H, G, n, D, ps, W, R, start, recent, scale,
                 HAS_COUNTS: tl.constexpr, HAS_NEXT: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                 BLOCK_R: tl.constexpr):
    r = tl.program_id(0).to(tl.int64)
    b, h = r // H, r % H
    s0 = tl.load(Heads + r)  # [3, B * H]: head_start, lengths, keep
    L = tl.load(Heads + BH + r)
    kept = tl.load(Heads + 2 * BH + r)
    d = tl.arange(0, BLOCK_D)
    dm = d < D
    rows = G * n
    for c0 in range(0, rows, R):  # chunks of R query rows: the scratch holds R rows a head
        c1 = tl.minimum(c0 + R, rows)
        # 1. logits to scratch, -inf where a query does not see the token
        for t0 in range(0, L, BLOCK_N):
            t = t0 + tl.arange(0, BLOCK_N)
            tm = t < L
            slot = s0 + t
            k = tl.load(KP + (slot // ps)[:, None] * skp0 + (slot % ps)[:, None] * skp1 + d[None, :] * skp2,
                        mask=tm[:, None] & dm[None, :], other=0.0).to(tl.float32)
            p = tl.load(Pos + (slot // ps) * sp0 + (slot % ps) * sp1, mask=tm, other=0)
            for j in range(c0, c1):
                gi, i = j // n, j % n
                qj = tl.load(Q + b * sq0 + (h * G + gi) * sq1 + i * sq2 + d * sq3, mask=dm, other=0.0).to(tl.float32)
                s = tl.where(p <= start + i, tl.sum(k * qj[None, :], 1) * scale, float("-inf"))
                tl.store(Logits + (r * R + j - c0) * W + t, s, mask=tm)
        tl.debug_barrier()
        # 2. each row's max and sum (-inf: the row sees no token)
        for j in range(c0, c1):
            row = Logits + (r * R + j - c0) * W
            m = tl.full([], float("-inf"), tl.float32)
            total = tl.zeros([], tl.float32)
            for t0 in range(0, L, BLOCK_N):
                t = t0 + tl.arange(0, BLOCK_N)
                s = tl.load(row + t, mask=t < L, other=float("-inf"))
                mn = tl.maximum(m, tl.max(s, 0))
                safe = tl.where(mn == float("-inf"), 0.0, mn)  # (nothing seen yet: no NaN)
                total = total * tl.exp(m - safe) + tl.sum(tl.exp(s - safe), 0)
                m = mn
            tl.store(Stats + (r * rows + j) * 2, m)
            tl.store(Stats + (r * rows + j) * 2 + 1, total)
        tl.debug_barrier()
        # 3. the scores grow by the chunk's probabilities, over G
        for t0 in range(0, L, BLOCK_N):
            t = t0 + tl.arange(0, BLOCK_N)
            tm = t < L
            mass = tl.zeros([BLOCK_N], tl.float32)
            for r0 in range(c0, c1, BLOCK_R):
                ri = r0 + tl.arange(0, BLOCK_R)
                rm = ri < c1
                m = tl.load(Stats + (r * rows + ri) * 2, mask=rm, other=float("-inf"))
                total = tl.load(Stats + (r * rows + ri) * 2 + 1, mask=rm, other=1.0)
                live = m > float("-inf")  # a row that sees no token adds nothing
                s = tl.load(Logits + (r * R + ri - c0)[:, None] * W + t[None, :], mask=rm[:, None] & tm[None, :],
                            other=float("-inf"))
                p = tl.exp(s - tl.where(live, m, 0.0)[:, None]) / tl.where(live, total, 1.0)[:, None]
                mass += tl.sum(tl.where(live[:, None], p, 0.0), 0)
            slot = s0 + t
            at = Score + (slot // ps) * ss0 + (slot % ps) * ss1
            tl.store(at, tl.load(at, mask=tm) + mass / G, mask=tm)
        tl.debug_barrier()  # (the next chunk's scratch and scores)
    drop = L - kept
    if drop > 0:
        tl.debug_barrier()
        cand = tl.maximum(L - recent, 0)  # the candidates: the first L - recent tokens
        thr = _threshold(Pos, Score, s0, cand, 9223372036854775807, drop, ps, sp0, sp1, ss0, ss1, False, BLOCK_N)
        # the kept tokens to the front, in order
        w = tl.zeros([], tl.int64)
        for t0 in range(0, L, BLOCK_N):
            t = t0 + tl.arange(0, BLOCK_N)
            tm = t < L
            slot = s0 + t
            page, sr = slot // ps, slot % ps
            sc = tl.load(Score + page * ss0 + sr * ss1, mask=tm, other=0.0)
            stay = tm & ~((t < cand) & (_order_key(sc, t) <= thr))
            dst = s0 + w + tl.cumsum(stay.to(tl.int64), 0) - 1
            dp, dr = dst // ps, dst % ps
            both = stay[:, None] & dm[None, :]
            x = tl.load(KP + page[:, None] * skp0 + sr[:, None] * skp1 + d[None, :] * skp2, mask=both)
            y = tl.load(VP + page[:, None] * svp0 + sr[:, None] * svp1 + d[None, :] * svp2, mask=both)
            p = tl.load(Pos + page * sp0 + sr * sp1, mask=stay)
            tl.debug_barrier()  # every source of the block read before a destination is written
            tl.store(KP + dp[:, None] * skp0 + dr[:, None] * skp1 + d[None, :] * skp2, x, mask=both)
            tl.store(VP + dp[:, None] * svp0 + dr[:, None] * svp1 + d[None, :] * svp2, y, mask=both)
            tl.store(Pos + dp * sp0 + dr * sp1, p, mask=stay)
            tl.store(Score + dp * ss0 + dr * ss1, sc, mask=stay)
            w += tl.sum(stay.to(tl.int64), 0)
            tl.debug_barrier()
        for t0 in range(kept, L, BLOCK_N):
            t = t0 + tl.arange(0, BLOCK_N)
            slot = s0 + t
            tl.store(Pos + (slot // ps) * sp0 + (slot % ps) * sp1, -1, mask=t < L)
    if HAS_COUNTS:
        tl.store(Counts + b * sc0 + h * sc1, kept.to(tl.int32))
    if HAS_NEXT:
        tl.store(Next + b * sn0 + h * sn1, s0 + kept)


def _widest(lengths) -> int:
    """The longest head, at least 1: the scratch rows' width (the host's counts, read without a torch op)."""
    return max(int(lengths.numpy().max(initial=0)), 1)


def _check_heads(head_start, lengths, keep, recent, slots) -> None:
    """The C++ kernel's checks of the host's counts (memory safety, and drops outside the window), in numpy."""
    first, n, kept = (t.numpy() for t in (head_start, lengths, keep))
    bad = (first < 0) | (n < 0) | (first + n > slots) | (kept < 0) | (kept > n) | (n - kept > np.maximum(n - recent, 0))
    if bad.any():
        b, h = (int(i) for i in np.argwhere(bad)[0])
        raise ValueError(f"paged_evict: head ({b}, {h}) has head_start {int(first[b, h])}, lengths {int(n[b, h])} and "
                         f"keep {int(kept[b, h])}: its run must lie in the pools' {slots} slots and drop only among "
                         f"its first lengths - recent ({recent})")


def paged_evict(k_pages, v_pages, pos, score, queries, head_start, lengths, keep, start, recent, scale, counts=None,
                next_slot=None) -> None:
    B, H = lengths.shape
    if B * H == 0:
        return
    _check_heads(head_start, lengths, keep, recent, k_pages.shape[0] * k_pages.shape[1])
    Hq, n, D = queries.shape[1:]
    G, device = Hq // H, queries.device
    heads = torch.stack([head_start, lengths, keep]).to(torch.int64).reshape(3, -1)
    if device.type == "cuda" and torch.cuda.is_available():  # (a copy from pageable memory waits for the stream)
        heads = heads.pin_memory()
    heads = heads.to(device, non_blocking=True)
    width = _widest(lengths)
    chunk = max(1, min(G * n, MAX_LOGITS // (B * H * width)))  # query rows a head's scratch holds
    logits = torch.empty(B * H * chunk * width, dtype=torch.float32, device=device)
    stats = torch.empty(B * H * G * n * 2, dtype=torch.float32, device=device)
    block_d = triton.next_power_of_2(D)
    with on_device(queries):
        _paged_evict[(B * H,)](
            k_pages, v_pages, pos, score, queries, heads, counts if counts is not None else heads,
            next_slot if next_slot is not None else heads, logits, stats, *k_pages.stride(), *v_pages.stride(),
            *pos.stride(), *score.stride(), *queries.stride(), *(counts.stride() if counts is not None else (0, 0)),
            *(next_slot.stride() if next_slot is not None else (0, 0)), B * H, H, G, n, D, k_pages.shape[1], width,
            chunk, start, recent, scale, HAS_COUNTS=counts is not None, HAS_NEXT=next_slot is not None,
            BLOCK_N=max(16, 4096 // block_d), BLOCK_D=block_d, BLOCK_R=16, num_warps=4)
