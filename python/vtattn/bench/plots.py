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


def speedup_vs_keep(header, rows, path):
    """End-to-end scenarios: speedup over the unpatched model at each keep ratio."""
    lines = defaultdict(list)
    for r in rows:
        m = re.fullmatch(r"keep-([\d.]+)", r["backend"])
        if m and r["speedup"] is not None:
            lines[f"{r['op']}/{r['case']}"].append((float(m.group(1)), r["speedup"]))
    if not lines:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for label, pts in sorted(lines.items()):
        xs, ys = zip(*sorted(pts))
        ax.plot(xs, ys, "o-", label=label)
    ax.axhline(1.0, color="grey", lw=0.8, ls="--")
    ax.set_xscale("log")
    ax.set_xticks([0.05, 0.1, 0.25, 0.5, 1.0], labels=["0.05", "0.1", "0.25", "0.5", "1.0"])
    ax.invert_xaxis()
    ax.set(xlabel="keep ratio (visual tokens kept)", ylabel="speedup vs unpatched model (x)",
           title=_title(header, "Time to first token: speedup vs keep (random weights)"))
    ax.legend(fontsize=8)
    return _save(fig, path)


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


PLOTS = {"speedup_vs_keep.png": speedup_vs_keep, "time_vs_length.png": time_vs_length,
         "roofline.png": roofline}


def write_all(header, rows, out_dir) -> list:
    """The plots this run has rows for; returns their paths."""
    os.makedirs(out_dir, exist_ok=True)
    paths = [fn(header, rows, os.path.join(out_dir, name)) for name, fn in PLOTS.items()]
    return [p for p in paths if p]
