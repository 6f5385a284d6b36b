"""Rewrite the dispatch table (vtattn/_dispatch_table.py) from a benchmark run: per op, the vtattn
backends the run timed, fastest first, on the run's CUDA architecture.
    python -m vtattn.bench --emit-dispatch ...        (after the run, from its rows)
    python -m vtattn._dispatch_emit RUN.json [...]    (from recorded runs, e.g. a lent GPU's bench.json)
A backend's speed on an op is the geometric mean over the op's cases of its median time over the
fastest timed backend's; backends the run did not time keep their places. The reference stays
last. Only the run's architecture row changes."""
import argparse
import json
import math
import pprint
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from . import _dispatch_table

TABLE = Path(_dispatch_table.__file__)
# Architectures of device names a run header records (headers before capability was recorded).
_ARCH_BY_NAME = (("H100", "sm_90"), ("H200", "sm_90"), ("H20", "sm_90"), ("GH200", "sm_90"), ("A100", "sm_80"),
                 ("A800", "sm_80"), ("A30", "sm_80"), ("L40", "sm_89"), ("L4", "sm_89"), ("RTX 40", "sm_89"),
                 ("A40", "sm_86"), ("A10", "sm_86"), ("RTX 30", "sm_86"))
_VTATTN_BACKENDS = ("aten", "cuda", "triton", "cpp", "torch")
# The tables' annotations, written with them (mypy checks the module).
_ORDER_TYPE = "dict[str, dict[str, tuple[str, ...]]]"
_SOURCE_TYPE = "dict[str, dict[str, object]]"


def arch_of(header: dict[str, Any]) -> str | None:
    """The CUDA architecture a run's header names ("sm_90"), or None (a CPU run, an unknown GPU)."""
    if header.get("device_type") != "cuda":
        return None
    if header.get("capability"):
        return "sm_" + "".join(str(x) for x in header["capability"])
    name = header.get("device") or ""
    return next((arch for key, arch in _ARCH_BY_NAME if key in name), None)


def ranking(rows: list[dict[str, Any]]) -> dict[str, list[str]]:
    """op -> the backends timed on it, fastest first (see the module docstring)."""
    cases: dict[str, dict[str, dict[str, float]]] = {}
    for r in rows:
        if r.get("role") == "vtattn" and r.get("backend") in _VTATTN_BACKENDS and r.get("median_ms"):
            case = json.dumps([r["case"], r.get("shape"), r.get("dtype")], sort_keys=True, default=str)
            cases.setdefault(r["op"], {}).setdefault(case, {})[r["backend"]] = r["median_ms"]
    out: dict[str, list[str]] = {}
    for op, by_case in cases.items():
        logs: dict[str, list[float]] = {}
        for times in by_case.values():
            best = min(times.values())
            for backend, ms in times.items():
                logs.setdefault(backend, []).append(math.log(ms / best))
        out[op] = sorted(logs, key=lambda b: (sum(logs[b]) / len(logs[b]), b))
    return out


def reorder(default: tuple[str, ...], timed: list[str]) -> tuple[str, ...]:
    """`default` with the timed backends put in `timed`'s order on the places they held."""
    slots = iter(b for b in timed if b in default and b != "torch")
    out = [next(slots) if b in timed and b != "torch" else b for b in default]
    return tuple(b for b in out if b != "torch") + ("torch",)


def emit(header: dict[str, Any], rows: list[dict[str, Any]], path: Path = TABLE) -> str:
    """Rewrite the table's row for the run's architecture; returns a one-line summary."""
    arch = arch_of(header)
    if arch is None:
        return f"--emit-dispatch: not a run on a known CUDA architecture ({header.get('device')}): table unchanged"
    from . import _dispatch
    order = {op: reorder(_dispatch.order(op, "cuda"), timed) for op, timed in sorted(ranking(rows).items())}
    table = {k: dict(v) for k, v in _dispatch_table.ORDER.items()}
    table[arch] = order
    source = dict(_dispatch_table.SOURCE)
    source[arch] = {"device": header.get("device"), "commit": header.get("git_commit"), "date": header.get("date"),
                    "cases": len({(r["op"], r["case"]) for r in rows})}
    text = TABLE.read_text()
    head = text[:text.index("\nORDER") + 1]
    path.write_text(f"{head}ORDER: {_ORDER_TYPE} = {pprint.pformat(table, width=110, sort_dicts=True)}\n\n"
                    "# Where each architecture's rows came from: {\"sm_90\": {\"device\": ..., \"commit\": ..., "
                    "\"date\": ..., \"cases\": ...}}.\n"
                    f"SOURCE: {_SOURCE_TYPE} = {pprint.pformat(source, width=110, sort_dicts=True)}\n")
    return f"--emit-dispatch: {path} row {arch} rewritten for {len(order)} ops from {header.get('device')}"


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m vtattn._dispatch_emit", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", type=Path, help="bench --json files of one device")
    a = p.parse_args(argv)
    header: dict[str, Any] = {}
    rows: list[dict[str, Any]] = []
    for run in a.runs:
        data = json.loads(run.read_text())
        header = header or data["header"]
        rows += data["rows"]
    print(emit(header, rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
