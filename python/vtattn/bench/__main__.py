"""`python -m vtattn.bench` / `vtattn-bench`: time vtattn's ops against the baselines a user
would otherwise pick, on whatever device is present, and print a table per op as it goes (plus
JSON / CSV / plots / a Markdown summary with --out)."""
import argparse
import contextlib
import importlib.util
import os
import re
import signal
import sys
import threading
import time
from types import FrameType
from typing import TYPE_CHECKING, Any, Callable, Iterable, Iterator

import torch

if TYPE_CHECKING:
    from .cases import Case

BACKENDS = ("auto", "aten", "cuda", "triton", "cpp", "torch")  # "auto" = vtattn's own dispatch
MATPLOTLIB_HINT = "pip install 'vtattn[bench]' (or: pip install matplotlib)"


def _shapes(text: str) -> list[str]:
    """argparse type: a comma-separated list of shape names, "custom:..." last (it holds commas)."""
    from .cases import CUSTOM, shape_of

    head, custom, rest = text.partition(CUSTOM)
    names = [x.strip() for x in head.split(",") if x.strip()] + ([custom + rest] if custom else [])
    for name in names:
        try:
            shape_of(name)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e))
    return names


def _names(known: tuple[str, ...]) -> Callable[[str], list[str]]:
    """argparse type: a comma-separated list of names from `known`."""
    def parse(text: str) -> list[str]:
        names = [x.strip() for x in text.split(",") if x.strip()]
        bad = [n for n in names if n not in known]
        if bad:
            raise argparse.ArgumentTypeError(f"unknown {bad}; known: {', '.join(known)}")
        return names
    return parse


def _parser() -> argparse.ArgumentParser:
    from .cases import DTYPES, SHAPES
    from .timing import CPU_BUDGETS

    def pct(kind: str, quick: bool) -> str:
        return f"±{100 * CPU_BUDGETS[kind, quick].target:g}%"

    p = argparse.ArgumentParser(prog="vtattn-bench", description=__doc__, epilog=(
        f"Each row is the median of n samples, with the 95% confidence interval of that median. On CPU the "
        f"samples go on until the interval is within {pct('kernel', False)} of it (--quick {pct('kernel', True)}, "
        f"model rows {pct('model', False)}) or a per-row time cap, and rows that did not get there are marked "
        f"'!'. A speedup whose interval contains 1 reads '~1.0 (noise)'."))
    p.add_argument("--filter", metavar="REGEX", help='keep cases whose "op/case" matches, e.g. "attention/clip"')
    p.add_argument("--quick", action="store_true", help="shorter timing (and smaller shapes on CPU)")
    p.add_argument("--shapes", metavar="NAME[,NAME]", type=_shapes,
                   help=f"subset of {','.join(SHAPES)}, and/or one custom:B=2,Hq=16,Hkv=8,N=1000,D=64,causal=1 "
                        "(last; decode=1 for a decode step against a cache of capacity N)")
    p.add_argument("--dtype", choices=DTYPES, help="default: bf16 on CUDA, fp32 on CPU")
    p.add_argument("--backend", metavar="NAME[,NAME]", type=_names(BACKENDS),
                   help=f"vtattn backends to time, of {','.join(BACKENDS)} (default: auto,cuda,triton on CUDA, "
                        "auto,cpp on CPU)")
    p.add_argument("--device", choices=["cuda", "cpu"], help="default: cuda when present")
    p.add_argument("--threads", metavar="N", type=int,
                   help="CPU: torch threads for the timings (default 1: more threads than idle cores quantise "
                        "the times to the scheduler's ticks on a shared machine; the model rows always use 1)")
    p.add_argument("--out", metavar="DIR",
                   help="write run.json, run.csv, summary.md and PNG plots (when matplotlib is installed) into DIR; "
                        "'auto': bench-out/<device>-<date>-<time>/ (or the resumed run's folder)")
    p.add_argument("--json", metavar="PATH", help="write the run (header and every row's fields) as JSON, "
                                                 "rewritten after every case")
    p.add_argument("--csv", metavar="PATH", help="write the rows as CSV (shape, ratios: JSON in their cell)")
    p.add_argument("--plot", metavar="DIR", help="write PNG plots (speedup vs keep and KV budget, time vs "
                                                 "length, roofline); needs matplotlib")
    p.add_argument("--wide", action="store_true", help="print every field (about 250 columns) in place of the "
                                                       "120-column table")
    p.add_argument("--compare", metavar="OLD.json", help="ratio of each row to the matching row of a recorded run")
    p.add_argument("--time-budget", metavar="SECONDS", type=float,
                   help="start no new case after this long; the run ends as usual (table, files) and "
                        "--resume finishes it later")
    p.add_argument("--resume", metavar="RUN.json",
                   help="continue a run cut short: keep its rows, run only the cases it lacks (same device, "
                        "commit and options), write the union to --json (default: RUN.json)")
    p.add_argument("--emit-dispatch", action="store_true",
                   help="rewrite this GPU architecture's backend order (vtattn/_dispatch_table.py) from the run")
    return p


def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = _parser()
    a = p.parse_args(argv)
    if a.plot and importlib.util.find_spec("matplotlib") is None:
        raise SystemExit(f"vtattn-bench: --plot needs matplotlib: {MATPLOTLIB_HINT}")
    if a.threads is not None and a.threads < 1:
        p.error("--threads must be >= 1")
    return a


def _progress(items: list["Case"]) -> Iterable["Case"]:
    """A tqdm bar on an interactive stderr, else one line per item (readable in logs)."""
    if sys.stderr.isatty():
        try:
            from tqdm import tqdm
            bar: Iterable["Case"] = tqdm(items, file=sys.stderr, unit="case", leave=False)
            return bar
        except ImportError:
            pass

    def lines() -> Iterator["Case"]:
        for i, item in enumerate(items, 1):
            print(f"[{i}/{len(items)}] {item.op}/{item.name}", file=sys.stderr, flush=True)
            yield item
    return lines()


class _Stopped(BaseException):  # not an Exception: a case's error handling must let it through
    pass


@contextlib.contextmanager
def _stop_on_sigterm() -> Iterator[None]:
    """SIGTERM (a time limit's `timeout`) ends the run like a spent --time-budget: the table, the
    files and the unfinished cases are still written."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(signum: int, frame: FrameType | None) -> None:
        raise _Stopped

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _out_dir(a: argparse.Namespace, h: dict[str, Any]) -> str:
    """--out's folder: 'auto' names one after the device and the local time (or takes the resumed
    run's folder)."""
    out: str = a.out
    resume: str | None = a.resume
    if out != "auto":
        return out
    if resume:
        return os.path.dirname(os.path.abspath(resume))
    device = h["device"] if h["device_type"] == "cuda" else f"cpu-{h['device']}"
    slug = re.sub(r"[^a-z0-9]+", "-", device.lower()).strip("-")
    return os.path.join("bench-out", f"{slug}-{time.strftime('%Y%m%d-%H%M%S')}")


def main(argv: list[str] | None = None) -> int:
    a = _parse(argv)
    device = torch.device(a.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    from .timing import cpu_threads

    with cpu_threads(device, a.threads):
        return _run(a, argv, device)


def _run(a: argparse.Namespace, argv: list[str] | None, device: torch.device) -> int:
    from . import report
    from .cases import DTYPE_NAMES, DTYPES, build_cases, default_backends
    from .peak import header, measure_peaks
    from .runner import run_case
    from .timing import CPU_BUDGETS

    dtype = DTYPES[a.dtype or ("bf16" if device.type == "cuda" else "fp32")]
    level = "full" if device.type == "cuda" else ("cpu-quick" if a.quick else "cpu")
    t0 = started = time.perf_counter()
    backends = a.backend or default_backends(device)
    cases = build_cases(device, shapes=a.shapes, backends=backends, level=level)
    if a.filter:
        cases = [c for c in cases if re.search(a.filter, f"{c.op}/{c.name}")]
    h = header(device)
    h.update(dtype=DTYPE_NAMES[dtype], backends=backends, quick=a.quick, scaled=None if level == "full" else level,
             argv=sys.argv[1:] if argv is None else list(argv))
    if device.type == "cpu":
        kernel, model = CPU_BUDGETS["kernel", a.quick], CPU_BUDGETS["model", a.quick]
        h["timing"] = {"target": kernel.target, "max_s": kernel.max_s, "model_target": model.target,
                       "model_max_s": model.max_s}
    out = _out_dir(a, h) if a.out else None
    plots_dir = a.plot or out
    if out:
        os.makedirs(out, exist_ok=True)
        a.json = a.json or os.path.join(out, "run.json")
        a.csv = a.csv or os.path.join(out, "run.csv")
        if importlib.util.find_spec("matplotlib") is None:
            print(f"no plots: matplotlib is not installed ({MATPLOTLIB_HINT})", file=sys.stderr)
            plots_dir = None
    commit = h["git_commit"]
    rows: list[report.Row] = []
    if a.resume:
        h, rows, cases = report.resume(a.resume, h, cases)
        a.json = a.json or a.resume
        t0 -= h.get("elapsed_s", 0)
    else:
        h["peaks"] = measure_peaks(device, dtype, a.quick)
    print(report.format_header(h), flush=True)
    shown = 0

    def show() -> None:  # the table of the rows not printed yet: one section per op, as each op ends
        nonlocal shown
        if len(rows) > shown:
            print("\n" + report.format_table(rows[shown:], wide=a.wide), flush=True)
            shown = len(rows)

    show()
    left: list[Case] = []
    longest = 0.0
    with _stop_on_sigterm():
        for i, case in enumerate(_progress(cases)):
            # no case that would not end within the budget if it took as long as the longest so far
            if a.time_budget is not None and time.perf_counter() - started + longest > a.time_budget:
                left = cases[i:]
                break
            t_case = time.perf_counter()
            try:
                new = run_case(case, device, dtype, h["peaks"], a.quick)
            except _Stopped:
                left = cases[i:]
                print(f"stopped (SIGTERM) in {case.op}/{case.name}", file=sys.stderr)
                break
            longest = max(longest, time.perf_counter() - t_case)
            rows += [{**r, "git_commit": commit} for r in new]
            h["elapsed_s"] = round(time.perf_counter() - t0, 1)
            if a.json:  # after every case: a run cut short still leaves its rows
                report.write_json(a.json, h, rows)
            if i + 1 == len(cases) or cases[i + 1].op != case.op:
                show()
    show()
    h["elapsed_s"] = round(time.perf_counter() - t0, 1)
    h.pop("unfinished", None)  # a resumed run's list is stale now
    if left:
        h["unfinished"] = [f"{c.op}/{c.name}" for c in left]
    if a.json:
        report.write_json(a.json, h, rows)
    print("\n" + report.format_footer(rows, h, len(cases) - len(left)))
    if any(r["op"] in ("vision_tower", "e2e") for r in rows):
        from .scenarios import NOTE
        print("- " + NOTE)
    if left:
        print(f"out of time: {len(left)} cases not run (--resume {a.json or 'RUN.json'} runs them)")
    if a.csv:
        report.write_csv(a.csv, rows)
    plots: list[str] = []
    if plots_dir:
        from .plots import write_all
        plots = write_all(h, rows, plots_dir)
        if a.plot:
            print("plots:", ", ".join(plots) or "none (no matching rows)")
    if a.compare:
        from .compare import compare, format_compare
        print(format_compare(compare(rows, a.compare), a.compare))
    if a.emit_dispatch:
        from .._dispatch_emit import emit
        print(emit({**h, "capability": torch.cuda.get_device_capability(device) if device.type == "cuda" else None},
                   rows))
    if out:
        from .docs import write_summary
        write_summary(os.path.join(out, "summary.md"), {"header": h, "rows": rows}, plots)
        names = [os.path.basename(f) for f in (a.json, a.csv)] + ["summary.md"]
        print(f"\nresults: {out}/ ({', '.join(names)}{f', {len(plots)} PNG plots' if plots else ''})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
