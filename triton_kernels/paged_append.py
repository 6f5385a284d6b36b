"""paged_append in Triton: a program per (batch, head) copies the head's n rows of k and v into the
pools, writes their positions and scores, then moves the head's counters (semantics in the
reference, vtattn/reference/paged_append.py). One warp: the counters are read before they move."""
from ._common import DTYPES, on_device, tl, triton
from .select_tokens import device_reason

MAX_HEADS = 2**31 - 1  # a program per head on grid x


def supports(k_pages, v_pages, pos, next_slot, lengths, k, v, start, last, score) -> str | None:
    if k.dtype not in DTYPES or k_pages.dtype != k.dtype or v_pages.dtype != k.dtype or v.dtype != k.dtype:
        return f"k_pages, v_pages, k and v must share one of fp16/bf16/fp32, got {k_pages.dtype} and {k.dtype}"
    if k.shape[0] * k.shape[1] > MAX_HEADS:
        return f"at most {MAX_HEADS} heads (B * H), got {k.shape[0] * k.shape[1]}"
    if start.device.type != "cpu" and start.device != k.device:
        return f"start must be on k's device or the CPU, got {start.device}"
    return device_reason(*(t for t in (k_pages, v_pages, pos, next_slot, lengths, k, v, last, score) if t is not None))


@triton.jit(do_not_specialize=["start_host", "start_on_device"])  # a new position each step: one compile
def _paged_append(KP, VP, K, V, Pos, Score, Next, Lengths, Last, Start, start_host, start_on_device,
                  skp0, skp1, skp2, svp0, svp1, svp2, sk0, sk1, sk2, sk3, sv0, sv1, sv2, sv3,
                  sq0, sq1, sc0, sc1, snb, snh, sgb, sgh, slb, slh, H, n, D, ps, slots,
                  HAS_LAST: tl.constexpr, HAS_SCORE: tl.constexpr, BLOCK_D: tl.constexpr):
    r = tl.program_id(0).to(tl.int64)
    b, h = r // H, r % H
    s0 = tl.load(Next + b * snb + h * snh)
    if HAS_LAST:
        cap = tl.load(Last + b * slb + h * slh)
    else:
        cap = s0 + n
    first = start_host + start_on_device * tl.load(Start)  # one variant for a device and a host start
    d = tl.arange(0, BLOCK_D)
    for t in range(0, n):
        # clamped tokens all go to `cap`; only the newest (t = n - 1) writes there
        s = tl.minimum(s0 + t, cap)
        ok = ((s0 + t < cap) | (t == n - 1)) & (s >= 0) & (s < slots)
        page, row = s // ps, s % ps
        for d0 in range(0, D, BLOCK_D):
            m = ok & (d0 + d < D)
            x = tl.load(K + b * sk0 + h * sk1 + t * sk2 + (d0 + d) * sk3, mask=m)
            tl.store(KP + page * skp0 + row * skp1 + (d0 + d) * skp2, x, mask=m)
            y = tl.load(V + b * sv0 + h * sv1 + t * sv2 + (d0 + d) * sv3, mask=m)
            tl.store(VP + page * svp0 + row * svp1 + (d0 + d) * svp2, y, mask=m)
        tl.store(Pos + page * sq0 + row * sq1, first + t, mask=ok)
        if HAS_SCORE:
            tl.store(Score + page * sc0 + row * sc1, 0.0, mask=ok)
    tl.store(Next + b * snb + h * snh, s0 + n)
    tl.store(Lengths + b * sgb + h * sgh, tl.load(Lengths + b * sgb + h * sgh) + n)


def paged_append(k_pages, v_pages, pos, next_slot, lengths, k, v, start, last, score) -> None:
    B, H, n, D = k.shape
    if B * H == 0 or n == 0:
        return
    here = start.device == k.device  # else a CPU scalar (the dynamic cache's int), read here: no sync
    with on_device(k):
        _paged_append[(B * H,)](
            k_pages, v_pages, k, v, pos, pos if score is None else score, next_slot, lengths,
            next_slot if last is None else last, start if here else next_slot, 0 if here else int(start), int(here),
            *k_pages.stride(), *v_pages.stride(), *k.stride(), *v.stride(), *pos.stride(),
            *(score.stride() if score is not None else (0, 0)), *next_slot.stride(), *lengths.stride(),
            *(last.stride() if last is not None else (0, 0)), H, n, D, k_pages.shape[1],
            k_pages.shape[0] * k_pages.shape[1], HAS_LAST=last is not None, HAS_SCORE=score is not None,
            BLOCK_D=min(256, triton.next_power_of_2(max(D, 1))), num_warps=1)
