"""What CI can prove without a GPU: the CUDA kernels compiled and linked for every target."""
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from vtattn import _ext

REQUIRE_CUDA = os.environ.get("VTATTN_REQUIRE_CUDA") == "1"
CSRC = Path(__file__).resolve().parents[1] / "csrc"
CPU_KERNELS = sorted(p.stem for p in CSRC.glob("cpu/*.cpp"))
CUDA_KERNELS = sorted(p.stem for p in CSRC.glob("cuda/*.cu"))


def test_build_info_recorded():
    """Every CPU kernel in the tree was built and registered."""
    info = _ext.build_info()
    assert info, "vtattn._C was not built"
    assert info["torch"] == torch.__version__
    assert _ext.load() is None
    assert sorted(info["cpu_kernels"]) == CPU_KERNELS
    for op in CPU_KERNELS:
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"vtattn_C::{op}", "CPU"), op


@pytest.mark.skipif(not REQUIRE_CUDA, reason="only when the build must include CUDA (CI)")
def test_cuda_kernels_were_built_and_registered():
    info = _ext.build_info()
    assert info["with_cuda"], f"CUDA part skipped: {info['cuda_skip_reason']}"
    assert sorted(info["cuda_kernels"]) == CUDA_KERNELS
    for op in CUDA_KERNELS:
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"vtattn_C::{op}", "CUDA"), op


@pytest.mark.skipif(not REQUIRE_CUDA, reason="only when the build must include CUDA (CI)")
def test_binary_holds_sm80_and_sm90a_code():
    cuobjdump = shutil.which("cuobjdump") or "/usr/local/cuda/bin/cuobjdump"
    if not os.path.exists(cuobjdump):
        pytest.skip("cuobjdump not found")
    import vtattn._C as C
    listing = subprocess.run([cuobjdump, "--list-elf", C.__file__], check=True,
                             capture_output=True, text=True).stdout
    for arch in _ext.build_info()["cuda_archs"]:
        assert f"sm_{arch}" in listing, f"no sm_{arch} code in {C.__file__}:\n{listing}"
    assert {"80", "90a"} <= set(_ext.build_info()["cuda_archs"])


@pytest.mark.parametrize("run", ["cpu", pytest.param("gpu", marks=pytest.mark.gpu)])
def test_the_interpreter_suite_stays_out_of_other_runs(run):
    """`pytest tests` (the CPU run, and `-m gpu`) leaves tests/interpreter out: its conftest turns the
    Triton interpreter on for the whole process, which would run every Triton GPU test on the CPU."""
    assert os.environ.get("TRITON_INTERPRET") != "1"
