"""Output: a table for people (120 columns, one section per op; `wide=True` for every field), the
notes that explain surprising rows, and JSON / CSV for tools."""
import csv
import json
import re
import textwrap
from typing import TYPE_CHECKING, Any, Callable, Collection, Sequence, cast

if TYPE_CHECKING:
    from .cases import Case

Row = dict[str, Any]  # one result row (runner.run_case's fields, plus what an impl's stats add)
Header = dict[str, Any]  # a run's header: device, versions, peaks, timing, argv
WIDTH = 120
_NOTE_FIELDS = re.compile(r"\s*\b(kv [\d.e+-]+ MiB|peak [\d.]+ GiB \(\+[\d.-]+\))")  # shown as their own columns


def _fmt(v: Any, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def ms(v: float | None) -> str:
    return "-" if v is None else f"{v:.4g}" if v < 1000 else f"{v:.0f}"


def rate(r: Row) -> str:
    if r.get("tok_s") is not None:  # e2e decode rows
        return f"{r['tok_s']:.3g} tok/s"
    if r.get("req_s") is not None:  # e2e vllm rows: the batch's requests / its wall time
        return f"{r['req_s']:.3g} req/s"
    if r.get("host_us_layer") is not None:  # decode_host rows: host time over unpatched, per layer
        return f"{r['host_us_layer']:+.3g} us/layer"
    if r.get("tflops") is not None:
        return f"{r['tflops']:.3g} TFLOP/s" if r["tflops"] >= 1 else f"{r['tflops'] * 1e3:.3g} GFLOP/s"
    if r.get("gbps") is not None:
        return f"{r['gbps']:.3g} GB/s" if r["gbps"] >= 1 else f"{r['gbps'] * 1e3:.3g} MB/s"
    return "-"


def spread(r: Row) -> str:
    """Half-width of the median's interval relative to the median; "!" when the run's target was
    not reached within the row's time cap. Runs without intervals (older JSON): p20-p80."""
    if r.get("median_ms") is None:
        return "-"
    lo, hi = r.get("ci_low_ms"), r.get("ci_high_ms")
    if lo is None:
        lo, hi = r["p20_ms"], r["p80_ms"]
    pct = 100 * (hi - lo) / 2 / r["median_ms"]
    return f"±{pct:.2g}%" + ("!" if r.get("converged") is False else "")


def speedup(r: Row) -> str:
    s = r.get("speedup")
    if s is None:
        return "-"
    if r["backend"] == r.get("baseline"):
        return "(base)"
    if r.get("speedup_noise"):
        return "~1.0 (noise)"
    return f"{s:.3g}x"


def shape_text(s: dict[str, Any], wide: bool = False) -> str:
    """Compact shape: B, heads (Hq/Hkv when they differ), N or the cache length, D; the model
    rows' size. Wide: every key."""
    if wide:
        return " ".join(f"{k}={v}" for k, v in s.items() if v is not None)
    if "llm_layers" in s:  # e2e
        new = f" +{s['new_tokens']}new" if s.get("new_tokens") else ""
        return f"B{s['B']} img{s['image_tokens']} txt{s['prompt']}{new} L{s['llm_layers']} W{s['llm_width']}"
    if "layers" in s:  # vision_tower
        return f"B{s['B']} L{s['layers']} W{s['width']} img{s['image']}px"
    parts = [f"B{s['B']}"] if "B" in s else []
    if "Hq" in s:
        parts.append(f"H{s['Hq']}" if s["Hq"] == s.get("Hkv") else f"H{s['Hq']}/{s['Hkv']}")
    for k in ("N", "L_cap", "C", "D"):
        if k in s:
            parts.append(f"{'L' if k == 'L_cap' else k}{s[k]}")
    if s.get("causal"):
        parts.append("causal")
    return " ".join(parts)


_REASONS = [  # (pattern on the row's note, short reason): why a row has no timing
    (r"No viable backend for scaled_dot_product_attention", "this SDPA backend cannot run here"),
    (r"there is no '(\w+)' backend for this op", r"no \1 backend for this op"),
    (r"^skipped: (.+?) \((?:TypeError|NotImplementedError)", r"\1"),
]


def skip_reason(r: Row) -> str:
    """'skipped: <short reason>' for a row that could not run here; 'ERROR: ...' for a failure."""
    note: str = r.get("note") or r.get("skipped") or ""
    for pattern, short in _REASONS:
        m = re.search(pattern, note)
        if m:
            return "skipped: " + m.expand(short)
    for prefix in ("skipped: ", "refused: "):
        if note.startswith(prefix):
            return "skipped: " + note.removeprefix(prefix)
    return "ERROR: " + note


def note_text(r: Row, columns: Collection[str] = ()) -> str:
    """The row's note, less the figures that `columns` show on their own (kv, peak)."""
    note: str = r.get("note") or ""
    if "kv" in columns or "peak" in columns:
        note = _NOTE_FIELDS.sub("", note).strip()
    return note


# (key, title, cell, right-aligned, drop order when the table is too wide: lower first; None never)
Column = tuple[str, str, Callable[[Row], str], bool, int | None]
_COLUMNS: list[Column] = [
    ("backend", "backend", lambda r: r["backend"], False, None),
    ("median", "median ms", lambda r: ms(r.get("median_ms")), True, None),
    ("ci", "±95%", spread, True, None),
    ("n", "n", lambda r: _fmt(r.get("reps"), "d"), True, None),
    ("rate", "rate", rate, True, 3),
    ("ttft", "TTFT ms", lambda r: ms(r.get("ttft_ms")), True, 5),
    ("pct", "%peak", lambda r: _fmt(r.get("pct_peak"), ".3g"), True, 1),
    ("kv", "KV MiB", lambda r: "-" if r.get("kv_bytes") is None else f"{r['kv_bytes'] / 2**20:.3g}", True, 4),
    ("peak", "peak GiB", lambda r: _fmt(r.get("peak_gib"), ".3g"), True, 2),
    ("speedup", "speedup", speedup, True, None),
]
_WIDE_COLUMNS: list[tuple[str, str, Callable[[Row], str], bool]] = [
    ("op", "op", lambda r: r["op"], False),
    ("case", "case", lambda r: r["case"], False),
    ("shape", "shape", lambda r: shape_text(r["shape"], wide=True), False),
    ("dtype", "dtype", lambda r: r["dtype"], False),
    ("backend", "backend", lambda r: r["backend"], False),
    ("role", "role", lambda r: r.get("role") or "-", False),
    ("median", "median ms", lambda r: ms(r.get("median_ms")), True),
    ("ci", "95% CI ms", lambda r: "-" if r.get("ci_low_ms") is None else f"{ms(r['ci_low_ms'])}-{ms(r['ci_high_ms'])}",
     True),
    ("ci%", "±95%", spread, True),
    ("n", "n", lambda r: _fmt(r.get("reps"), "d"), True),
    ("calls", "calls/n", lambda r: _fmt(r.get("calls_per_rep"), "d"), True),
    ("p20", "p20-p80 ms", lambda r: "-" if r.get("p20_ms") is None else f"{ms(r['p20_ms'])}-{ms(r['p80_ms'])}", True),
    ("rate", "rate", rate, True),
    ("ttft", "TTFT ms", lambda r: ms(r.get("ttft_ms")), True),
    ("pct", "%peak", lambda r: _fmt(r.get("pct_peak"), ".3g"), True),
    ("kv", "KV MiB", lambda r: "-" if r.get("kv_bytes") is None else f"{r['kv_bytes'] / 2**20:.3g}", True),
    ("peak", "peak GiB", lambda r: _fmt(r.get("peak_gib"), ".3g"), True),
    ("vs", "vs", lambda r: r.get("baseline") or "-", False),
    ("speedup", "speedup", lambda r: _fmt(r.get("speedup"), ".3g"), True),
    ("sci", "speedup CI", lambda r: "-" if not r.get("speedup_ci") else "{:.3g}-{:.3g}".format(*r["speedup_ci"]), True),
    ("pairs", "pairs", lambda r: _fmt(r.get("speedup_pairs"), "d"), True),
    ("err", "max err", lambda r: _fmt(r.get("max_err"), ".2g"), True),
    ("note", "note", lambda r: r.get("note") or "", False),
]


def _clip(text: str, width: int) -> str:
    return text if len(text) <= width else text[:max(0, width - 1)] + "…"


Line = list[str] | tuple[list[str], str] | None  # a table line: see _render


def _render(header: list[str], aligns: list[bool], lines: Sequence[Line], widths: list[int]) -> list[str]:
    """lines: lists of cells, (cells, span) for a row whose `span` text runs on from its cells, or
    None for a blank line."""
    def line(cells: list[str], span: str | None = None) -> str:
        out = [str(c).rjust(w) if right else str(c).ljust(w) for c, w, right in zip(cells, widths, aligns)]
        return "  ".join(out + ([span] if span is not None else [])).rstrip()
    body = [line(*x) if isinstance(x, tuple) else "" if x is None else line(x) for x in lines]
    return [line(header), line(["-" * w for w in widths])] + body


def _groups(rows: list[Row]) -> list[list[Row]]:
    """Consecutive rows of one (op, case)."""
    out: list[list[Row]] = []
    for r in rows:
        if out and (out[-1][0]["op"], out[-1][0]["case"]) == (r["op"], r["case"]):
            out[-1].append(r)
        else:
            out.append([r])
    return out


def format_section(rows: list[Row], width: int = WIDTH) -> str:
    """One op's rows: the case and its shape in the first column (the case on a group's first row,
    its shape on the second), then the backend and the numbers; a row that did not run says why in
    place of its numbers. Columns with nothing to show are left out. When the table is wider than
    `width`, notes become numbered footnotes under it, then the least needed columns go (`--wide`
    has them all), then long names are cut."""
    timed = [r for r in rows if r.get("median_ms") is not None]
    cols = [c for c in _COLUMNS if c[0] == "backend" or any(c[2](r) not in ("-", "") for r in timed)]
    # (first column, row or None for a shape line of its own); None: a blank line
    entries: list[tuple[str, Row | None] | None] = []
    for g in _groups(rows):
        shape = "  " + shape_text(g[0]["shape"])
        entries += ([None] if entries else []) + [(g[0]["case"], g[0])]
        entries += [(shape if i == 0 else "", r) for i, r in enumerate(g[1:])] or [(shape, None)]
    notes = {id(r): note_text(r, {c[0] for c in cols}) for r in timed}  # untimed rows: a reason instead
    note_w = max([len(n) for n in notes.values()] + [0])

    def widths_of(cols: list[Column]) -> list[int]:
        w = [max(len("case / shape"), *(len(e[0]) for e in entries if e))]
        for c in cols:
            cells = [c[2](r) for r in (rows if c[0] == "backend" else timed)]
            w.append(max([len(c[1])] + [len(x) for x in cells]))
        return w

    def total(cols: list[Column], note_w: int) -> int:
        return sum(widths_of(cols)) + 2 * len(cols) + (note_w + 2 if note_w else 0)

    footnotes: dict[str, str] = {}
    if total(cols, note_w) > width and note_w:
        for n in notes.values():
            if n:
                footnotes.setdefault(n, f"*{len(footnotes) + 1}")
        note_w = max(len(m) for m in footnotes.values())
    for c in sorted((c for c in cols if c[4] is not None), key=lambda c: cast(int, c[4])):
        if total(cols, note_w) <= width:
            break
        cols = [x for x in cols if x is not c]
    widths = widths_of(cols)
    over = total(cols, note_w) - width
    for i in (0, 1):  # still too wide: cut the names, the case / shape column first
        cut = max(0, min(over, widths[i] - 12))
        widths[i] -= cut
        over -= cut
    titles, aligns = ["case / shape"] + [c[1] for c in cols], [False] + [c[3] for c in cols]
    if note_w:
        titles, widths, aligns = titles + ["note"], widths + [note_w], aligns + [False]
    lines: list[Line] = []
    for e in entries:
        if e is None:
            lines.append(e)
            continue
        label, r = e
        if r is None:
            lines.append([_clip(label, widths[0])])
            continue
        head = [_clip(label, widths[0]), _clip(r["backend"], widths[1])]
        if r.get("median_ms") is None:
            lines.append((head, _clip(skip_reason(r), max(20, width - widths[0] - widths[1] - 4))))
        else:
            note = notes[id(r)]
            lines.append(head + [c[2](r) for c in cols[1:]] + ([footnotes.get(note, note)] if note_w else []))
    out = _render(titles, aligns, lines, widths)
    return "\n".join(out + [f"{m} {n}" for n, m in footnotes.items()])


def format_wide(rows: list[Row]) -> str:
    body = [[c[2](r) for c in _WIDE_COLUMNS] for r in rows]
    titles = [c[1] for c in _WIDE_COLUMNS]
    widths = [max(len(t), *(len(b[i]) for b in body)) if body else len(t) for i, t in enumerate(titles)]
    lines: list[Line] = []
    prevs: list[Row | None] = [None, *rows]
    for prev, (r, cells) in zip(prevs, zip(rows, body)):
        if prev is not None and (prev["op"], prev["case"]) != (r["op"], r["case"]):
            lines.append(None)
        lines.append(cells)
    return "\n".join(_render(titles, [c[3] for c in _WIDE_COLUMNS], lines, widths))


def sections(rows: list[Row]) -> list[tuple[str, list[Row]]]:
    """[(op, rows)] in run order, one per run of consecutive rows of an op."""
    out: list[tuple[str, list[Row]]] = []
    for r in rows:
        if out and out[-1][0] == r["op"]:
            out[-1][1].append(r)
        else:
            out.append((r["op"], [r]))
    return out


def format_table(rows: list[Row], wide: bool = False, width: int = WIDTH) -> str:
    if wide:
        return format_wide(rows)
    return "\n\n".join(f"== {op}\n" + format_section(rs, width) for op, rs in sections(rows))


LEGEND = ("median ms: the median of n samples. ±95%: the half-width of the median's 95% confidence interval "
          "(order statistics), relative to it; ! = not within the run's target by the row's time cap. speedup: the "
          "fastest baseline's (base) median / the row's (CPU model rows: the median of that ratio over pairs of "
          "calls alternating with the baseline's); ~1.0 (noise): the ratio's interval contains 1")


def format_footer(rows: list[Row], header: Header, n_cases: int) -> str:
    """The run's totals, the legend and the notes on surprising rows, wrapped to WIDTH."""
    counts = f"{n_cases} case{'s' if n_cases != 1 else ''}, {_rows(rows)}"
    out = textwrap.wrap(f"{counts} in {header.get('elapsed_s')} s. {LEGEND}.", WIDTH)
    for line in explain(rows, header):
        out += textwrap.wrap(line, WIDTH, initial_indent="- ", subsequent_indent="  ")
    return "\n".join(out)


def format_header(h: Header) -> str:
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
    if h.get("device_type") == "cpu" and h.get("cpu_threads"):
        load = f"; load average {h['load_avg']:.1f} on {h['cpu_count']} cores" if h.get("load_avg") is not None else ""
        lines.append(f"CPU: timed on {h['cpu_threads']} thread{'s' if h['cpu_threads'] > 1 else ''} (--threads N)"
                     f"{load}")
    return "\n".join(lines)


def write_json(path: str, header: Header, rows: list[Row]) -> None:
    with open(path, "w") as f:
        json.dump({"header": header, "rows": rows}, f, indent=1, default=str)


def write_csv(path: str, rows: list[Row]) -> None:
    flat = [{**r, **{k: json.dumps(r[k]) for k in ("shape", "ratios", "speedup_ci") if k in r}} for r in rows]
    fields = list(dict.fromkeys(k for r in flat for k in r)) or ["op"]  # model rows add their own fields
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        w.writerows(flat)


def resume(path: str, header: Header, cases: list["Case"]) -> tuple[Header, list[Row], list["Case"]]:
    """(header, rows, cases still to run) to continue the run recorded at `path`: its header (measured
    peaks included) and rows are kept, and the cases it has rows for are dropped. A run of another
    device, torch, dtype, backend set, timing level or CPU thread count cannot be continued: its rows would not
    compare (--filter and --shapes may differ: they choose what still runs). The commit may
    have moved on (a device session is short): each row keeps the commit it was measured at."""
    with open(path) as f:
        run = json.load(f)
    old = run["header"]
    for k in ("device", "torch", "triton", "dtype", "backends", "quick", "scaled", "cpu_threads"):
        if old.get(k) != header.get(k):
            raise SystemExit(f"--resume {path}: its {k} is {old.get(k)!r}, this run's is {header.get(k)!r}")
    old.setdefault("resumed", []).append({k: header[k] for k in ("date", "argv", "git_commit")})
    done = {(r["op"], r["case"]) for r in run["rows"]}
    return old, run["rows"], [c for c in cases if (c.op, c.name) not in done]


def _kv_page() -> int:
    """CompressedCache's default page size (tokens), from its signature."""
    import inspect

    from vtattn.kv import CompressedCache

    return int(inspect.signature(CompressedCache.__init__).parameters["page_size"].default)


def _rows(rows: list[Row]) -> str:
    return "1 row" if len(rows) == 1 else f"{len(rows)} rows"


def explain(rows: list[Row], header: Header) -> list[str]:
    """A few lines on the rows a reader will be surprised by, for those present in `rows`."""
    cpu = header.get("device_type") == "cpu"
    by = {(r["op"], r["case"], r["backend"]): r for r in rows}
    timed = [r for r in rows if r.get("median_ms") is not None]
    out = []
    slow = [r for r in timed if r["op"] == "block_sparse_attention" and r["backend"] == "auto"
            and (r.get("speedup") or 1) < 1 and not r.get("speedup_noise")]
    if cpu and slow:
        out.append("block_sparse_attention `auto` is slower than dense SDPA on CPU in some rows: at low sparsity "
                   "and short lengths the C++ kernel (fp32 tiles, vtattn's dense CPU kernel's) does not beat "
                   "SDPA's CPU flash kernel; its saving shows against `attention-dense` and at high sparsity.")
    more = [r for r in timed if r["op"] == "e2e" and r["backend"] == "lookm-1.0" and r.get("kv_bytes")
            and (by.get(("e2e", r["case"], "unpatched-sdpa")) or {}).get("kv_bytes", r["kv_bytes"]) < r["kv_bytes"]]
    if more:
        from vtattn.kv.pages import GROWTH
        out.append(f"lookm-1.0 holds more KV memory than unpatched-sdpa: the compressed cache keeps every token "
                   f"but gives each (batch, KV head) room past them, in whole pages of {_kv_page()} token(s): "
                   f"generate's new tokens (up to a quarter of the head's length), and a growth adds a quarter of "
                   f"its length (at least {GROWTH} tokens); on short prompts (CPU's scaled models: tens of tokens) "
                   f"that room is a large share, at real lengths (thousands of tokens) a few percent.")
    keep1 = [r for r in timed if r["op"] == "e2e" and r["backend"] in ("keep-1.0", "lookm-1.0")
             and r.get("speedup") is not None]
    if keep1:
        noise = sum(bool(r.get("speedup_noise")) for r in keep1)
        out.append(f"keep-1.0 / lookm-1.0 keep every token: they should read ~1.0 against unpatched-sdpa (vllm "
                   f"rows: plain-vllm; a gap is the patch's own overhead); {noise} of {len(keep1)} such rows are within noise here.")
    if cpu and any(r["op"] in ("e2e", "vision_tower") for r in timed):
        out.append("e2e / vision_tower on CPU: tiny random-weight models (a few layers, tens of tokens), one "
                   "thread: fixed per-layer costs (Python, dispatch, generate's bookkeeping) dominate, so keep "
                   "ratios and KV budgets barely move the time and unrelated rows can read alike.")
    loose = [r for r in timed if r.get("converged") is False]
    if loose:
        t = header.get("timing") or {}
        cap = (f" (kernels ±{100 * t['target']:.0f}% within {t['max_s']:g} s, models ±{100 * t['model_target']:.0f}% "
               f"within {t['model_max_s']:g} s)" if t.get("target") else "")
        out.append(f"{_rows(loose)} marked ! did not reach the spread target{cap}: the machine was busy or the "
                   f"op is noisy; their speedups are judged on their wider intervals.")
    if cpu and (header.get("load_avg") or 0) > (header.get("cpu_count") or 1) * 0.5:
        out.append(f"The machine was busy (load average {header['load_avg']:.1f} on {header['cpu_count']} cores "
                   f"at the start): every timing here includes other processes' interference.")
    few = [r for r in timed if (r.get("ci_level") or 1) < 0.95]
    if few:
        out.append(f"{_rows(few)} with fewer than 6 samples: the interval is [min, max], which covers the median with "
                   f"less than 95% confidence.")
    over = [r for r in timed if (r.get("pct_peak") or 0) > 100]
    if over:
        out.append(f"{_rows(over)} above 100% of peak: the peaks are measured once, at the start; a machine "
                   f"that was busier then than later makes them too low.")
    return out
