"""What `python -m vtattn.bench` shows and saves, on synthetic rows: a 120-column table with a shape
column and labelled skips, notes on surprising rows, the results folder, and plots that keep one
colour per batch and never join different shapes."""
import json

import pytest

from vtattn.bench import peak, plots, report, runner
from vtattn.bench.__main__ import _parser, main

ATTN = {"B": 1, "Hq": 32, "Hkv": 8, "N": 512, "D": 128, "causal": True}
E2E = {"B": 2, "images": 5, "views": 5, "image_tokens": 88, "prompt": 1, "llm_layers": 4, "llm_width": 256,
       "heads": 2, "kv_heads": 2, "tower_layers": 2, "scaled": "tiny", "cpu_threads": 1, "new_tokens": 8}


def row(op, case, backend, median, role="vtattn", shape=ATTN, baseline=None, ci=0.01, **kw):
    m = median or 0.0
    r = {"op": op, "case": case, "shape": shape, "dtype": "fp32", "backend": backend, "role": role,
         "median_ms": median, "p20_ms": median, "p80_ms": median, "reps": 40, "ci_low_ms": m * (1 - ci),
         "ci_high_ms": m * (1 + ci), "ci_level": 0.95, "calls_per_rep": 1, "converged": True, "tflops": None,
         "gbps": None, "pct_peak": None, "baseline": baseline, "baseline_ms": None, "speedup": None,
         "speedup_ci": None, "speedup_noise": None, "ratios": {}, "max_err": None, "device": "cpu", "note": "",
         "skipped": None}
    r.update(kw)
    if median is None:
        r.update({k: None for k in ("p20_ms", "p80_ms", "reps", "ci_low_ms", "ci_high_ms", "ci_level", "converged")})
    return r


def kernel_rows():
    b = dict(baseline="sdpa-dense")
    return [
        row("block_sparse_attention", "llava7b-prefill:sparsity-0.5", "auto", 9.9, speedup=0.04,
            speedup_ci=[0.03, 0.05], speedup_noise=False, tflops=0.001, pct_peak=4.6, **b),
        row("block_sparse_attention", "llava7b-prefill:sparsity-0.5", "cpp", None, note="refused: vtattn.block_sparse_"
            "attention: there is no 'cpp' backend for this op (it has ['torch', 'triton'])", **b),
        row("block_sparse_attention", "llava7b-prefill:sparsity-0.5", "flex", 28.3, role="baseline", speedup=0.014,
            speedup_ci=[0.01, 0.02], speedup_noise=False, converged=False, ci=0.16,
            note="eager (unfused) on CPU: a correctness baseline, not a speed one", **b),
        row("block_sparse_attention", "llava7b-prefill:sparsity-0.5", "sdpa-dense", 0.4, role="baseline", speedup=1.0,
            note="every key", **b),
    ]


def e2e_rows(case="llava-next-anyres5-decode:B16"):
    b = dict(op="e2e", case=case, shape=E2E, baseline="unpatched-sdpa")
    return [
        row(backend="unpatched-sdpa", median=143.5, role="baseline", speedup=1.0, kv_bytes=1 << 20, tok_s=97.6,
            note="kv 1 MiB", **b),
        row(backend="keep-1.0", median=150.0, role="reference", speedup=0.96, speedup_ci=[0.9, 1.05],
            speedup_noise=True, kv_bytes=1 << 20, tok_s=93.0, note="kv 1 MiB", **b),
        row(backend="lookm-1.0", median=149.0, speedup=0.96, speedup_ci=[0.92, 1.01], speedup_noise=True,
            kv_bytes=3 << 19, tok_s=94.0, note="kv 1.5 MiB", **b),
        row(backend="fastv-0.25+lookm-0.2", median=None, note="skipped: FastV with KV compression not in this "
            "vtattn (TypeError: llava() got an unexpected keyword argument 'fastv')", **b),
    ]


def test_table_fits_120_columns_with_a_shape_column_and_labelled_skips():
    rows = kernel_rows() + e2e_rows()
    text = report.format_table(rows)
    lines = text.splitlines()
    assert max(len(x) for x in lines) <= 120, max(lines, key=len)
    assert "== block_sparse_attention" in text and "== e2e" in text
    assert lines[1].startswith("case / shape")
    assert any(x.startswith("  B1 H32/8 N512 D128 causal") for x in lines)  # the case's shape, under its name
    assert any(x.startswith("  B2 img88 txt1 +8new L4 W256") for x in lines)
    skip = next(x for x in lines if " cpp " in x)
    assert "skipped: no cpp backend for this op" in skip
    assert "skipped: FastV with KV compression not in this vtattn" in text and "TypeError" not in text
    assert "(base)" in text and "~1.0 (noise)" in text and "0.04x" in text
    assert "±16%!" in text  # not converged
    flex = next(x for x in lines if " flex " in x)
    assert "eager (unfused)" in flex or any(x.startswith("*") and "eager (unfused)" in x for x in lines)
    assert "kv 1 MiB" not in text  # shown in the KV MiB column instead
    assert "1.5" in next(x for x in lines if "lookm-1.0" in x)


def test_wide_table_has_every_field():
    rows = kernel_rows() + e2e_rows()
    rows[0]["max_err"] = 3.6e-7
    text = report.format_table(rows, wide=True)
    assert max(len(x) for x in text.splitlines()) > 120
    for title in ("op", "case", "shape", "95% CI ms", "calls/n", "p20-p80 ms", "speedup CI", "max err", "3.6e-07"):
        assert title in text
    assert "got an unexpected keyword argument" in text  # the full reason


def test_notes_explain_the_surprising_rows():
    header = {"device_type": "cpu", "timing": {"target": 0.02, "max_s": 2.0, "model_target": 0.05,
                                               "model_max_s": 8.0}, "load_avg": 12.0, "cpu_count": 2}
    notes = report.explain(kernel_rows() + e2e_rows(), header)
    text = "\n".join(notes)
    assert "block_sparse_attention `auto` is slower than dense SDPA on CPU" in text
    assert "lookm-1.0 holds more KV memory than unpatched-sdpa" in text and "whole pages of 1 token(s)" in text
    assert "2 of 2 such rows are within noise" in text
    assert "1 row marked ! did not reach" in text and "busy" in text
    footer = report.format_footer(kernel_rows() + e2e_rows(), {**header, "elapsed_s": 3.0}, 2)
    assert max(len(x) for x in footer.splitlines()) <= 120
    assert not report.explain(e2e_rows()[:2], {"device_type": "cuda"})[1:]  # only the keep-1.0 line


def test_every_option_has_help_text():
    for action in _parser()._actions:
        assert action.help, action.option_strings


FAKE_PEAKS = {"copy_gbps": 1.0, "matmul_tflops": 1.0, "matmul_dtype": "fp32", "matmul_shape": "1x1x1"}


def _fake_run(monkeypatch, ran):
    def fake(case, device, dtype, peaks, quick=False):
        ran.append(case.name)
        return [row(case.op, case.name, "fake", 1.0, shape=case.shape)]
    monkeypatch.setattr(runner, "run_case", fake)
    monkeypatch.setattr(peak, "measure_peaks", lambda *a: FAKE_PEAKS)


def test_plot_without_matplotlib_fails_before_the_run(monkeypatch, tmp_path, capsys):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "matplotlib" else real(name, *a))
    ran = []
    _fake_run(monkeypatch, ran)
    with pytest.raises(SystemExit, match=r"--plot needs matplotlib: pip install 'vtattn\[bench\]'"):
        main(["--filter", "select_tokens/clip-l336", "--quick", "--plot", str(tmp_path)])
    assert ran == []
    # --out goes on without plots, and says so in one line before the run
    assert main(["--filter", "select_tokens/clip-l336:keep-0.1", "--quick", "--out", str(tmp_path / "o")]) == 0
    err = capsys.readouterr().err
    assert "no plots: matplotlib is not installed (pip install 'vtattn[bench]'" in err
    assert err.index("no plots") < err.index("[1/")


def test_out_auto_writes_a_dated_results_folder_and_names_it(monkeypatch, tmp_path, capsys):
    ran = []
    _fake_run(monkeypatch, ran)
    monkeypatch.chdir(tmp_path)
    assert main(["--filter", "select_tokens/clip-l336", "--quick", "--out", "auto"]) == 0
    (folder,) = (tmp_path / "bench-out").iterdir()
    assert folder.name.startswith("cpu-") and len(ran) == 3
    assert {p.name for p in folder.iterdir()} >= {"run.json", "run.csv", "summary.md"}
    run = json.loads((folder / "run.json").read_text())
    assert len(run["rows"]) == 3 and run["header"]["cpu_threads"] == 1
    summary = (folder / "summary.md").read_text()
    assert summary.startswith("# vtattn benchmark") and "| select_tokens | clip-l336:keep-0.1 |" in summary
    out = capsys.readouterr().out
    assert out.rstrip().splitlines()[-1].startswith(f"results: bench-out/{folder.name}/")
    assert "== select_tokens" in out and "case / shape" in out


def _figures(monkeypatch):
    figs = {}

    def save(fig, path):
        figs[path.rsplit("/", 1)[-1]] = fig
        return path
    monkeypatch.setattr(plots, "_save", save)
    return figs


def test_plots_one_colour_per_batch_and_no_line_across_shapes(monkeypatch, tmp_path):
    rows = []
    for b in (1, 8, 16):
        kind = "ttft" if b != 16 else "decode"
        for scenario in ("llava7b", "llava7b-gqa"):
            case = f"{scenario}-{kind}:B{b}"
            base = dict(op="e2e", case=case, shape={**E2E, "B": min(b, 2)}, baseline="unpatched-sdpa")
            rows.append(row(backend="unpatched-sdpa", median=10.0, role="baseline", speedup=1.0, kv_bytes=100, **base))
            for i, v in enumerate(("keep-1.0", "keep-0.5", "keep-0.25", "fastv-0.25", "lookm-1.0", "lookm-0.5")):
                rows.append(row(backend=v, median=10.0 / (1 + i / 10), speedup=1 + i / 10, kv_bytes=100 - i,
                                speedup_ci=[0.9 + i / 10, 1.1 + i / 10], speedup_noise=i == 0, **base))
    for n, case in ((72, "clip-l336"), (512, "llava7b-prefill")):
        for backend in ("auto", "sdpa-flash"):
            rows.append(row("attention", case, backend, n / 100, shape={**ATTN, "N": n}, tflops=0.05,
                            role="vtattn" if backend == "auto" else "baseline"))
    header = {"device": "test CPU", "scaled": "tiny", "peaks": FAKE_PEAKS}
    figs = _figures(monkeypatch)
    written = plots.write_all(header, rows, str(tmp_path))
    assert {p.rsplit("/", 1)[-1] for p in written} == {"speedup_vs_keep.png", "speedup_vs_kv_budget.png",
                                                        "time_vs_length.png", "roofline.png"}
    for ax in figs["time_vs_length.png"].axes:  # markers only: each shape is its own model
        assert all(len(line.get_xdata()) <= 1 for line in ax.get_lines())
    colours = {}
    for ax in figs["speedup_vs_keep.png"].axes:
        for line in ax.get_lines():
            if len(line.get_xdata()) > 1 and line.get_color() != "grey":  # a batch's series over keep ratios
                colours.setdefault(line.get_color(), set()).add(len(line.get_xdata()))
    assert len(colours) == 3  # batches 1, 8 and 16
    legend = figs["speedup_vs_keep.png"].legends[0]
    labels = [t.get_text() for t in legend.get_texts()]
    assert "batch 8 (runs at 2)" in labels and any("FastV" in x for x in labels)
    roof = figs["roofline.png"].axes[0]
    renderer = figs["roofline.png"].canvas.get_renderer()
    heights = sorted(t.xyann[1] for t in roof.texts)  # the labels' places, in axes fraction
    text_px = max(renderer.get_text_width_height_descent(t.get_text(), t.get_fontproperties(), False)[1]
                  for t in roof.texts)
    assert len(heights) == 2 and (heights[1] - heights[0]) * roof.bbox.height > text_px  # apart, not overlapping
