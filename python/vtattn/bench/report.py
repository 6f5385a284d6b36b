"""Output: an aligned table for people, JSON and CSV for tools."""
import csv
import json


def _fmt(v, spec):
    return "-" if v is None else format(v, spec)


def _rate(r):
    if r.get("tok_s") is not None:  # e2e decode rows
        return f"{r['tok_s']:.3g} tok/s"
    if r["tflops"] is not None:
        return f"{r['tflops']:.3g} TFLOP/s" if r["tflops"] >= 1 else f"{r['tflops'] * 1e3:.3g} GFLOP/s"
    if r["gbps"] is not None:
        return f"{r['gbps']:.3g} GB/s" if r["gbps"] >= 1 else f"{r['gbps'] * 1e3:.3g} MB/s"
    return "-"


def format_header(h: dict) -> str:
    p = h.get("peaks", {})
    lines = [f"device: {h['device']}" + (f" | driver {h['driver']}" if h.get("driver") else ""),
             f"torch {h['torch']} | triton {h['triton']} | CUDA {h['cuda']} | python {h['python']}"
             f" | vtattn {h['vtattn']} ({h['git_commit']})"]
    if h.get("clocks_mhz"):
        lines.append(f"clocks MHz ({h['clocks_fields']}): {h['clocks_mhz']}")
    if p:
        lines.append(f"measured peaks: copy {p['copy_gbps']:.1f} GB/s, {p['matmul_dtype']} matmul "
                     f"{p['matmul_shape']} {p['matmul_tflops']:.2f} TFLOP/s")
    if h.get("scaled"):
        lines.append(f"CPU: shapes scaled down ({h['scaled']}); timings are not comparable to GPU runs")
    return "\n".join(lines)


def format_table(rows) -> str:
    cols = ["op", "case", "dtype", "backend", "median ms", "p20-p80 ms", "rate", "% peak", "vs", "speedup x",
            "note"]
    body = []
    for r in rows:
        spread = "-" if r["p20_ms"] is None else f"{r['p20_ms']:.3f}-{r['p80_ms']:.3f}"
        note = r["note"] or ("" if r["max_err"] is None else f"max err {r['max_err']:.2g}")
        body.append([r["op"], r["case"], r["dtype"], r["backend"], _fmt(r["median_ms"], ".3f"), spread, _rate(r),
                     _fmt(r["pct_peak"], ".3g"), r["baseline"] or "-", _fmt(r["speedup"], ".2f"), note[:80]])
    widths = [max(len(str(x)) for x in col) for col in zip(cols, *body)]
    right = {4, 5, 6, 7, 9}
    line = lambda cells: "  ".join(str(c).rjust(w) if i in right else str(c).ljust(w)
                                   for i, (c, w) in enumerate(zip(cells, widths))).rstrip()
    out = [line(cols), line(["-" * w for w in widths])]
    prev = None
    for r, cells in zip(rows, body):
        if prev is not None and (r["op"], r["case"]) != prev:
            out.append("")
        prev = (r["op"], r["case"])
        out.append(line(cells))
    return "\n".join(out)


def write_json(path, header, rows):
    with open(path, "w") as f:
        json.dump({"header": header, "rows": rows}, f, indent=1, default=str)


def write_csv(path, rows):
    flat = [{**r, "shape": json.dumps(r["shape"]), "ratios": json.dumps(r["ratios"])} for r in rows]
    fields = list(dict.fromkeys(k for r in flat for k in r)) or ["op"]  # model rows add their own fields
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        w.writerows(flat)


def resume(path, header, cases):
    """(header, rows, cases still to run) to continue the run recorded at `path`: its header (measured
    peaks included) and rows are kept, and the cases it has rows for are dropped. A run of another
    device, torch, dtype, backend set or timing level cannot be continued: its rows would not
    compare (--filter and --shapes may differ: they choose what still runs). The commit may
    have moved on (a device session is short): each row keeps the commit it was measured at."""
    with open(path) as f:
        run = json.load(f)
    old = run["header"]
    for k in ("device", "torch", "triton", "dtype", "backends", "quick", "scaled"):
        if old.get(k) != header.get(k):
            raise SystemExit(f"--resume {path}: its {k} is {old.get(k)!r}, this run's is {header.get(k)!r}")
    old.setdefault("resumed", []).append({k: header[k] for k in ("date", "argv", "git_commit")})
    done = {(r["op"], r["case"]) for r in run["rows"]}
    return old, run["rows"], [c for c in cases if (c.op, c.name) not in done]
