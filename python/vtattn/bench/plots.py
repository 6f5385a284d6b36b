"""PNG plots of a run (`--plot DIR`, or from a recorded JSON: `vtattn.bench.docs`)."""
import os
import re
from collections import defaultdict

ELT = {"bf16": 2, "fp16": 2, "fp32": 4}


def _plt():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _title(header, what):
    scaled = f" (CPU, scaled down: {header['scaled']})" if header.get("scaled") else ""
    return f"{what}\n{header['device']}{scaled}"


def _e2e_speedups(rows, variant):
    """{metric: {"scenario Bn": [(x, speedup)]}} over the e2e rows whose backend fullmatches
    `variant` (x = its one number), metric "ttft" or "decode" from the case name."""
    out = defaultdict(lambda: defaultdict(list))
    for r in rows:
        v = re.fullmatch(variant, r["backend"])
        c = re.fullmatch(r"(.+)-(ttft|decode):(B\d+)", r["case"])
        if r["op"] == "e2e" and v and c and r["speedup"] is not None:
            out[c[2]][f"{c[1]} {c[3]}"].append((float(v[1]), r["speedup"]))
    return out


def _speedup_panels(header, lines, xticks, xlabel, what, path, points=None):
    """One panel per metric (time to first token, decode): a line per scenario (colour) and batch
    (B1 solid, the larger dashed), and optionally single points (FastV) as crosses in its colour."""
    metrics = [m for m in ("ttft", "decode") if m in lines]
    if not metrics:
        return None
    plt = _plt()
    fig, axes = plt.subplots(1, len(metrics), figsize=(6.5 * len(metrics), 4.8), squeeze=False)
    scenarios = sorted({label.split()[0] for m in metrics for label in lines[m]})
    for ax, metric in zip(axes[0], metrics):
        for label, pts in sorted(lines[metric].items()):
            scenario, batch = label.split()
            style = dict(color=f"C{scenarios.index(scenario)}", ls="-" if batch == "B1" else "--")
            xs, ys = zip(*sorted(pts))
            ax.plot(xs, ys, marker="o", label=label, **style)
            for x, y in (points or {}).get(metric, {}).get(label, []):
                ax.plot([x], [y], "x", color=style["color"], ms=9, mew=2)
        ax.axhline(1.0, color="grey", lw=0.8, ls="--")
        ax.set_xscale("log")
        ax.set_xticks(xticks, labels=[str(x) for x in xticks])
        ax.invert_xaxis()
        ax.set(xlabel=xlabel, ylabel="speedup vs unpatched model (x)",
               title="time to first token" if metric == "ttft" else "decode steps")
        ax.legend(fontsize=7)
    fig.suptitle(_title(header, what), fontsize=10)
    return _save(fig, path)


def speedup_vs_keep(header, rows, path):
    """End-to-end scenarios: speedup over the unpatched model at each keep ratio; FastV crosses."""
    return _speedup_panels(header, _e2e_speedups(rows, r"keep-([\d.]+)"), [0.05, 0.1, 0.25, 0.5, 1.0],
                           "keep ratio (visual tokens kept)", "Speedup vs keep (random weights; x: FastV)", path,
                           points=_e2e_speedups(rows, r"fastv-([\d.]+)"))


def speedup_vs_kv_budget(header, rows, path):
    """End-to-end scenarios: speedup over the unpatched model at each LOOK-M KV budget."""
    return _speedup_panels(header, _e2e_speedups(rows, r"lookm-([\d.]+)"), [0.1, 0.2, 0.5, 1.0],
                           "KV budget (share of the prompt's cache kept)", "Speedup vs KV budget (LOOK-M, random "
                           "weights)", path)


def time_vs_length(header, rows, path):
    """Attention-like ops: median time at each shape's sequence length, one line per backend."""
    ops = [op for op in ("attention", "key_importance") if any(r["op"] == op for r in rows)]
    series = defaultdict(list)
    for r in rows:
        if r["op"] in ops and r["median_ms"] is not None and "N" in r["shape"]:
            rows_ = r["shape"].get("rows")  # key_importance: one score row ("0" / "last") or all
            panel = r["op"] + ("" if rows_ is None else " rows=all" if rows_ == "all" else " one row")
            series[(panel, r["backend"])].append((r["shape"]["N"], r["median_ms"]))
    panels = sorted({op for op, _ in series})
    if not panels:
        return None
    plt = _plt()
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4.5), squeeze=False)
    for ax, panel in zip(axes[0], panels):
        for (op, backend), pts in sorted(series.items()):
            if op == panel:
                xs, ys = zip(*sorted(pts))
                ax.plot(xs, ys, "o-", label=backend)
        ax.set(xscale="log", yscale="log", xlabel="sequence length N", ylabel="median ms", title=panel)
        ax.legend(fontsize=7)
    fig.suptitle(_title(header, "Time vs sequence length (each point one benchmark shape)"), fontsize=10)
    return _save(fig, path)


def _io_bytes(r):
    """Compulsory traffic: inputs read once and the output written once."""
    s, elt = r["shape"], ELT[r["dtype"]]
    qkv = s["B"] * s["N"] * s["D"] * elt
    if r["op"] == "attention":
        return qkv * (2 * s["Hq"] + 2 * s["Hkv"])
    if r["op"] == "key_importance":
        return qkv * (s["Hq"] + 2 * s["Hkv"]) + s["B"] * s["Hq"] * s["N"] * 4
    return None


def roofline(header, rows, path):
    """vtattn kernels with a FLOP count, at their arithmetic intensity (FLOPs / compulsory bytes),
    under the run's measured copy-bandwidth and matmul ceilings."""
    peaks = header["peaks"]
    pts = []
    for r in rows:
        if r["role"] == "vtattn" and r["tflops"] is not None and (b := _io_bytes(r)):
            pts.append((r["tflops"] * r["median_ms"] * 1e9 / b, r["tflops"], f"{r['op']} {r['case']} {r['backend']}"))
    if not pts:
        return None
    plt = _plt()
    bw, top = peaks["copy_gbps"] / 1e3, peaks["matmul_tflops"]  # TB/s, TFLOP/s
    ridge = top / bw  # FLOP/byte where the two ceilings meet
    xs = [min(p[0] for p in pts + [(ridge,)]) / 4, ridge, max(p[0] for p in pts + [(ridge,)]) * 4]
    fig, ax = plt.subplots(figsize=(7.5, 5))
    ax.plot(xs, [min(x * bw, top) for x in xs], "k-", lw=1.5,
            label=f"measured ceilings: copy {peaks['copy_gbps']:.0f} GB/s, matmul {top:.3g} TFLOP/s")
    for x, y, label in pts:
        ax.plot(x, y, "o")
        ax.annotate(label, (x, y), fontsize=6, xytext=(3, 3), textcoords="offset points")
    ax.set(xscale="log", yscale="log", xlabel="arithmetic intensity (FLOP / byte)", ylabel="TFLOP/s",
           title=_title(header, "Roofline (vtattn kernels)"))
    ax.legend(fontsize=8, loc="best")
    return _save(fig, path)


def _save(fig, path):
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    _plt().close(fig)
    return path


PLOTS = {"speedup_vs_keep.png": speedup_vs_keep, "speedup_vs_kv_budget.png": speedup_vs_kv_budget,
         "time_vs_length.png": time_vs_length,
         "roofline.png": roofline}


def write_all(header, rows, out_dir) -> list:
    """The plots this run has rows for; returns their paths."""
    os.makedirs(out_dir, exist_ok=True)
    paths = [fn(header, rows, os.path.join(out_dir, name)) for name, fn in PLOTS.items()]
    return [p for p in paths if p]
