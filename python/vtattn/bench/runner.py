"""Run one case: probe and time every implementation, then turn the timings into rows."""
from functools import partial
from typing import Any, cast

import torch

import vtattn

from .cases import DTYPE_NAMES, Case, Impl, Skip, input_bytes, n_copies
from .timing import CPU_BUDGETS, Timing, paired_ratio, pooled, time_fns

Inputs = dict[str, Any]  # one copy of a case's inputs
Results = dict[str, tuple[Timing | None, str]]  # impl name -> (timing, note)


def _error(e: BaseException) -> str:
    if isinstance(e, Skip):
        return f"skipped: {e}"
    if isinstance(e, vtattn.BackendUnavailable):  # keep the reason, drop "vtattn.<op>: backend ..."
        return "refused: " + str(e).split("inputs: ", 1)[-1]
    return f"{type(e).__name__}: {e}".splitlines()[0][:300]


def _max_err(a: Any, b: torch.Tensor) -> float | None:
    a = a[0] if isinstance(a, tuple) else a
    if not isinstance(a, torch.Tensor) or a.shape != b.shape:
        return None
    return (a.float() - b.float()).abs().max().item()


def _measure(impl: Impl, copies: list[Inputs], device: torch.device, quick: bool) -> tuple[Timing, Any]:
    """(timing, output of the untimed probe call). Under no_grad: inference is what is timed (the
    random-weight models' parameters require grad, and autograd's recording is no op's cost)."""
    with torch.no_grad(), impl.ctx():
        xs = [impl.prep(x) if impl.prep else x for x in copies]
        out = impl.call(xs[0])  # refusals, compilation and autotuning happen here, untimed
        timing: Timing = (impl.timer or time_fns)([partial(impl.call, x) for x in xs], device, quick)
        return timing, out


def _bracket(impl: Impl, results: Results, copies: list[Inputs], device: torch.device, quick: bool) -> None:
    """Time the fastest baseline again, after the others, and pool both sample sets: a load that
    changed during the case (a shared CPU) then widens its interval, and every ratio's, in place of
    biasing them (the rows after it measured in other conditions than it)."""
    first, note = results[impl.name]
    try:
        again, _ = _measure(impl, copies, device, quick)
    except Exception:  # it ran once: keep that
        return
    t = pooled(cast(Timing, first), again)  # the fastest baseline: timed
    if impl.stats.get("tok_s"):  # set by its timer from the last measurement: tok/s is 1 / time
        impl.stats["tok_s"] *= again.median_ms / t.median_ms
    results[impl.name] = (t, note)


def _paired(base: Impl, impl: Impl, x: Inputs, quick: bool) -> Timing:
    """The speedup base / impl from alternating calls of the two model-level rows (`Impl.sample`),
    each call in its own context (a patch is applied and removed around its call, untimed)."""
    def one(i: Impl) -> float:
        assert i.sample is not None  # (checked by the caller)
        with torch.no_grad(), i.ctx():
            return i.sample(i.prep(x) if i.prep else x)

    return paired_ratio(partial(one, base), partial(one, impl), CPU_BUDGETS["pairs", bool(quick)])


def run_case(case: Case, device: torch.device, dtype: torch.dtype, peaks: dict[str, float], quick: bool = False
             ) -> list[dict[str, Any]]:
    results: Results = {}
    ref_out: Any = None
    outs: dict[str, Any] = {}
    copies: list[Inputs] | None
    t: Timing | None
    try:
        first = case.make_inputs(device, dtype, 0)
        copies = [first] + [case.make_inputs(device, dtype, s) for s in range(1, n_copies(device, input_bytes(first)))]
    except Exception as e:
        copies, setup_error = None, _error(e)
    for impl in case.impls:
        if copies is None:
            results[impl.name] = (None, setup_error)
            continue
        try:
            t, out = _measure(impl, copies, device, quick)
            results[impl.name] = (t, impl.note)
            if impl.role == "vtattn":
                outs[impl.name] = out
            elif impl.role == "baseline" and ref_out is None:
                ref_out = out  # vtattn outputs are checked against the first baseline that ran
        except Exception as e:
            results[impl.name] = (None, _error(e))
        if device.type == "cuda":
            torch.cuda.empty_cache()  # eager baselines leave large blocks behind
    def timed(role: str) -> dict[str, Timing]:
        found = {i.name: results[i.name][0] for i in case.impls if i.role == role}
        return {n: t for n, t in found.items() if t is not None}

    base = timed("baseline")
    best = min(base, key=lambda n: base[n].median_ms) if base else None
    if (device.type == "cpu" and best is not None and copies is not None
            and sum(t is not None for t, _ in results.values()) > 1):
        _bracket(next(i for i in case.impls if i.name == best), results, copies, device, quick)
    # CPU model rows: each speedup from calls alternating with the baseline's (the separate timings'
    # ratio carries whatever load changed between them, several % on a shared machine)
    pairs: dict[str, Timing] = {}
    base_impl = next((i for i in case.impls if i.name == best), None)
    if device.type == "cpu" and copies is not None and base_impl is not None and base_impl.sample is not None:
        for impl in case.impls:
            if impl.name != best and impl.sample is not None and results[impl.name][0] is not None:
                try:
                    pairs[impl.name] = _paired(base_impl, impl, copies[0], quick)
                except Exception as e:  # it was timed alone: its ratio of medians stays, and the note says why
                    t, note = results[impl.name]
                    results[impl.name] = (t, " ".join(filter(None, [note, f"speedup unpaired: {_error(e)}"])))
    del copies
    base, refs = timed("baseline"), timed("reference")
    elt = dtype.itemsize
    rows = []
    for impl in case.impls:
        t, note = results[impl.name]
        # skipped: why a row has no timing (a Skip, a backend's refusal or an error); None when timed.
        row: dict[str, Any]
        row = {"op": case.op, "case": case.name, "shape": case.shape, "dtype": DTYPE_NAMES[dtype],
               "backend": impl.name, "role": impl.role, "median_ms": None, "p20_ms": None, "p80_ms": None,
               "reps": None, "ci_low_ms": None, "ci_high_ms": None, "ci_level": None, "calls_per_rep": None,
               "converged": None, "tflops": None, "gbps": None, "pct_peak": None, "baseline": best,
               "baseline_ms": base[best].median_ms if best else None, "speedup": None, "speedup_ci": None,
               "speedup_noise": None, "speedup_pairs": None, "ratios": {}, "max_err": None, "device": str(device),
               "note": note,
               "skipped": None if t is not None else note.removeprefix("skipped: ")}
        row.update(impl.stats)
        if t is not None:
            row.update({k: getattr(t, k) for k in ("median_ms", "p20_ms", "p80_ms", "reps", "ci_low_ms", "ci_high_ms",
                                                   "ci_level", "calls_per_rep", "converged")})
            if case.flops is not None:
                row["tflops"] = case.flops / t.median_ms / 1e9
                row["pct_peak"] = 100 * row["tflops"] / peaks["matmul_tflops"]
            elif case.bytes_fn is not None:
                row["gbps"] = case.bytes_fn(elt) / t.median_ms / 1e6
                row["pct_peak"] = 100 * row["gbps"] / peaks["copy_gbps"]
            if best is not None:
                row["speedup"] = base[best].median_ms / t.median_ms
                if impl.name in pairs:
                    p = pairs[impl.name]
                    row.update(speedup=p.median_ms, speedup_ci=[p.ci_low_ms, p.ci_high_ms], speedup_pairs=p.reps,
                               speedup_noise=p.ci_low_ms <= 1.0 <= p.ci_high_ms)
                elif impl.name != best:
                    lo, hi = ratio_interval(base[best], t)
                    row.update(speedup_ci=[lo, hi], speedup_noise=lo <= 1.0 <= hi)
            row["ratios"] = {n: o.median_ms / t.median_ms for n, o in {**base, **refs}.items() if n != impl.name}
            if impl.name in outs and ref_out is not None:
                row["max_err"] = _max_err(outs[impl.name], ref_out)
        rows.append(row)
    return rows


def ratio_interval(num: Timing, den: Timing) -> tuple[float, float]:
    """Interval of num / den (medians) from the two medians' intervals: (num low / den high,
    num high / den low). When both intervals hold their medians (>= 90% at 95% each) it holds the
    ratio; a ratio whose interval contains 1.0 is not distinguishable from no change."""
    return num.ci_low_ms / den.ci_high_ms, num.ci_high_ms / den.ci_low_ms
