"""What CI can prove without a GPU: the CUDA kernels compiled and linked for every target, and
builds of one checkout in two environments keep to themselves."""
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import vtattn

from vtattn import _env, _ext

REQUIRE_CUDA = _env.flag("VTATTN_REQUIRE_CUDA")
ROOT = Path(__file__).resolve().parents[1]
CSRC = ROOT / "csrc"
CPU_KERNELS = sorted(p.stem for p in CSRC.glob("cpu/*.cpp"))
CUDA_KERNELS = sorted(p.stem for p in CSRC.glob("cuda/*.cu"))


def test_build_info_recorded():
    """Every CPU kernel in the tree was built and registered; the facts travel inside _C."""
    info = _ext.build_info()
    assert info, "vtattn._C was not built"
    assert info["torch"] == torch.__version__
    assert _ext.load() is None
    assert sorted(info["cpu_sources"]) == CPU_KERNELS
    for op in CPU_KERNELS:
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"vtattn_C::{op}", "CPU"), op
    # `vtattn info` lists ops, as the dispatcher has them (a file may hold several: decode_attention.cpp)
    compiled = vtattn.info()["compiled_ops"]
    assert set(CPU_KERNELS) | {"paged_decode_attention"} <= set(compiled["cpu"])
    assert compiled["any"] == ["paged_decode_step"]
    assert not list((ROOT / "python" / "vtattn").glob("_build_info*")), "build facts written into the sources"


def test_loader_says_what_it_loaded():
    path, why = _ext.location()
    assert path is not None and Path(path).is_file() and why
    if _ext.checkout_root() is not None and "build/env" in path:  # an editable install of this checkout
        assert Path(path).parent.parent == _ext.env_build_dir(ROOT)
    out = subprocess.run([sys.executable, "-m", "vtattn", "info"], check=True, capture_output=True, text=True).stdout
    assert f"compiled_path     {path} ({why})" in out and f"vtattn_path       {_ext.PACKAGE}" in out


@pytest.mark.skipif(_ext.checkout_root() is None, reason="needs the checkout vtattn is imported from")
def test_build_check_sees_what_changed(monkeypatch):
    """`python -m vtattn build-check` (the setup scripts' reuse test): sources, options, targets."""
    out = subprocess.run([sys.executable, "-m", "vtattn", "build-check"], capture_output=True, text=True)
    assert (out.returncode, out.stdout.split(" ", 1)[0]) in ((0, "reusing"), (1, "building:")), out
    facts = _ext.build_info()
    for name in ("VTATTN_SKIP_CUDA", "VTATTN_REQUIRE_CUDA"):
        monkeypatch.delenv(name, raising=False)
    if facts["cuda_skip_reason"] == "VTATTN_SKIP_CUDA=1":  # a CPU-only build on purpose (the oldest-versions run)
        monkeypatch.setenv("VTATTN_SKIP_CUDA", "1")
    monkeypatch.setenv("VTATTN_CUDA_ARCHS", ";".join(facts["cuda_archs"]) or "80")
    monkeypatch.setattr(_ext, "source_stamp", lambda root: facts["sources"])
    assert _ext.stale_reason(ROOT) is None
    monkeypatch.setattr(_ext, "source_stamp", lambda root: "0" * 16)
    assert "sources" in _ext.stale_reason(ROOT)
    monkeypatch.setattr(_ext, "source_stamp", lambda root: facts["sources"])
    if facts["with_cuda"]:
        monkeypatch.setenv("VTATTN_CUDA_ARCHS", "75")
        assert "CUDA targets ['75']" in _ext.stale_reason(ROOT)
        monkeypatch.setenv("VTATTN_SKIP_CUDA", "1")
        assert "VTATTN_SKIP_CUDA=1" in _ext.stale_reason(ROOT)
    else:
        monkeypatch.delenv("VTATTN_SKIP_CUDA", raising=False)
        monkeypatch.setenv("VTATTN_REQUIRE_CUDA", "1")
        assert "no CUDA kernels" in _ext.stale_reason(ROOT)


@pytest.mark.skipif(not REQUIRE_CUDA, reason="only when the build must include CUDA (CI)")
def test_cuda_kernels_were_built_and_registered():
    info = _ext.build_info()
    assert info["with_cuda"], f"CUDA part skipped: {info['cuda_skip_reason']}"
    assert sorted(info["cuda_sources"]) == CUDA_KERNELS
    for op in CUDA_KERNELS:
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"vtattn_C::{op}", "CUDA"), op
    assert set(CUDA_KERNELS) | {"paged_decode_attention"} <= set(vtattn.info()["compiled_ops"]["cuda"])


@pytest.mark.skipif(not REQUIRE_CUDA, reason="only when the build must include CUDA (CI)")
def test_binary_holds_sm80_and_sm90a_code():
    cuobjdump = shutil.which("cuobjdump") or "/usr/local/cuda/bin/cuobjdump"
    if not os.path.exists(cuobjdump):
        pytest.skip("cuobjdump not found")
    so = _ext.location()[0]
    listing = subprocess.run([cuobjdump, "--list-elf", so], check=True, capture_output=True, text=True).stdout
    for arch in _ext.build_info()["cuda_archs"]:
        assert f"sm_{arch}" in listing, f"no sm_{arch} code in {so}:\n{listing}"
    assert {"80", "90a"} <= set(_ext.build_info()["cuda_archs"])


@pytest.mark.parametrize("run", ["cpu", pytest.param("gpu", marks=pytest.mark.gpu)])
def test_the_interpreter_suite_stays_out_of_other_runs(run):
    """`pytest tests` (the CPU run, and `-m gpu`) leaves tests/interpreter out: its conftest turns the
    Triton interpreter on for the whole process, which would run every Triton GPU test on the CPU."""
    assert os.environ.get("TRITON_INTERPRET") != "1"


SECOND_TORCH = "2.13.0"  # the CPU wheel (on the CPU machines' local wheel index: an offline install)
PROBE = ("import json, sys, torch; from vtattn import _ext; "
         "print(json.dumps({'reason': _ext.load(), 'path': _ext.location()[0], 'torch': torch.__version__, "
         "'built_for': _ext.build_info().get('torch'), 'cpu_attention': _ext.has_kernel('attention', 'cpu')}))")


def _run(cmd, **kwargs):
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    out = subprocess.run(cmd, cwd=ROOT, env={**env, **kwargs.pop("env", {})}, capture_output=True, text=True,
                         **kwargs)
    assert out.returncode == 0, f"{' '.join(map(str, cmd))} failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
    return out.stdout


@pytest.mark.slow
@pytest.mark.skipif(_ext.checkout_root() is None, reason="needs the checkout vtattn is imported from")
def test_second_environment_keeps_to_itself():
    """Installing this checkout into a second venv with another torch (CPU-only build, regular then
    editable install) leaves this environment's `vtattn info` as it was, and both load their own
    compiled kernels; a build without --no-build-isolation stops and says why. The venv and its
    build stay under build/ for the next run: the first run installs torch 2.13 and builds the 10 CPU
    files (2 min on the idle 2-core CPU machine), later ones take ~25 s."""
    venv = ROOT / "build" / "second-env"
    python = venv / "bin" / "python"
    t0 = time.monotonic()
    before = _run([sys.executable, "-m", "vtattn", "info"])
    if not python.exists():
        _run([sys.executable, "-m", "venv", "--clear", str(venv)])
    have = subprocess.run([python, "-c", "import torch; print(torch.__version__)"], capture_output=True, text=True)
    if have.stdout.strip() != f"{SECOND_TORCH}+cpu":
        _run([python, "-m", "pip", "install", "-q", f"torch=={SECOND_TORCH}", "numpy", "setuptools", "wheel", "ninja"])
    build_env = {"VTATTN_SKIP_CUDA": "1", "VTATTN_REQUIRE_CUDA": "0", "MAX_JOBS": str(os.cpu_count() or 2)}
    for editable in ([], ["-e"]):
        _run([python, "-m", "pip", "install", "-q", "--no-build-isolation", "--no-deps", *editable, "."], env=build_env)
        second = json.loads(_run([python, "-c", PROBE]).strip().splitlines()[-1])
        assert second["reason"] is None and second["cpu_attention"] is None, second
        assert second["torch"] == second["built_for"] == f"{SECOND_TORCH}+cpu"
        assert second["path"] != _ext.location()[0]
        expect = str(venv) if not editable else str(ROOT / "build" / "env")
        assert second["path"].startswith(expect), (second["path"], expect)
    # Forgetting --no-build-isolation: pip's isolated build environment has no torch; setup.py says so.
    isolated = subprocess.run([python, "-m", "pip", "install", "--no-deps", "."], cwd=ROOT, capture_output=True,
                              text=True, env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"})
    assert isolated.returncode != 0 and "pip install --no-build-isolation" in isolated.stdout + isolated.stderr
    after = _run([sys.executable, "-m", "vtattn", "info"])
    assert after == before
    first = json.loads(_run([sys.executable, "-c", PROBE]).strip().splitlines()[-1])
    assert first["reason"] is None and first["path"] == _ext.location()[0], first
    print(f"second environment: {time.monotonic() - t0:.0f} s")
