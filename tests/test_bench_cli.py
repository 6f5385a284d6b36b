"""`python -m vtattn.bench`: the JSON contract, --compare, --resume and the docs page."""
import copy
import json

import pytest

from vtattn.bench import compare as bench_compare
from vtattn.bench import docs as bench_docs
from vtattn.bench import peak, runner
from vtattn.bench.__main__ import main

CASE = "select_tokens/clip-l336:keep-0.1"


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    """One real `--quick` run of a small case on the CPU: (json path, loaded run)."""
    d = tmp_path_factory.mktemp("bench")
    path = d / "run.json"
    assert main(["--filter", CASE, "--quick", "--device", "cpu", "--json", str(path), "--csv", str(d / "run.csv")]) == 0
    return path, json.loads(path.read_text())


def test_quick_run_writes_the_documented_row_fields(quick_run):
    path, run = quick_run
    rows = run["rows"]
    assert {r["backend"] for r in rows} >= {"auto", "torch-topk"}
    for r in rows:
        for field in ("op", "shape", "dtype", "backend", "median_ms", "p20_ms", "p80_ms", "baseline", "speedup",
                      "device", "pct_peak"):
            assert field in r, field
        assert r["op"] == "select_tokens" and r["device"] == "cpu" and r["dtype"] == "fp32"
        assert 0 < r["p20_ms"] <= r["median_ms"] <= r["p80_ms"]
        assert r["ci_low_ms"] <= r["median_ms"] <= r["ci_high_ms"] and r["ci_level"] >= 0.95
        assert r["reps"] >= 10 and r["calls_per_rep"] >= 1 and r["converged"] in (True, False)
        assert r["baseline"] == "torch-topk" and r["speedup"] > 0
        if r["backend"] != "torch-topk":  # the ratio's interval holds the ratio
            lo, hi = r["speedup_ci"]
            assert lo <= r["speedup"] <= hi and r["speedup_noise"] == (lo <= 1 <= hi)
    h = run["header"]
    assert h["peaks"]["copy_gbps"] > 0 and h["scaled"] == "cpu-quick" and h["git_commit"]
    assert h["cpu_threads"] == 1 and h["timing"]["target"] > 0
    assert (path.parent / "run.csv").read_text().startswith("op,")


def test_compare_flags_rows_slower_than_the_spread(quick_run, tmp_path):
    _, run = quick_run
    old = copy.deepcopy(run)
    slow, same, legacy = old["rows"][0], old["rows"][1], old["rows"][2]
    # The recorded run was faster beyond both intervals for one row, and overlapping for the other.
    lo = slow["ci_low_ms"]
    slow.update(median_ms=lo / 4, ci_low_ms=lo / 5, ci_high_ms=lo / 3)
    same.update(ci_low_ms=same["ci_low_ms"] / 2, ci_high_ms=same["ci_high_ms"] * 2)
    # A run recorded before the intervals: p20-p80 stand in for them.
    for k in ("ci_low_ms", "ci_high_ms"):
        del legacy[k]
    legacy.update(p20_ms=legacy["median_ms"] / 100, p80_ms=legacy["median_ms"] / 50)
    (tmp_path / "old.json").write_text(json.dumps(old))
    pairs = bench_compare.compare(run["rows"], tmp_path / "old.json")
    flags = {r["backend"]: slower for r, _, _, slower in pairs}
    assert flags[slow["backend"]] is True and flags[same["backend"]] is False and flags[legacy["backend"]] is True
    ratio = {r["backend"]: x for r, _, x, _ in pairs}[slow["backend"]]
    assert ratio == pytest.approx(run["rows"][0]["median_ms"] / slow["median_ms"])
    text = bench_compare.format_compare(pairs, "old.json")
    assert "SLOWER" in text and "~ (noise)" in text


FAKE_PEAKS = {"copy_gbps": 1.0, "matmul_tflops": 1.0, "matmul_dtype": "fp32", "matmul_shape": "1x1x1"}


def _fake_rows(case, device, dtype, peaks, quick=False):
    row = dict.fromkeys(("role", "reps", "tflops", "gbps", "pct_peak", "baseline", "baseline_ms", "speedup",
                         "max_err", "note", "skipped"))
    return [{**row, "op": case.op, "case": case.name, "shape": case.shape, "dtype": "fp32", "backend": "fake",
             "median_ms": 1.0, "p20_ms": 1.0, "p80_ms": 1.0, "ratios": {}, "device": "cpu"}]


def test_resume_runs_only_the_cases_a_cut_run_lacks(tmp_path, monkeypatch):
    ran = []
    monkeypatch.setattr(runner, "run_case", lambda case, *a, **k: ran.append(case.name) or _fake_rows(case, *a))
    monkeypatch.setattr(peak, "measure_peaks", lambda *a: FAKE_PEAKS)
    path = tmp_path / "run.json"
    args = ["--filter", "select_tokens/clip-l336", "--quick"]
    main(args + ["--json", str(path), "--time-budget", "0"])  # out of time before the first case
    assert ran == [] and len(json.loads(path.read_text())["header"]["unfinished"]) == 3
    main(args + ["--json", str(path)])
    assert len(ran) == 3
    run = json.loads(path.read_text())
    run["rows"] = run["rows"][:1]  # as if the run had been cut after its first case
    path.write_text(json.dumps(run))
    ran.clear()
    main(args + ["--resume", str(path)])
    assert len(ran) == 2 and run["rows"][0]["case"] not in ran
    resumed = json.loads(path.read_text())
    assert len(resumed["rows"]) == 3 and len(resumed["header"]["resumed"]) == 1
    assert "unfinished" not in resumed["header"]

    assert {r["git_commit"] for r in resumed["rows"]} == {run["header"]["git_commit"]}
    bench_docs.main([str(path), "--out", str(tmp_path / "b.md"), "--plots", str(tmp_path)])
    assert "Continued" in (tmp_path / "b.md").read_text()

    for key, other in (("torch", "2.0.0"), ("backends", ["torch"])):
        path.write_text(json.dumps({**run, "header": {**run["header"], key: other}}))
        with pytest.raises(SystemExit, match=key):
            main(args + ["--resume", str(path)])


def test_docs_page_is_generated_from_a_run(quick_run, tmp_path):
    path, run = quick_run
    out = tmp_path / "benchmarks.md"
    assert bench_docs.main([str(path), "--out", str(out), "--plots", str(tmp_path / "plots")]) == 0
    md = out.read_text()
    assert md.startswith("# Benchmarks") and run["header"]["device"] in md
    assert md.count("| select_tokens | clip-l336:keep-0.1 |") == len(run["rows"])


def test_custom_shapes_run_as_given_and_bad_ones_are_refused(capsys):
    import torch

    from vtattn.bench.cases import build_cases

    name = "custom:B=2,Hq=8,Hkv=4,N=300,D=64,causal=1"
    cases = build_cases(torch.device("cpu"), shapes=[name], level="cpu-quick")
    assert {c.op for c in cases} >= {"attention", "varlen_attention", "index_attention"}
    attention = next(c for c in cases if c.op == "attention")
    assert (attention.shape["N"], attention.shape["Hkv"], attention.shape["causal"]) == (300, 4, True)
    decode = build_cases(torch.device("cpu"), shapes=["llava7b-decode", "custom:N=200,D=64,decode=1"], level="tiny")
    assert {c.op for c in decode} == {"decode_attention", "paged_decode_attention", "paged_append",
                                      "paged_decode_step", "paged_evict", "paged_evict_step", "cmai_step"} \
        and len(decode) == 14
    for bad, why in (("bogus", "unknown shape"), ("custom:N=10", "N and D are required"),
                     ("custom:N=10,D=64,Hq=6,Hkv=4", "multiple of Hkv"), ("custom:N=10,D=x", "KEY=INT")):
        with pytest.raises(SystemExit):
            main(["--shapes", bad])
        assert why in capsys.readouterr().err


def test_sigterm_ends_the_run_with_its_files(tmp_path, monkeypatch):
    """`timeout` sends SIGTERM: the run stops in the case it is in and still writes its JSON (with the
    unfinished cases) and CSV."""
    import os
    import signal

    ran = []

    def case_then_term(case, *a, **k):
        ran.append(case.name)
        if len(ran) == 2:
            os.kill(os.getpid(), signal.SIGTERM)
        return _fake_rows(case, *a)

    monkeypatch.setattr(runner, "run_case", case_then_term)
    monkeypatch.setattr(peak, "measure_peaks", lambda *a: FAKE_PEAKS)
    before = signal.getsignal(signal.SIGTERM)
    path = tmp_path / "run.json"
    assert main(["--filter", "select_tokens/clip-l336", "--quick", "--json", str(path), "--csv",
                 str(tmp_path / "run.csv")]) == 0
    run = json.loads(path.read_text())
    assert len(ran) == 2 and len(run["rows"]) == 1 and len(run["header"]["unfinished"]) == 2
    assert (tmp_path / "run.csv").exists() and signal.getsignal(signal.SIGTERM) is before


def test_case_and_row_names_are_the_same_at_every_level():
    """pytest-benchmark's ids come from the full level (`impl_ids`); CI runs the tiny one: a name that
    depends on the level (a length, a layer count) would be a row that no level can find."""
    import torch
    from vtattn.bench.cases import ALL_BACKENDS, build_cases
    from vtattn.bench.scenarios import LEVELS

    names = {lv: {(c.op, c.name, i.name) for c in build_cases(torch.device("cpu"), backends=ALL_BACKENDS, level=lv)
                  for i in c.impls} for lv in LEVELS}
    for lv in LEVELS:
        assert names[lv] == names["full"], (lv, sorted(names[lv] ^ names["full"])[:6])
