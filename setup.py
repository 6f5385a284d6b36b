"""Build vtattn._C: C++ CPU kernels always, CUDA kernels when torch has CUDA and nvcc is found.

Environment:
  VTATTN_SKIP_CUDA=1        build the CPU kernels only
  VTATTN_CUDA_ARCHS="80;90a" CUDA targets (semicolon or comma separated)
  VTATTN_REQUIRE_CUDA=1     fail instead of skipping when the CUDA part cannot be built (CI)
  MAX_JOBS                  parallel compile jobs (read by torch's ninja build)
"""
import glob
import os
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import find_packages, setup

ROOT = Path(__file__).resolve().parent
VERSION = "0.1.0"


def _git_commit():
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT,
                             capture_output=True, text=True, timeout=10)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _cuda_home():
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if home:
        return home
    nvcc = shutil.which("nvcc")
    if nvcc:
        return str(Path(nvcc).resolve().parent.parent)
    return "/usr/local/cuda" if Path("/usr/local/cuda/bin/nvcc").exists() else None


def _cuda_plan(torch):
    """(build_cuda, reason, archs)."""
    archs = [a.strip() for a in os.environ.get("VTATTN_CUDA_ARCHS", "80;90a").replace(",", ";").split(";")
             if a.strip()]
    if os.environ.get("VTATTN_SKIP_CUDA") == "1":
        return False, "VTATTN_SKIP_CUDA=1", archs
    if torch.version.cuda is None:
        return False, f"torch {torch.__version__} is a CPU build", archs
    home = _cuda_home()
    if home is None or not Path(home, "bin", "nvcc").exists():
        return False, "nvcc not found (set CUDA_HOME)", archs
    # torch's cpp_extension reads CUDA_HOME at import; pin it before importing.
    os.environ["CUDA_HOME"] = home
    return True, "", archs


def _nvidia_include_dirs():
    # ATen's CUDA headers include cublas/cusparse headers that torch's pip
    # dependencies ship under site-packages/nvidia/*/include (see ENV.md).
    dirs = []
    for p in map(Path, sys.path):
        for inc in glob.glob(str(p / "nvidia" / "*" / "include")):
            if inc not in dirs:
                dirs.append(inc)
    return dirs


def _gencode(archs):
    return [f for a in archs for f in ("-gencode", f"arch=compute_{a},code=sm_{a}")]


def _write_build_info(info):
    path = ROOT / "python" / "vtattn" / "_build_info.py"
    path.write_text("# Written by setup.py at build time.\nBUILD_INFO = " + repr(info) + "\n")


def main():
    import torch
    from torch.utils.cpp_extension import BuildExtension, CppExtension

    build_cuda, skip_reason, archs = _cuda_plan(torch)
    if not build_cuda and os.environ.get("VTATTN_REQUIRE_CUDA") == "1":
        sys.exit(f"vtattn: VTATTN_REQUIRE_CUDA=1 but the CUDA kernels cannot be built: {skip_reason}")

    cpp_sources = ["csrc/ops.cpp"] + sorted(glob.glob("csrc/cpu/*.cpp"))
    cu_sources = sorted(glob.glob("csrc/cuda/*.cu")) if build_cuda else []
    # No -std flag: torch picks the standard its headers need (C++20 from 2.14 on).
    cxx_flags = ["-O3", "-fopenmp"]
    include_dirs = [str(ROOT / "csrc" / "include")]

    if build_cuda:
        from torch.utils.cpp_extension import CUDAExtension
        nvcc_flags = ["-O3", "--use_fast_math", "-lineinfo", "--expt-relaxed-constexpr",
                      "-U__CUDA_NO_HALF_OPERATORS__", "-U__CUDA_NO_HALF_CONVERSIONS__",
                      "-U__CUDA_NO_BFLOAT16_OPERATORS__", "-U__CUDA_NO_BFLOAT16_CONVERSIONS__"]
        ext = CUDAExtension("vtattn._C", cpp_sources + cu_sources,
                            include_dirs=include_dirs + _nvidia_include_dirs(),
                            extra_compile_args={"cxx": cxx_flags + ["-DVTATTN_WITH_CUDA"],
                                                "nvcc": nvcc_flags + _gencode(archs)},
                            extra_link_args=["-fopenmp"])
    else:
        ext = CppExtension("vtattn._C", cpp_sources, include_dirs=include_dirs,
                           extra_compile_args={"cxx": cxx_flags}, extra_link_args=["-fopenmp"])

    _write_build_info({
        "version": VERSION,
        "git_commit": _git_commit(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "with_cuda": build_cuda,
        "cuda_skip_reason": skip_reason,
        "cuda_archs": archs if build_cuda else [],
        "cuda_kernels": [Path(s).stem for s in cu_sources],
        "cpu_kernels": [Path(s).stem for s in cpp_sources if "cpu" in s],
    })

    setup(
        name="vtattn",
        version=VERSION,
        description="Fused kernels for visual-token attention, selection and KV-cache compression in VLMs",
        package_dir={"vtattn": "python/vtattn", "vtattn.triton_kernels": "triton_kernels"},
        packages=["vtattn", "vtattn.triton_kernels"]
        + [f"vtattn.{p}" for p in find_packages("python/vtattn")],
        ext_modules=[ext],
        cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
        python_requires=">=3.10",
        install_requires=["torch>=2.11"],
        extras_require={"triton": ["triton>=3.6"], "test": ["pytest", "pytest-benchmark", "numpy"],
                        "bench": ["tqdm", "matplotlib"], "hf": ["transformers>=5.17"]},
        entry_points={"console_scripts": ["vtattn-bench=vtattn.bench.__main__:main"]},
        zip_safe=False,
    )


if __name__ == "__main__":
    main()
