"""Timers and their statistics. Each timer takes a list of zero-argument callables, one per input
copy, and rotates among them so that no repetition finds its inputs left in cache by the previous one.

GPU timings: `triton.testing.do_bench` when triton is importable (CUDA events around each call, the L2
flushed before each, warm-up and repetitions sized from a first estimate), else the same procedure in
torch (`time_cuda`'s fallback), flushing a buffer twice the device's L2 (its device properties).

Every Timing carries its sample count and the 95% confidence interval of its median (order
statistics: no assumption on the distribution, which on a shared CPU is anything but normal).

CPU timings: one sample is a block of calls lasting >= SAMPLE_S, sampled until the interval's
half-width is within `target` of the median or the row's time cap has passed (`converged` says
which). Short samples matter on a shared machine: a time slice lost to another process (whole
scheduler ticks, 4 ms at HZ=250) lands in one sample, which the median ignores, where a block of
1000 calls (torch.utils.benchmark's choice for a 0.08 ms op) averages it into every sample. The
thread count is the caller's: more threads than idle cores make each parallel region wait for a
descheduled worker, quantising times to those ticks (see `python -m vtattn.bench --help`)."""
import contextlib
import functools
import gc
import math
import time
from dataclasses import dataclass, field
from itertools import cycle
from typing import Callable, Iterable, Iterator, Sequence

import torch

try:
    from triton.testing import do_bench as _do_bench
except ImportError:  # the torch-only fallback of time_cuda
    _do_bench = None

_flush_buf: dict[torch.device, torch.Tensor] = {}
CI_LEVEL = 0.95
SAMPLE_S = 1e-4  # shortest CPU sample: perf_counter's ~100 ns overhead stays below 0.1%


@dataclass
class Timing:
    median_ms: float
    p20_ms: float
    p80_ms: float
    reps: int  # samples
    ci_low_ms: float  # interval of the median, coverage ci_level (below CI_LEVEL when reps < 6)
    ci_high_ms: float
    ci_level: float
    calls_per_rep: int = 1
    converged: bool | None = None  # CPU: the interval reached the target within the time cap; None: no target
    target: float | None = field(default=None, repr=False)
    samples: list[float] = field(default_factory=list, repr=False)  # sorted

    @property
    def rel_ci(self) -> float:
        """Half-width of the interval relative to the median."""
        return (self.ci_high_ms - self.ci_low_ms) / 2 / self.median_ms if self.median_ms > 0 else math.inf


@dataclass(frozen=True)
class Budget:
    """When adaptive sampling stops: once min_reps samples and min_s seconds are in, as soon as
    the interval is within +-target of the median; at max_s in any case (with >= 3 samples)."""
    target: float
    min_reps: int
    min_s: float
    max_s: float
    warmup_s: float = 0.0


# Kernels: sub-ms to tens of ms a call. Models (vision_tower, e2e): tens of ms to seconds a call.
CPU_BUDGETS = {
    ("kernel", False): Budget(target=0.02, min_reps=10, min_s=0.2, max_s=2.0, warmup_s=0.05),
    ("kernel", True): Budget(target=0.03, min_reps=10, min_s=0.05, max_s=0.5, warmup_s=0.02),
    ("model", False): Budget(target=0.05, min_reps=6, min_s=0.0, max_s=4.0),
    ("model", True): Budget(target=0.05, min_reps=6, min_s=0.0, max_s=2.0),
    # a ratio from pairs of model calls (paired_ratio): one sample is two calls
    ("pairs", False): Budget(target=0.03, min_reps=6, min_s=0.0, max_s=2.0),
    ("pairs", True): Budget(target=0.05, min_reps=4, min_s=0.0, max_s=1.0),
}


@functools.lru_cache(maxsize=None)
def _ci_rank(n: int, level: float) -> tuple[int, float]:
    """(j, coverage) of median_ci for n samples."""
    if n >= 60:
        z = _z(level)
        return max(1, math.floor((n - z * math.sqrt(n)) / 2)), level
    def cdf(k: int) -> float:  # P(Bin(n, 1/2) <= k)
        return sum(math.comb(n, i) for i in range(k + 1)) / (1 << n)

    j, cover = 1, (1 - 2 * cdf(0) if n > 1 else 0.0)
    while j + 1 <= n // 2 and 1 - 2 * cdf(j) >= level:
        j, cover = j + 1, 1 - 2 * cdf(j)
    return j, cover


def median_ci(sorted_xs: Sequence[float], level: float = CI_LEVEL) -> tuple[float, float, float]:
    """(low, high, coverage): the order statistics x_(j) <= median <= x_(n+1-j) with the largest j
    whose coverage P(j <= Bin(n, 1/2) <= n - j) is >= level; [min, max] and its lower coverage
    when no j reaches it (n < 6 at 95%). Exact below 60 samples, the normal approximation above."""
    j, cover = _ci_rank(len(sorted_xs), level)
    return sorted_xs[j - 1], sorted_xs[len(sorted_xs) - j], cover


@functools.lru_cache(maxsize=None)
def _z(level: float) -> float:
    """Two-sided normal quantile by bisection (no scipy)."""
    lo, hi = 0.0, 10.0
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if math.erf(mid / math.sqrt(2)) < level else (lo, mid)
    return (lo + hi) / 2


def _quantile(s: Sequence[float], q: float) -> float:
    """Linear interpolation between order statistics (numpy's default)."""
    pos = q * (len(s) - 1)
    i = math.floor(pos)
    return s[i] if i + 1 >= len(s) else s[i] + (s[i + 1] - s[i]) * (pos - i)


def summary(times_ms: Iterable[float], calls_per_rep: int = 1, target: float | None = None) -> Timing:
    """The statistics of samples; `converged` when a target is given."""
    s = sorted(times_ms)
    if not s:
        raise ValueError("summary: no samples")
    lo, hi, level = median_ci(s)
    t = Timing(median_ms=_quantile(s, 0.5), p20_ms=_quantile(s, 0.2), p80_ms=_quantile(s, 0.8), reps=len(s),
               ci_low_ms=lo, ci_high_ms=hi, ci_level=level, calls_per_rep=calls_per_rep, target=target, samples=s)
    t.converged = None if target is None else t.rel_ci <= target
    return t


def pooled(a: Timing, b: Timing) -> Timing:
    """One timing from two measurements of the same thing (at different times)."""
    return summary(a.samples + b.samples, a.calls_per_rep, a.target)


def sample_until(sample: Callable[[], float], budget: Budget, clock: Callable[[], float] = time.perf_counter,
                 calls_per_rep: int = 1) -> Timing:
    """Call `sample()` (one sample, in ms) until `budget` says stop. The interval is recomputed
    after every 10% more samples, so its cost stays small against the samples'."""
    times: list[float] = []
    start, check = clock(), budget.min_reps
    while True:
        times.append(sample())
        n, elapsed = len(times), clock() - start
        if n >= check and elapsed >= budget.min_s:
            t = summary(times, calls_per_rep, budget.target)
            if t.converged:
                return t
            check = n + max(1, n // 10)
        if elapsed >= budget.max_s and n >= 3:
            return summary(times, calls_per_rep, budget.target)


def paired_ratio(num: Callable[[], float], den: Callable[[], float], budget: Budget) -> Timing:
    """num() / den() (each returns one call's ms) from calls that alternate, each of a pair first in
    turn: one sample is one pair's ratio, so a load both calls of a pair see cancels out (a shared
    CPU's neighbours, its clock) where separate runs of each would carry it into the ratio. The
    Timing's median and interval are the ratio's."""
    turn = cycle((True, False))

    def sample() -> float:
        if next(turn):
            a = num()
            return a / den()
        b = den()
        return num() / b

    return sample_until(sample, budget)


@contextlib.contextmanager
def cpu_threads(device: torch.device, n: int | None = None) -> Iterator[None]:
    """torch's threads on CPU for the block: n, default 1 (see the module's docstring), restored
    after it. No-op on CUDA."""
    before = torch.get_num_threads()
    if device.type == "cpu":
        torch.set_num_threads(n or 1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def l2_bytes(device: torch.device) -> int:
    """The L2 cache size of a CUDA device (torch's device properties)."""
    return int(torch.cuda.get_device_properties(device).L2_cache_size)


def flush_l2(device: torch.device) -> None:
    """Overwrite the L2 cache with a buffer no kernel reads, twice its size (a no-op on CPU)."""
    if device.type != "cuda":
        return
    if device not in _flush_buf:
        _flush_buf[device] = torch.empty(max(2 * l2_bytes(device), 1 << 20), dtype=torch.int8, device=device)
    _flush_buf[device].zero_()


def time_cuda(fns: Sequence[Callable[[], object]], device: torch.device, warmup_ms: float = 25.0,
              rep_ms: float = 100.0, max_reps: int = 1000) -> Timing:
    """CUDA events around each call, the L2 flushed before each (outside the events): triton's
    do_bench when triton is importable (its own repetition count), else the same in torch (at most
    max_reps repetitions)."""
    calls = cycle(fns)
    with torch.cuda.device(device):
        if _do_bench is not None:
            return summary(_do_bench(lambda: next(calls)(), warmup=warmup_ms, rep=rep_ms, return_mode="all"))
        return _time_cuda_torch(calls, device, warmup_ms, rep_ms, max_reps)


def _time_cuda_torch(calls: Iterator[Callable[[], object]], device: torch.device, warmup_ms: float, rep_ms: float,
                     max_reps: int) -> Timing:
    def sync() -> None:
        torch.cuda.synchronize(device)

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


def time_cpu(fns: Sequence[Callable[[], object]], budget: Budget, clock: Callable[[], float] = time.perf_counter) -> Timing:
    """Warm up for budget.warmup_s (at least 2 calls), size the blocks from its median call, then
    sample blocks adaptively. The garbage collector is off meanwhile (as in timeit): its pauses are not
    the op's."""
    calls = cycle(fns)
    gc.collect()
    enabled = gc.isenabled()
    gc.disable()
    try:
        t0, each = clock(), list[float]()
        while len(each) < 2 or clock() - t0 < budget.warmup_s:
            t = clock()
            next(calls)()
            each.append(clock() - t)
        per_call = max(sorted(each)[len(each) // 2], 1e-9)  # the median: a stall must not shrink the blocks
        block = max(1, math.ceil(SAMPLE_S / per_call))

        def sample() -> float:
            t = clock()
            for _ in range(block):
                next(calls)()
            return (clock() - t) * 1e3 / block

        return sample_until(sample, budget, clock, calls_per_rep=block)
    finally:
        if enabled:
            gc.enable()


def time_fns(fns: Sequence[Callable[[], object]], device: torch.device, quick: bool = False) -> Timing:
    if device.type == "cuda":
        return time_cuda(fns, device, warmup_ms=10 if quick else 25, rep_ms=30 if quick else 100)
    return time_cpu(fns, CPU_BUDGETS["kernel", bool(quick)])


def time_reps(fns: Sequence[Callable[[], object]], device: torch.device, reps: int, quick: bool = False,
              measured: Callable[[], float] | None = None) -> Timing:
    """Model-level calls of up to seconds, timed one by one (synchronized before and after); the
    caller's probe call is the warm-up. CUDA: `reps` calls, as the adaptive timers would take
    minutes per row. CPU: sampled until the spread is small or the row's cap (CPU_BUDGETS) has
    passed. `measured()`, when given, returns the ms of the call just made that count (a decode
    clock's lap) in place of the whole call's."""
    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    calls = cycle(fns)

    def sample() -> float:
        sync()
        t = time.perf_counter()
        next(calls)()
        sync()
        return (time.perf_counter() - t) * 1e3 if measured is None else measured()

    if device.type == "cuda":
        return summary([sample() for _ in range(reps)])
    return sample_until(sample, CPU_BUDGETS["model", bool(quick)])
