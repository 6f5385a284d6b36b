"""The benchmark's statistics (vtattn.bench.timing, runner's ratios) on synthetic samples and a fake
clock: intervals that hold the median as often as they claim, sampling that stops when the spread
is small or the row's cap has passed, and speedups that read as noise when their interval holds 1."""
import contextlib
import math
import random

import pytest
import torch

from vtattn.bench import runner
from vtattn.bench.cases import Case, Impl
from vtattn.bench.timing import Budget, median_ci, paired_ratio, pooled, sample_until, summary, time_cpu


def _coverage(n, level):
    """P(j <= Bin(n, 1/2) <= n - j) for the j median_ci picks, computed independently."""
    lo, hi, _ = median_ci(list(range(n)), level)
    j = lo + 1
    return sum(math.comb(n, i) for i in range(j, n - j + 1)) / 2 ** n, j


@pytest.mark.parametrize("n", [6, 7, 10, 20, 33, 59])
def test_median_interval_is_the_narrowest_exact_one(n):
    cover, j = _coverage(n, 0.95)
    assert cover >= 0.95 and median_ci(list(range(n)))[2] == pytest.approx(cover)
    if j + 1 <= n // 2:  # one order statistic further in would cover less than 95%
        narrower = sum(math.comb(n, i) for i in range(j + 1, n - j)) / 2 ** n
        assert narrower < 0.95


@pytest.mark.parametrize("n,cover", [(1, 0.0), (2, 0.5), (3, 0.75), (5, 0.9375)])
def test_few_samples_give_min_max_and_say_how_little_it_covers(n, cover):
    xs = [float(x) for x in range(1, n + 1)]
    assert median_ci(xs) == (1.0, float(n), pytest.approx(cover))


@pytest.mark.parametrize("n", [15, 200])  # exact, then the normal approximation
def test_interval_holds_the_true_median_as_often_as_it_claims(n):
    rng = random.Random(0)
    hits, trials = 0, 1500
    for _ in range(trials):  # lognormal: skewed like timings, true median 1.0
        lo, hi, _ = median_ci(sorted(math.exp(rng.gauss(0, 0.3)) for _ in range(n)))
        hits += lo <= 1.0 <= hi
    assert 0.93 <= hits / trials <= 0.995


class FakeClock:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t


def _sampler(clock, values):
    """sample(): the next value (ms), advancing the fake clock by it."""
    it = iter(values)

    def sample():
        ms = next(it)
        clock.t += ms / 1e3
        return ms
    return sample


def test_sampling_stops_once_the_interval_is_within_target():
    clock = FakeClock()
    rng = random.Random(1)
    t = sample_until(_sampler(clock, (1 + 0.001 * rng.random() for _ in range(10**6))),
                     Budget(target=0.02, min_reps=10, min_s=0.05, max_s=5.0), clock)
    assert t.converged is True and t.rel_ci <= 0.02
    assert 50 <= t.reps <= 60  # min_s (50 ms of 1 ms samples), then the first check


def test_sampling_stops_at_the_cap_and_says_it_did_not_converge():
    clock = FakeClock()
    rng = random.Random(2)
    t = sample_until(_sampler(clock, (rng.uniform(1, 10) for _ in range(10**6))),
                     Budget(target=0.01, min_reps=10, min_s=0.0, max_s=0.2), clock)
    assert t.converged is False and t.rel_ci > 0.01
    assert 0.2 <= clock.t < 0.22 and t.reps == len(t.samples)


def test_slow_calls_stop_at_the_cap_with_three_samples():
    clock = FakeClock()
    t = sample_until(_sampler(clock, [5000.0, 5100.0, 4900.0, 5000.0]),
                     Budget(target=0.001, min_reps=6, min_s=0.0, max_s=2.0), clock)
    assert t.reps == 3 and t.converged is False and t.ci_level == pytest.approx(0.75)


def test_scheduler_stalls_land_in_single_samples_not_in_the_median():
    """The artefact behind the ~8 ms / ~23.5 ms clusters: a descheduled thread costs whole scheduler
    ticks (4 ms). One call in 25 stalls here: short samples keep the op's own time as the median,
    where an average over a block of calls (torch.utils.benchmark's 1000 for a 0.02 ms op) would
    be 0.18 ms, nine times too slow."""
    clock = FakeClock()
    calls = [0]

    def op():
        calls[0] += 1
        clock.t += 20e-6 + (4e-3 if calls[0] % 25 == 0 else 0.0)

    t = time_cpu([op], Budget(target=0.02, min_reps=10, min_s=0.05, max_s=1.0, warmup_s=0.001), clock)
    assert t.calls_per_rep in (5, 6)  # 0.1 ms samples (up to rounding)
    assert t.median_ms == pytest.approx(0.02, rel=1e-6) and t.converged
    block_mean_ms = (20e-6 + 4e-3 / 25) * 1e3
    assert block_mean_ms > 8 * t.median_ms


def test_pooling_two_measurements_widens_the_interval_over_a_drift():
    a, b = summary([1.0 + 0.001 * i for i in range(30)]), summary([1.3 + 0.001 * i for i in range(30)])
    p = pooled(a, b)
    assert p.reps == 60 and p.ci_low_ms < 1.1 and p.ci_high_ms > 1.2


def _case(timings, calls):
    """A case whose impls return fixed timings: name -> (role, [Timing per measurement])."""
    def impl(name, role, ts):
        def timer(fns, device, quick):
            calls.append(name)
            return ts.pop(0)
        return Impl(name, lambda x: x["x"], role=role, timer=timer)
    c = Case("attention", "fake", {"B": 1, "N": 8, "D": 4}, lambda device, dtype, seed: {"x": torch.zeros(1)})
    c.impls = [impl(n, role, list(ts)) for n, (role, ts) in timings.items()]
    return c


PEAKS = {"copy_gbps": 1.0, "matmul_tflops": 1.0}


def test_speedups_whose_interval_holds_one_are_noise(monkeypatch):
    tight = lambda m: summary([m * (1 + 0.001 * i) for i in range(-10, 11)])
    wide = lambda m: summary([m * (1 + 0.02 * i) for i in range(-10, 11)])
    calls = []
    case = _case({"base": ("baseline", [tight(1.0), tight(1.0)]), "fast": ("vtattn", [tight(0.5)]),
                  "same": ("vtattn", [wide(0.97)])}, calls)
    rows = {r["backend"]: r for r in runner.run_case(case, torch.device("cpu"), torch.float32, PEAKS)}
    assert calls == ["base", "fast", "same", "base"]  # the baseline again, last, on CPU
    assert rows["base"]["reps"] == 42 and rows["base"]["speedup_ci"] is None
    assert rows["fast"]["speedup"] == pytest.approx(2.0, rel=0.01) and rows["fast"]["speedup_noise"] is False
    lo, hi = rows["fast"]["speedup_ci"]
    assert lo < 2.0 < hi and lo > 1
    assert rows["same"]["speedup_noise"] is True and rows["same"]["speedup_ci"][0] < 1 < rows["same"]["speedup_ci"][1]


@pytest.mark.gpu
@pytest.mark.parametrize("with_triton", [True, False], ids=["do_bench", "torch-fallback"])
def test_gpu_timer_rotates_inputs_and_times_each_call(monkeypatch, with_triton):
    """time_cuda through triton.testing.do_bench (when importable) and through its torch fallback:
    every input copy is used, and a call ~4x longer times ~4x longer."""
    from vtattn.bench import timing
    if with_triton:
        pytest.importorskip("triton")
        assert timing._do_bench is not None
    else:
        monkeypatch.setattr(timing, "_do_bench", None)
    device = torch.device("cuda")
    a, b = torch.randn(2048, 2048, device=device), torch.randn(4096, 4096, device=device)
    used = []
    small = [lambda i=i: (used.append(i), a @ a) for i in range(3)]
    t_small = timing.time_cuda(small, device, warmup_ms=5, rep_ms=20)
    t_large = timing.time_cuda([lambda: b @ b], device, warmup_ms=5, rep_ms=20)
    assert set(used) == {0, 1, 2} and t_small.reps >= 1 and t_small.median_ms > 0
    assert 3 < t_large.median_ms / t_small.median_ms < 12
    assert timing.l2_bytes(device) == torch.cuda.get_device_properties(device).L2_cache_size > 0


def test_gpu_timer_hands_do_bench_a_rotating_call(monkeypatch):
    """CPU stand-in for do_bench: time_cuda gives it one call that rotates over the input copies and
    asks for every sample (return_mode="all"), whose statistics it returns."""
    from vtattn.bench import timing
    seen = {}

    def fake_do_bench(fn, warmup, rep, return_mode):
        seen.update(warmup=warmup, rep=rep, mode=return_mode)
        for _ in range(6):
            fn()
        return [1.0, 2.0, 3.0, 4.0, 5.0]

    monkeypatch.setattr(timing, "_do_bench", fake_do_bench)
    monkeypatch.setattr(torch.cuda, "device", lambda device: contextlib.nullcontext())
    used = []
    t = timing.time_cuda([lambda i=i: used.append(i) for i in range(3)], torch.device("cuda"), warmup_ms=5, rep_ms=20)
    assert seen == {"warmup": 5, "rep": 20, "mode": "all"}
    assert used == [0, 1, 2, 0, 1, 2] and t.reps == 5 and t.median_ms == 3.0


def test_decode_host_pairs_each_step_with_the_twin_in_turn(monkeypatch):
    """decode_host rows: each of a row's decode steps runs next to the unpatched twin's same step, first
    and second in turn (the second of a pair runs on warmer caches), and host_us_layer is the median of
    the pairs' differences per layer: a load that changes between steps cancels out of each pair."""
    from vtattn.bench import decode_host as dh
    order, load = [], {s: 10.0 * (s % 3) for s in range(dh.STEPS)}  # ms of load, step by step

    def fake_decode(model, x, on_step, static):
        def step(s):
            order.append((model, s))
            on_step(s, (load[s] + (1.0 if model == "row" else 0.0) + 0.2 * (len(order) % 2 == 0)) * 1e-3)
        return step

    monkeypatch.setattr(dh, "_decode", fake_decode)
    impl = Impl("row", None)
    dh._steps(impl, lambda: "row", lambda: "twin", calls=2, layers=4, static=False)
    impl.timer([lambda: impl.call({})], torch.device("cpu"), False)  # two calls of STEPS steps each
    firsts = [order[i][0] for i in range(0, 2 * dh.STEPS, 2)]
    assert firsts == ["twin", "row"] * (dh.STEPS // 2)  # in turn
    assert impl.stats["host_us_layer"] == pytest.approx(1e3 / 4)  # 1 ms a step over the twin, 4 layers


def test_a_paired_ratio_cancels_a_load_both_calls_share():
    """Two calls whose times drift together (a shared machine's load): the ratio of separate medians
    would carry the drift between the two runs, the paired ratio does not; each of a pair goes first
    in turn (the second call of a pair sees the first's caches)."""
    clock, order = [0], []

    def call(name, ms):
        def f():
            clock[0] += 1
            order.append(name)
            return ms * (1 + 0.5 * (clock[0] // 10 % 2))  # the load doubles the time of 10 calls in 20
        return f

    t = paired_ratio(call("num", 2.0), call("den", 1.0), Budget(target=0.01, min_reps=8, min_s=0.0, max_s=5.0))
    assert t.median_ms == pytest.approx(2.0) and t.reps >= 8  # (the pairs that straddle a change are few)
    assert order[:4] == ["num", "den", "den", "num"]


def test_cpu_model_rows_take_their_speedup_from_pairs(monkeypatch):
    """A row with `sample` (model-level) and a baseline with one: the speedup is the pairs' median
    ratio, with its interval and count; a row without `sample` keeps the ratio of medians."""
    calls = []
    case = _case({"base": ("baseline", [summary([1.0] * 10), summary([1.0] * 10)]),
                  "fast": ("vtattn", [summary([1.0] * 10)]), "plain": ("vtattn", [summary([0.5] * 10)])}, calls)
    times = {"base": 2.0, "fast": 1.0}
    for impl in case.impls:
        if impl.name in times:
            impl.sample = lambda x, n=impl.name: times[n]
    rows = {r["backend"]: r for r in runner.run_case(case, torch.device("cpu"), torch.float32, PEAKS)}
    assert rows["fast"]["speedup"] == pytest.approx(2.0) and rows["fast"]["speedup_pairs"] >= 6
    assert rows["fast"]["speedup_noise"] is False  # (its separate medians read 1.0)
    assert rows["plain"]["speedup"] == pytest.approx(2.0) and rows["plain"]["speedup_pairs"] is None


def test_a_row_whose_pairs_fail_keeps_its_ratio_of_medians_and_says_why():
    case = _case({"base": ("baseline", [summary([1.0] * 10), summary([1.0] * 10)]),
                  "row": ("vtattn", [summary([0.5] * 10)])}, [])
    case.impls[0].sample = lambda x: 1.0
    case.impls[1].sample = lambda x: (_ for _ in ()).throw(RuntimeError("patch gone"))
    row = next(r for r in runner.run_case(case, torch.device("cpu"), torch.float32, PEAKS) if r["backend"] == "row")
    assert row["speedup"] == pytest.approx(2.0) and row["speedup_pairs"] is None
    assert "speedup unpaired: RuntimeError: patch gone" in row["note"]


def test_every_llava_and_qwen_e2e_row_can_be_paired():
    """The runner pairs a CPU model row with its baseline only where both give `sample`: every e2e
    row of the transformers scenarios does (vLLM's rows time requests, their own way)."""
    from vtattn.bench.cases import build_cases
    cases = [c for c in build_cases(torch.device("cpu"), ops=["e2e"], level="tiny") if not c.name.startswith("vllm")]
    assert cases and all(i.sample is not None for c in cases for i in c.impls)
