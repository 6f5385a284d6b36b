"""Per-kernel verdict of a scripts/gpu_check.sh call, from the files it wrote to OUTDIR:
    python scripts/gpu_summary.py OUTDIR
PASSED / FAILED / NOT REACHED (its step ran out of time, or never started) / SKIPPED (no GPU: a dry
run) for each op's CUDA and Triton kernel, from scripts/gpu_kernels.py's records (kernels.jsonl) and
the CUDA-backend pytest cases (pytest_cuda.xml, into which it merges pytest_models.xml and
pytest_compiled.xml); then each sanitizer's verdict (sanitizer.log). It also merges the bench passes
(bench_*.json) into bench.json, so the call returns at most 8 files."""
import argparse
import json
import re
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

CUDA_OPS = ("attention", "key_importance", "select_tokens", "gather_tokens", "merge_tokens", "varlen_attention",
            "index_attention", "decode_attention", "block_sparse_attention", "paged_decode_attention", "paged_append",
            "paged_decode_step")
TRITON_OPS = CUDA_OPS + ("group_attention", "paged_evict", "paged_evict_step", "cmai_step")


def _steps(summary: str) -> dict:
    """step name -> its line in summary.txt ("exit 0 in 12s", "not reached (...)", ...)."""
    return {m.group(1): m.group(2) for m in re.finditer(r"^(\w+): (.*)$", summary, re.M)}


def _kernel_records(path: Path) -> dict:
    out = {}
    if path.exists():
        for line in path.read_text().splitlines():
            r = json.loads(line)
            out.setdefault((r["backend"], r["op"]), []).append(r)
    return out


def _pytest_cases(path: Path) -> dict:
    """op -> {"passed": n, "failed": n, "skipped": n} of the gpu-cuda pytest cases, by test file."""
    out = {}
    if not path.exists():
        return out
    try:
        root = ET.parse(path).getroot()
    except ET.ParseError:  # a run cut while writing it
        return out
    for case in root.iter("testcase"):
        op = case.get("classname", "").rsplit(".", 1)[-1].removeprefix("test_")
        kind = "failed" if case.find("failure") is not None or case.find("error") is not None else \
            "skipped" if case.find("skipped") is not None else "passed"
        counts = out.setdefault(op, {"passed": 0, "failed": 0, "skipped": 0, "names": []})
        counts[kind] += 1
        if kind == "failed":
            counts["names"].append(case.get("name"))
    return out


def _verdict(records, pytest, step_lines) -> str:
    """One kernel's verdict from its gpu_kernels records, pytest counts and its steps' summary lines."""
    status = [r["status"] for r in records]
    bad = [r for r in records if r["status"] in ("fail", "error")]
    tests = pytest or {}
    detail = f"gpu_kernels {status.count('pass')}/{len(status)}"
    if tests:
        detail += f", pytest {tests['passed']} passed {tests['failed']} failed {tests['skipped']} skipped"
    if bad or tests.get("failed"):
        first = f": {bad[0]['case']}: {bad[0]['detail']}" if bad else ""
        return f"FAILED ({detail}){first}"
    if status and all(s == "skip" for s in status):
        return f"SKIPPED ({records[0].get('detail')})"
    if status.count("pass"):
        return f"PASSED ({detail})"
    cut = [f"{name}: {line}" for name, line in step_lines if any(w in line for w in ("not reached", "cut", "partial"))]
    return f"NOT REACHED ({'; '.join(cut) or 'no result recorded'})"


def merge_pytest(out: Path) -> None:
    """pytest_models.xml's and pytest_compiled.xml's cases into pytest_cuda.xml (the call returns at
    most 8 files)."""
    for name in ("pytest_models.xml", "pytest_compiled.xml"):
        part = out / name
        if not part.exists():
            continue
        try:
            extra = ET.parse(part).getroot()
        except ET.ParseError:  # a run cut while writing it: its cases are in tests.log
            part.unlink()
            continue
        cuda = out / "pytest_cuda.xml"
        try:
            root = ET.parse(cuda).getroot()
        except (ET.ParseError, FileNotFoundError):
            root = ET.Element("testsuites")
        root.extend(extra.iter("testsuite") if extra.tag == "testsuites" else [extra])
        ET.ElementTree(root).write(cuda)
        part.unlink()


def kernels(out: Path) -> list[str]:
    merge_pytest(out)
    steps = _steps((out / "summary.txt").read_text() if (out / "summary.txt").exists() else "")
    records = _kernel_records(out / "kernels.jsonl")
    pytest = _pytest_cases(out / "pytest_cuda.xml")
    lines = ["per kernel (gpu_kernels.py edge cases; CUDA also the gpu-cuda pytest cases):"]
    cuda_steps = ("cuda_kernels", "pytest_cuda", "pytest_models", "pytest_compiled")
    for backend, ops, step_names in (("cuda", CUDA_OPS, cuda_steps), ("triton", TRITON_OPS, ("triton_kernels",))):
        seen = sorted(op for b, op in records if b == backend and op not in ops)  # ops added since these lists
        for op in ops + tuple(seen):
            step_lines = [(n, steps[n]) for n in step_names if n in steps]
            verdict = _verdict(records.get((backend, op), []), pytest.get(op) if backend == "cuda" else None,
                               step_lines)
            lines.append(f"  {backend:6} {op:24} {verdict}")
    for name, c in sorted(pytest.items()):  # gpu tests of no single op (launch limits, dispatch)
        if name not in CUDA_OPS:
            failed = f": {', '.join(c['names'][:5])}" if c["names"] else ""
            lines.append(f"  tests  {name:24} {c['passed']} passed, {c['failed']} failed{failed}")
    return lines


def sanitizers(out: Path) -> list[str]:
    log = out / "sanitizer.log"
    if not log.exists():
        return ["sanitizers: no log (not run: see the step lines above)"]
    lines = []
    for part in re.split(r"^== ", log.read_text(), flags=re.M)[1:]:
        tool = re.search(r"--tool (\w+)", part)
        name = tool.group(1) if tool else "?"
        summary = re.findall(r"ERROR SUMMARY: (\d+) error", part)
        # "=========     at <function>..." (formats differ by version): the first name before < or (
        kernels = sorted({m.group(1) for line in re.findall(r"^=+\s+at (.*)$", part, re.M)
                          for m in [re.search(r"(\w+)\s*[<(]", line)] if m})
        if "Device not supported" in part or "error 999" in part:
            lines.append(f"  {name}: refused by the device (sandbox?)")
        elif summary:
            n = int(summary[-1])
            lines.append(f"  {name}: " + ("clean" if n == 0 else f"{n} errors in {kernels or '?'}"))
        else:
            seen = f"; errors in {kernels}" if kernels else ""
            lines.append(f"  {name}: no error summary (cut before the end){seen}")
    return ["sanitizers (one launch of each CUDA kernel, bf16):"] + lines


def merge_bench(out: Path) -> str:
    parts = sorted(out.glob("bench_*.json"), key=lambda p: ("ops", "triton", "e2e").index(p.stem[6:])
                   if p.stem[6:] in ("ops", "triton", "e2e") else 9)
    if not parts:
        return "bench: no rows (not reached)"
    runs = []
    for p in parts:
        try:
            runs.append((p.stem[6:], json.loads(p.read_text())))
        except json.JSONDecodeError:
            continue
    if not runs:
        return "bench: unreadable"
    header = dict(runs[0][1]["header"])
    header["passes"] = [{"pass": name, "backends": run["header"].get("backends"), "rows": len(run["rows"]),
                         "unfinished": run["header"].get("unfinished", [])} for name, run in runs]
    rows = [r for _, run in runs for r in run["rows"]]
    (out / "bench.json").write_text(json.dumps({"header": header, "rows": rows}, indent=1, default=str))
    for p in parts:
        p.unlink()
    left = sum(len(p["unfinished"]) for p in header["passes"])
    return f"bench: {len(rows)} rows in {len(runs)} passes, {left} cases not run for time (bench.json)"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out", type=Path)
    p.add_argument("--limit", type=int, help="the call's time limit (seconds), for the record")
    a = p.parse_args(argv)
    print("\n".join(kernels(a.out) + sanitizers(a.out) + [merge_bench(a.out)]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
