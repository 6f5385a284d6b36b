"""The benchmark's `vllm` e2e scenario (vtattn.bench.scenarios_vllm) at its tiny size: plain vLLM and
one pruned variant are timed (requests/s, time to first token); without vLLM every row is skipped
with the reason."""
import pytest
import torch

from vtattn.bench import scenarios_vllm
from vtattn.bench.runner import run_case
from vtattn.bench.timing import cpu_threads

CPU = torch.device("cpu")


def _case(keep=("plain-vllm", "keep-0.25")):
    (case,) = scenarios_vllm.cases("vllm-llava", "tiny")
    assert [i.name for i in case.impls] == ["plain-vllm", "keep-1.0", "keep-0.5", "keep-0.25", "keep-0.1"]
    case.impls = [i for i in case.impls if i.name in keep]  # two engines (and the baseline's re-run): CI time
    return case


def test_vllm_scenario_times_plain_and_pruned_engines(engines):
    engines.close()  # one in-process engine at a time
    set_threads = torch.set_num_threads
    with cpu_threads(CPU):
        rows = run_case(_case(), CPU, torch.float32, peaks={}, quick=True)
    assert torch.set_num_threads is set_threads  # vLLM's CPU worker replaces it process-wide: put back
    assert [r["backend"] for r in rows] == ["plain-vllm", "keep-0.25"]
    for r in rows:
        assert r["skipped"] is None, r["note"]
        assert r["op"] == "e2e" and r["case"] == "vllm-llava:B32" and r["shape"]["B"] == 2 and r["baseline"] == "plain-vllm"
        assert 0 < r["ttft_ms"] <= r["median_ms"] and r["req_s"] == pytest.approx(2e3 / r["median_ms"])
        lo, hi = r["ttft_ci_ms"]
        assert lo <= r["ttft_ms"] <= hi and r["reps"] >= 3


def test_vllm_scenario_rows_are_skipped_without_vllm(monkeypatch):
    monkeypatch.setattr(scenarios_vllm, "vllm_importable", lambda: False)
    case = _case(keep=("plain-vllm", "keep-1.0", "keep-0.5", "keep-0.25", "keep-0.1"))
    rows = run_case(case, CPU, torch.float32, peaks={})
    assert len(rows) == 5 and all(r["median_ms"] is None and r["skipped"] == scenarios_vllm.SKIP for r in rows)
