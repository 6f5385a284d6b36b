"""PNG plots of a run (`--plot DIR` / `--out DIR`, or from a recorded JSON: `vtattn.bench.docs`).

Conventions: one colour per batch size (speedup plots) or per backend (kernel plots); markers are
named in each figure's legend, which sits outside the axes; points of different shapes are never
joined by a line; error bars are the 95% intervals of the run (speedup: of the ratio), and a hollow
marker is a speedup whose interval contains 1 (noise)."""
import math
import os
import re
from collections import defaultdict
from typing import Any, Callable, Sequence

from .report import Header, Row

Points = dict[tuple[str, str, int], list[tuple[float, Row]]]  # (scenario, metric, batch) -> [(x, row)]
ELT = {"bf16": 2, "fp16": 2, "fp32": 4}
MARKERS = "osD^vP*Xh<>p"


def _plt() -> Any:  # matplotlib.pyplot (matplotlib is not followed: Any)
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _title(header: Header, what: str) -> str:
    scaled = f" (CPU, scaled down: {header['scaled']})" if header.get("scaled") else ""
    return f"{what}\n{header['device']}{scaled}"


def _e2e_points(rows: list[Row], variant: str) -> Points:
    """{(scenario, metric, batch): [(x, row)]} over the timed e2e rows whose backend fullmatches
    `variant` (x = its one number); metric "ttft" or "decode" and batch "B<n>" from the case name."""
    out: Points = defaultdict(list)
    for r in rows:
        v = re.fullmatch(variant, r["backend"])
        c = re.fullmatch(r"(.+)-(ttft|decode):B(\d+)", r["case"])
        if r["op"] == "e2e" and v and c and r.get("speedup") is not None:
            out[c[1], c[2], int(c[3])].append((float(v[1]), r))
    return out


def _errorbar(ax: Any, xs: list[float], rs: list[Row], color: str, marker: str, ms: int = 6, line: bool = True) -> None:
    """Speedups with their intervals; hollow markers for those within noise."""
    ys = [r["speedup"] for r in rs]
    lo = [y - (r.get("speedup_ci") or [y, y])[0] for y, r in zip(ys, rs)]
    hi = [(r.get("speedup_ci") or [y, y])[1] - y for y, r in zip(ys, rs)]
    if line:
        ax.plot(xs, ys, "-", color=color, lw=1, alpha=0.6)
    ax.errorbar(xs, ys, yerr=[lo, hi], fmt="none", ecolor=color, elinewidth=0.8, capsize=2)
    for x, y, r in zip(xs, ys, rs):
        face = "white" if r.get("speedup_noise") else color
        ax.plot([x], [y], marker, color=color, mfc=face, ms=ms, mew=1.5)


def _speedup_grid(header: Header, rows: list[Row], variant: str, xticks: list[float], xlabel: str, what: str, path: str,
                  extra: tuple[str, str] | None = None, kv_row: bool = False) -> str | None:
    """A panel per (metric, scenario): rows time to first token and decode steps (and KV MiB),
    columns the scenarios; one colour per batch; `extra` (a backend pattern, e.g. FastV) as its
    own labelled marker."""
    pts = _e2e_points(rows, variant)
    if not pts:
        return None
    extra_pts: Points = _e2e_points(rows, extra[0]) if extra else {}
    scenarios = list(dict.fromkeys(s for s, _, _ in pts))
    metrics = [m for m in ("ttft", "decode") if any(k[1] == m for k in pts)]
    batches = sorted({b for _, _, b in pts})
    colour = {b: f"C{i}" for i, b in enumerate(batches)}
    panels = metrics + (["kv"] if kv_row else [])
    plt = _plt()
    fig, axes = plt.subplots(len(panels), len(scenarios), figsize=(2.9 * len(scenarios) + 0.8, 2.5 * len(panels) + 1.2),
                             squeeze=False, sharex=True, sharey="row")
    for j, scenario in enumerate(scenarios):
        for i, metric in enumerate(panels):
            ax = axes[i][j]
            for b in batches:
                if metric == "kv":
                    _kv_line(ax, rows, scenario, b, pts, colour[b])
                    continue
                series = sorted(pts.get((scenario, metric, b), []), key=lambda p: -p[0])
                if series:
                    _errorbar(ax, [x for x, _ in series], [r for _, r in series], colour[b], "o")
                for x, r in extra_pts.get((scenario, metric, b), []):  # beside its x: never on a keep point
                    _errorbar(ax, [x * 0.85], [r], colour[b], "X", ms=8, line=False)
            if not ax.get_lines():
                ax.text(0.5, 0.5, "no rows in this run", transform=ax.transAxes, ha="center", color="grey", fontsize=8)
            elif metric != "kv":
                ax.axhline(1.0, color="grey", lw=0.8, ls="--")
            ax.set_xscale("log")
            ax.set_xticks(xticks, labels=[f"{x:g}" for x in xticks])
            ax.minorticks_off()
            if i == 0:
                ax.set_title(scenario, fontsize=9)
            if j == 0:
                ax.set_ylabel({"ttft": "speedup, time to\nfirst token (x)", "decode": "speedup, decode\nsteps (x)",
                               "kv": "KV cache MiB\n(after prefill)"}[metric], fontsize=8)
            if i == len(panels) - 1 and j == len(scenarios) // 2:
                ax.set_xlabel(xlabel, fontsize=9)
            ax.tick_params(labelsize=7)
    axes[0][0].invert_xaxis()  # shared: all of them; the kept share falls left to right
    handles = [plt.Line2D([], [], color=colour[b], marker="o", ls="-", label=_batch_label(b, pts)) for b in batches]
    handles.append(plt.Line2D([], [], color="grey", marker="o", mfc="white", ls="none",
                              label="hollow: interval contains 1 (noise)"))
    if extra:
        handles.append(plt.Line2D([], [], color="black", marker="X", ls="none", ms=8, label=extra[1]))
    if kv_row:
        handles.append(plt.Line2D([], [], color="grey", ls=":", label="KV MiB of the unpatched model"))
    fig.suptitle(_title(header, what), fontsize=10)
    _legend_below(fig, handles)
    return _save(fig, path)


def _batch_label(b: int, pts: Points) -> str:
    """'batch 8', or 'batch 8 (runs at 2)' where the run scaled it down (CPU)."""
    ran = {r["shape"]["B"] for (_, _, bb), ps in pts.items() if bb == b for _, r in ps}
    return f"batch {b}" if ran == {b} else f"batch {b} (runs at {', '.join(map(str, sorted(ran)))})"


def _kv_line(ax: Any, rows: list[Row], scenario: str, b: int, pts: Points, color: str) -> None:
    """KV MiB after the prefill at each budget (the ttft rows), and the unpatched model's as a
    dotted line."""
    series = sorted(pts.get((scenario, "ttft", b), []), key=lambda p: -p[0])
    kv = [(x, r["kv_bytes"] / 2**20) for x, r in series if r.get("kv_bytes")]
    if kv:
        ax.plot([x for x, _ in kv], [y for _, y in kv], "o-", color=color, lw=1, ms=5)
    base = next((r for r in rows if r["op"] == "e2e" and r["case"] == f"{scenario}-ttft:B{b}"
                 and r.get("role") == "baseline" and r.get("kv_bytes")), None)
    if base:
        ax.axhline(base["kv_bytes"] / 2**20, color=color, lw=1, ls=":")


def speedup_vs_keep(header: Header, rows: list[Row], path: str) -> str | None:
    """End-to-end scenarios: speedup over the unpatched model at each keep ratio; FastV as X."""
    return _speedup_grid(header, rows, r"keep-([\d.]+)", [0.05, 0.1, 0.25, 0.5, 1.0],
                         "keep ratio (visual tokens kept)", "Speedup vs keep (random weights)", path,
                         extra=(r"fastv-([\d.]+)", "FastV (keep 0.25 after layer 2)"))


def speedup_vs_kv_budget(header: Header, rows: list[Row], path: str) -> str | None:
    """End-to-end scenarios: speedup over the unpatched model at each LOOK-M KV budget, and the KV
    memory it leaves."""
    return _speedup_grid(header, rows, r"lookm-([\d.]+)", [0.1, 0.2, 0.5, 1.0],
                         "KV budget (share of the prompt's cache kept)", "Speedup and KV memory vs KV budget "
                         "(LOOK-M, random weights)", path, kv_row=True)


def _shape_label(r: Row) -> str:
    s = r["shape"]
    return f"{r['case'].split(':')[0]}\nN={s['N']} B={s['B']}"


def time_vs_length(header: Header, rows: list[Row], path: str) -> str | None:
    """Attention-like ops: median time of each shape, the shapes in order of sequence length as
    categories (each is its own model: B, heads and D differ too, so no line joins them), a marker
    per backend, dodged sideways so none hides another."""
    ops = [op for op in ("attention", "key_importance") if any(r["op"] == op for r in rows)]
    series: dict[tuple[str, str], list[Row]] = defaultdict(list)
    for r in rows:
        if r["op"] in ops and r.get("median_ms") is not None and "N" in r["shape"]:
            rows_ = r["shape"].get("rows")  # key_importance: one score row ("0" / "last") or all
            panel = r["op"] + ("" if rows_ is None else " rows=all" if rows_ == "all" else " one row")
            series[panel, r["backend"]].append(r)
    panels = sorted({p for p, _ in series})
    if not panels:
        return None
    backends = list(dict.fromkeys(b for _, b in series))
    style = {b: (f"C{i % 10}", MARKERS[i % len(MARKERS)]) for i, b in enumerate(backends)}
    plt = _plt()
    fig, axes = plt.subplots(1, len(panels), figsize=(4.8 * len(panels), 4.6), squeeze=False)
    for ax, panel in zip(axes[0], panels):
        mine = [b for b in backends if (panel, b) in series]
        shapes = sorted({(r["shape"]["N"], _shape_label(r)) for b in mine for r in series[panel, b]})
        where = {label: i for i, (_, label) in enumerate(shapes)}
        for k, b in enumerate(mine):
            color, marker = style[b]
            dx = 0.12 * (k - (len(mine) - 1) / 2)
            for r in series[panel, b]:
                lo, hi = r.get("ci_low_ms"), r.get("ci_high_ms")
                err = None if lo is None else [[r["median_ms"] - lo], [hi - r["median_ms"]]]
                ax.errorbar([where[_shape_label(r)] + dx], [r["median_ms"]], yerr=err, fmt=marker, color=color, ms=6,
                            capsize=2)
        ax.set(yscale="log", ylabel="median ms", title=panel, xlim=(-0.6, len(shapes) - 0.4))
        ax.set_xticks(range(len(shapes)), labels=[label for _, label in shapes], fontsize=7)
        ax.grid(axis="y", which="major", lw=0.4, alpha=0.5)
    handles = [plt.Line2D([], [], color=style[b][0], marker=style[b][1], ls="none", label=b) for b in backends]
    fig.suptitle(_title(header, "Median time per benchmark shape (bars: 95% interval)"), fontsize=10)
    _legend_below(fig, handles)
    return _save(fig, path)


def _io_bytes(r: Row) -> int | None:
    """Compulsory traffic: inputs read once and the output written once."""
    s, elt = r["shape"], ELT[r["dtype"]]
    qkv = s["B"] * s["N"] * s["D"] * elt
    if r["op"] == "attention":
        return int(qkv * (2 * s["Hq"] + 2 * s["Hkv"]))
    if r["op"] == "key_importance":
        return int(qkv * (s["Hq"] + 2 * s["Hkv"]) + s["B"] * s["Hq"] * s["N"] * 4)
    return None


def _spread_labels(ys: Sequence[float], gap: float) -> list[float]:
    """Label heights (axes fraction) near `ys`, at least `gap` apart, within [0, 1]."""
    order = sorted(range(len(ys)), key=lambda i: ys[i])
    out = [0.0] * len(ys)
    last = -math.inf
    for i in order:
        out[i] = last = max(ys[i], last + gap)
    top = max(out) if out else 0
    if top > 1:  # pushed out at the top: shift down, then re-space from the top
        last = math.inf
        for i in reversed(order):
            out[i] = last = min(out[i] - (top - 1), last - gap)
    return out


def roofline(header: Header, rows: list[Row], path: str) -> str | None:
    """vtattn kernels with a FLOP count, at their arithmetic intensity (FLOPs / compulsory bytes),
    under the run's measured copy-bandwidth and matmul ceilings. Colour per op, marker per backend,
    one label per case in a column beside the axes, joined to its points."""
    peaks = header["peaks"]
    cases: dict[tuple[str, str], list[tuple[float, float, Row]]] = defaultdict(list)
    for r in rows:
        if r.get("role") == "vtattn" and r.get("tflops") is not None and (b := _io_bytes(r)):
            cases[r["op"], r["case"]].append((r["tflops"] * r["median_ms"] * 1e9 / b, r["tflops"], r))
    if not cases:
        return None
    plt = _plt()
    bw, top = peaks["copy_gbps"] / 1e3, peaks["matmul_tflops"]  # TB/s, TFLOP/s
    ridge = top / bw  # FLOP/byte where the two ceilings meet
    allx = [p[0] for ps in cases.values() for p in ps] + [ridge]
    ally = [p[1] for ps in cases.values() for p in ps] + [top]
    xs = [min(allx) / 4, ridge, max(allx) * 4]
    fig, ax = plt.subplots(figsize=(9, 5.5))
    ax.plot(xs, [min(x * bw, top) for x in xs], "k-", lw=1.5,
            label=f"measured ceilings: copy {peaks['copy_gbps']:.0f} GB/s, matmul {top:.3g} TFLOP/s")
    ops = list(dict.fromkeys(op for op, _ in cases))
    backends = list(dict.fromkeys(p[2]["backend"] for ps in cases.values() for p in ps))
    for (op, _), ps in cases.items():
        for x, y, r in ps:
            ax.plot(x, y, MARKERS[backends.index(r["backend"]) % len(MARKERS)], color=f"C{ops.index(op)}", ms=6)
    ax.set(xscale="log", yscale="log", xlabel="arithmetic intensity (FLOP / byte)", ylabel="TFLOP/s",
           title=_title(header, "Roofline (vtattn kernels)"))
    ax.set_xlim(xs[0], xs[-1])  # fixed before the labels are placed: autoscaling would move the points
    ax.set_ylim(min(ally) / 1.5, max(ally) * 1.5)
    fig.subplots_adjust(left=0.1, right=0.66, top=0.88, bottom=0.12)

    def to_axes(x: float, y: float) -> Any:
        return ax.transAxes.inverted().transform(ax.transData.transform((x, y)))

    anchors = [max(ps, key=lambda p: p[0])[:2] for ps in cases.values()]  # each case's rightmost point
    heights = _spread_labels([to_axes(x, y)[1] for x, y in anchors], gap=0.045)
    for ((op, case), _), (x, y), h in zip(cases.items(), anchors, heights):
        ax.annotate(f"{op} {case}", (x, y), xytext=(1.03, h), textcoords="axes fraction", fontsize=7,
                    va="center", color=f"C{ops.index(op)}",
                    arrowprops=dict(arrowstyle="-", lw=0.4, color="lightgrey", shrinkA=0, shrinkB=3))
    handles = [plt.Line2D([], [], color="grey", marker=MARKERS[i % len(MARKERS)], ls="none", label=b)
               for i, b in enumerate(backends)]
    ax.legend(handles=[ax.get_lines()[0]] + handles, fontsize=7, loc="lower right")
    return _save(fig, path)


def _legend_below(fig: Any, handles: list[Any]) -> None:
    """The figure's legend under its axes, in as many rows as its width needs (~2.8 in an entry),
    and the axes laid out above it."""
    ncol = max(1, min(len(handles), int(fig.get_figwidth() // 2.8)))
    rows = -(-len(handles) // ncol)
    fig.legend(handles=handles, loc="lower center", ncol=ncol, fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, (0.1 + 0.22 * rows) / fig.get_figheight(), 1, 1))


def _save(fig: Any, path: str) -> str:
    fig.savefig(path, dpi=110)
    _plt().close(fig)
    return path


PLOTS: dict[str, Callable[[Header, list[Row], str], str | None]] = {
    "speedup_vs_keep.png": speedup_vs_keep, "speedup_vs_kv_budget.png": speedup_vs_kv_budget,
    "time_vs_length.png": time_vs_length, "roofline.png": roofline}


def write_all(header: Header, rows: list[Row], out_dir: str) -> list[str]:
    """The plots this run has rows for; returns their paths."""
    os.makedirs(out_dir, exist_ok=True)
    paths = [fn(header, rows, os.path.join(out_dir, name)) for name, fn in PLOTS.items()]
    return [p for p in paths if p]
