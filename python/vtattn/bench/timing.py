"""Timers. Each takes a list of zero-argument callables, one per input copy, and rotates among
them so that no repetition finds its inputs left in cache by the previous one."""
import time
from dataclasses import dataclass
from itertools import cycle

import torch

_FLUSH_BYTES = 256 << 20  # larger than any GPU's L2 (H100: 50 MB)
_flush_buf = {}


@dataclass
class Timing:
    median_ms: float
    p20_ms: float
    p80_ms: float
    reps: int


def summary(times_ms) -> Timing:
    q = torch.tensor(times_ms, dtype=torch.float64).quantile(torch.tensor([0.2, 0.5, 0.8], dtype=torch.float64))
    return Timing(median_ms=q[1].item(), p20_ms=q[0].item(), p80_ms=q[2].item(), reps=len(times_ms))


def flush_l2(device):
    """Overwrite the L2 cache with a buffer no kernel reads (a no-op on CPU)."""
    if device.type != "cuda":
        return
    if device not in _flush_buf:
        _flush_buf[device] = torch.empty(_FLUSH_BYTES, dtype=torch.int8, device=device)
    _flush_buf[device].zero_()


def time_cuda(fns, device, warmup_ms=25.0, rep_ms=100.0, max_reps=1000) -> Timing:
    """do_bench-style: CUDA events around each call, L2 flushed before each (outside the events)."""
    sync = lambda: torch.cuda.synchronize(device)
    calls = cycle(fns)
    next(calls)()
    flush_l2(device)  # allocates the buffer outside the estimate below
    sync()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(5):
        flush_l2(device)
        next(calls)()
    end.record()
    sync()
    # The estimate includes the flushes, so it errs towards fewer repetitions.
    est_ms = max(start.elapsed_time(end) / 5, 1e-3)
    for _ in range(max(1, int(warmup_ms / est_ms))):
        next(calls)()
    n = min(max_reps, max(5, int(rep_ms / est_ms)))
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(n)]
    for s, e in events:
        flush_l2(device)
        s.record()
        next(calls)()
        e.record()
    sync()
    return summary([s.elapsed_time(e) for s, e in events])


def time_cpu(fns, min_run_time=0.3, max_run_time=2.0) -> Timing:
    """torch.utils.benchmark with all of torch's threads (its default is 1). adaptive_autorange
    takes at least 4 blocks and more until their spread settles, so one slow call on a busy
    machine does not become the median."""
    from torch.utils.benchmark import Timer

    calls = cycle(fns)
    step = lambda: next(calls)()
    step()
    timer = Timer(stmt="step()", globals={"step": step}, num_threads=torch.get_num_threads())
    m = timer.adaptive_autorange(threshold=0.1, min_run_time=min_run_time, max_run_time=max_run_time)
    return summary([t * 1e3 for t in m.times])


def time_fns(fns, device, quick=False) -> Timing:
    if device.type == "cuda":
        return time_cuda(fns, device, warmup_ms=10 if quick else 25, rep_ms=30 if quick else 100)
    return time_cpu(fns, min_run_time=0.1, max_run_time=0.5) if quick else time_cpu(fns)


def time_reps(fns, device, reps) -> Timing:
    """`reps` calls timed one by one (synchronized before and after): for model-level calls of up
    to seconds, where the adaptive timers above would take minutes per row. The caller warms up."""
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    calls, times = cycle(fns), []
    for _ in range(reps):
        sync()
        t = time.perf_counter()
        next(calls)()
        sync()
        times.append((time.perf_counter() - t) * 1e3)
    return summary(times)
