"""scripts/gpu_summary.py: the per-kernel verdict of a lent-GPU call, from the files the call wrote
(a call cut by time must say what it did not reach; the bench passes merge into one bench.json)."""
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _summary(out: Path) -> str:
    done = subprocess.run([sys.executable, str(ROOT / "scripts" / "gpu_summary.py"), str(out)], capture_output=True,
                          text=True, check=True)
    return done.stdout


def _line(text, backend, op):
    return next(line for line in text.splitlines() if line.split()[:2] == [backend, op])


def test_verdicts_per_kernel(tmp_path):
    (tmp_path / "summary.txt").write_text("cuda_kernels: exit 1 in 20s\npytest_cuda: exit 0 in 90s\n"
                                          "triton_kernels: exit 124 in 60s (cut at its limit: ...)\n")
    recs = [dict(backend="cuda", op="attention", status="pass", case="a", detail=None),
            dict(backend="cuda", op="select_tokens", status="fail", case="B3 segments [6000]",
                 detail="output 0: 12 of 36 elements differ"),
            dict(backend="cuda", op="decode_attention", status="error", case="c", detail="CUDA error: invalid argument"),
            dict(backend="triton", op="attention", status="pass", case="a", detail=None),
            dict(backend="cuda", op="paged_append", status="fail", case="d", detail="writes differ"),
            dict(backend="cuda", op="an_op_added_later", status="pass", case="e", detail=None)]
    (tmp_path / "kernels.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    (tmp_path / "pytest_cuda.xml").write_text(
        '<testsuites><testsuite><testcase classname="tests.test_attention" name="t[gpu-cuda]"/>'
        '<testcase classname="tests.test_gather_tokens" name="t[gpu-cuda]"><failure message="x"/></testcase>'
        '</testsuite></testsuites>')
    (tmp_path / "sanitizer.log").write_text(
        "== memcheck: compute-sanitizer --tool memcheck ...\n========= Invalid __global__ read of size 4 bytes\n"
        "=========     at 0x1 in void vtattn::(anonymous namespace)::select_kernel<float>(...)\n"
        "========= ERROR SUMMARY: 1 error\n== racecheck: compute-sanitizer --tool racecheck ...\n"
        "========= ERROR SUMMARY: 0 errors\n")
    text = _summary(tmp_path)
    assert "PASSED (gpu_kernels 1/1, pytest 1 passed" in _line(text, "cuda", "attention")
    assert "FAILED" in _line(text, "cuda", "select_tokens") and "12 of 36" in _line(text, "cuda", "select_tokens")
    assert "FAILED" in _line(text, "cuda", "decode_attention")
    assert "FAILED" in _line(text, "cuda", "gather_tokens")  # by its pytest case
    assert "PASSED" in _line(text, "triton", "attention")
    assert "FAILED" in _line(text, "cuda", "paged_append")  # every op gpu_kernels.py records gets a verdict
    assert "PASSED" in _line(text, "cuda", "an_op_added_later")
    assert "NOT REACHED (triton_kernels: exit 124" in _line(text, "triton", "merge_tokens")
    assert "memcheck: 1 errors in ['select_kernel']" in text and "racecheck: clean" in text


def test_bench_passes_merge(tmp_path):
    for name, rows in (("ops", [{"op": "attention"}]), ("e2e", [{"op": "e2e"}, {"op": "e2e"}])):
        header = {"backends": [name], "unfinished": ["e2e/x"] if name == "e2e" else []}
        (tmp_path / f"bench_{name}.json").write_text(json.dumps({"header": header, "rows": rows}))
    assert "bench: 3 rows in 2 passes, 1 cases not run for time" in _summary(tmp_path)
    run = json.loads((tmp_path / "bench.json").read_text())
    assert [p["pass"] for p in run["header"]["passes"]] == ["ops", "e2e"] and len(run["rows"]) == 3
    assert not list(tmp_path.glob("bench_*.json"))  # at most 8 files come back from the device


def test_the_later_pytest_passes_merge_into_pytest_cuda(tmp_path):
    """pytest_models.xml (CUDA-graph replays, patched models: the step after the Triton kernels) and
    pytest_compiled.xml (the compiled decode step alone) join pytest_cuda.xml, so their failures reach
    the verdicts and at most 8 files come back."""
    (tmp_path / "summary.txt").write_text("pytest_cuda: exit 0 in 90s\npytest_models: exit 1 in 50s\n"
                                          "pytest_compiled: exit 1 in 30s\n")
    (tmp_path / "pytest_compiled.xml").write_text(
        '<testsuites><testsuite><testcase classname="tests.test_kv_static_generate" '
        'name="test_compiled_decode_step_replays_cuda_graphs"><failure message="z"/></testcase>'
        '</testsuite></testsuites>')
    (tmp_path / "pytest_cuda.xml").write_text(
        '<testsuites><testsuite><testcase classname="tests.test_attention" name="t[gpu-cuda]"/>'
        '</testsuite></testsuites>')
    (tmp_path / "pytest_models.xml").write_text(
        '<testsuites><testsuite><testcase classname="tests.test_kv_static" name="test_replays[dtype0]">'
        '<failure message="x"/></testcase><testcase classname="tests.test_decode_attention" name="t[cuda]">'
        '<failure message="y"/></testcase></testsuite></testsuites>')
    text = _summary(tmp_path)
    assert "kv_static                0 passed, 1 failed: test_replays[dtype0]" in text
    assert "FAILED" in _line(text, "cuda", "decode_attention")  # by the second pass's case
    assert "kv_static_generate       0 passed, 1 failed: test_compiled_decode_step_replays_cuda_graphs" in text
    merged = (tmp_path / "pytest_cuda.xml").read_text()
    assert merged.count("<testcase") == 4
    assert not (tmp_path / "pytest_models.xml").exists() and not (tmp_path / "pytest_compiled.xml").exists()

