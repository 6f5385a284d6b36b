"""Build vtattn._C: C++ CPU kernels always, CUDA kernels when torch has CUDA and a CUDA toolkit is found.
Only the extension: the package's metadata and layout are in pyproject.toml.

    pip install --no-build-isolation -e .     (or without -e: a regular install)

Environment (python/vtattn/_env.py describes every VTATTN_* variable):
  VTATTN_SKIP_CUDA=1         build the CPU kernels only
  VTATTN_CUDA_ARCHS="80;90a" CUDA targets (semicolon or comma separated)
  VTATTN_REQUIRE_CUDA=1      fail instead of building CPU-only when the CUDA part cannot be built (CI)
  CUDA_HOME                  the CUDA toolkit (default: torch's discovery, which follows nvcc on PATH)
  MAX_JOBS                   parallel compile jobs (read by torch's ninja build)

Each Python environment and torch builds in its own directory, build/env/<env>/<python>-torch<v>/
(vtattn/_ext.py: env_build_dir): ninja recompiles only what changed there, and an editable
install's _C*.so lives there too, so environments sharing this checkout never affect each other.
The build's facts are compiled into _C (csrc/build_info.cpp); nothing is written into the sources.
"""
import glob
import importlib.util
import json
import logging
import os
import shutil
import site
import subprocess
import sys
import sysconfig
from pathlib import Path

from setuptools import find_packages, setup

ROOT = Path(__file__).resolve().parent
# Seconds one file takes to compile on one core of the 2-core CPU machine (measured): the estimate.
COST_CPP, COST_CU_PER_ARCH = 25, 30


def say(msg):
    print(f"vtattn: {msg}", file=sys.stderr, flush=True)


def _ext_module():
    """python/vtattn/_ext.py, loaded by path: the one definition of the build directory and stamp (and,
    as its `_env`, python/vtattn/_env.py: the environment variables)."""
    spec = importlib.util.spec_from_file_location("_vtattn_ext", ROOT / "python" / "vtattn" / "_ext.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _git_commit():
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT,
                             capture_output=True, text=True, timeout=10)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _check_torch_is_the_environments(torch):
    """pip's build isolation installs a second torch to build against: an extension built against
    it does not load in the environment (or silently differs). Refuse unless the versions agree."""
    here = Path(torch.__file__).resolve().parent.parent
    sites = {Path(p).resolve() for p in site.getsitepackages() + [site.getusersitepackages()]
             + [sysconfig.get_paths()[k] for k in ("purelib", "platlib")]}
    if here in sites:
        return
    from importlib.metadata import distributions
    installed = next((d.version for d in distributions(path=[str(p) for p in sites])
                      if (d.metadata["Name"] or "").lower() == "torch"), None)
    if installed and installed.split("+")[0] == torch.__version__.split("+")[0]:
        say(f"building against torch {torch.__version__} from {here} (not this environment's own copy, "
            "same version); --no-build-isolation spares that second torch")
        return
    sys.exit(f"vtattn: setup.py sees torch {torch.__version__} from {here}, but this environment "
             f"({sys.prefix}) has {'torch ' + installed if installed else 'no torch'}: pip's build isolation "
             "installed a torch of its own to build against, and an extension built against it would not load "
             "here. Build against the environment's torch:\n"
             "    pip install --no-build-isolation -e .      (or: pip install --no-build-isolation .)")


def _cuda_home_problems(home):
    """What a CUDA toolkit at `home` lacks for this build (nvcc, headers, cudart): [] when complete."""
    home = Path(home)
    wanted = {"bin/nvcc": [home / "bin" / "nvcc"],
              "include/cuda_runtime.h": [home / "include" / "cuda_runtime.h"],
              "lib64/libcudart.so": [home / "lib64" / "libcudart.so", home / "lib" / "libcudart.so"]}
    return [name for name, paths in wanted.items() if not any(p.exists() for p in paths)]


def _nvcc_major(home):
    try:
        out = subprocess.run([str(Path(home, "bin", "nvcc")), "--version"], capture_output=True, text=True,
                             timeout=60).stdout
        return out.rsplit("release ", 1)[1].split(".")[0]
    except (OSError, subprocess.SubprocessError, IndexError):
        return None


def _cuda_plan(torch, cpp_extension, archs, env):
    """(CUDA home to build with, or None and why the CUDA kernels are skipped)."""
    if env.flag("VTATTN_SKIP_CUDA"):
        return None, "VTATTN_SKIP_CUDA=1"
    if torch.version.cuda is None:
        return None, f"torch {torch.__version__} is a CPU build"
    home = cpp_extension.CUDA_HOME  # torch's discovery: $CUDA_HOME / $CUDA_PATH, nvcc on PATH, /usr/local/cuda
    how = ("$CUDA_HOME" if os.environ.get("CUDA_HOME") else "$CUDA_PATH" if os.environ.get("CUDA_PATH")
           else f"nvcc on PATH is {shutil.which('nvcc')}" if shutil.which("nvcc") else "the default location")
    if home is None:
        return None, "no CUDA toolkit found (set CUDA_HOME to one)"
    missing = _cuda_home_problems(home)
    if missing:
        hint = ""
        if Path(home) != Path("/usr/local/cuda") and not _cuda_home_problems("/usr/local/cuda"):
            hint = "; /usr/local/cuda has a complete toolkit: set CUDA_HOME=/usr/local/cuda"
        return None, f"torch's CUDA home {home} ({how}) lacks {', '.join(missing)}{hint}"
    major = _nvcc_major(home)
    if major != torch.version.cuda.split(".")[0]:
        return None, f"nvcc in {home} is CUDA {major or '?'}, torch {torch.__version__} needs CUDA {torch.version.cuda}"
    if not any(Path(d, "cublas_v2.h").exists() for d in [Path(home) / "include"] + _nvidia_include_dirs()):
        return None, (f"ATen's CUDA headers need cublas_v2.h: neither {home}/include nor the nvidia-* pip "
                      "packages' include directories have it")
    if not archs:
        return None, "VTATTN_CUDA_ARCHS names no target"
    return home, ""


def _nvidia_include_dirs():
    # ATen's CUDA headers include cublas/cusparse headers that torch's pip
    # dependencies ship under site-packages/nvidia/*/include.
    dirs = []
    for p in map(Path, sys.path):
        for inc in sorted(glob.glob(str(p / "nvidia" / "*" / "include"))):
            if inc not in dirs:
                dirs.append(inc)
    return dirs


def _gencode(archs):
    return [f for a in archs for f in ("-gencode", f"arch=compute_{a},code=sm_{a}")]


def _write_if_changed(path, text):
    """Rewriting an unchanged file would make ninja recompile what includes it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if not path.exists() or path.read_text() != text:
        path.write_text(text)


def _estimate(sources, temp, n_archs, flags):
    """(files to compile, seconds): every file when the flags changed since the last build, else
    those the last build's ninja file would rebuild (a dry run: ninja knows each object's headers)
    and those without an object."""
    todo = {src for src in sources if not (Path(temp) / Path(src).with_suffix(".o")).exists()}
    last = Path(temp) / "vtattn_flags.json"
    if not last.exists() or last.read_text() != flags:
        todo = set(sources)
    elif (Path(temp) / "build.ninja").exists():
        try:
            out = subprocess.run(["ninja", "-C", str(temp), "-n", "-v"], capture_output=True, text=True,
                                 timeout=60).stdout
            todo |= {src for src in sources for line in out.splitlines() if line.rstrip().endswith(src)
                     or f" {ROOT / src} " in line}
        except (OSError, subprocess.SubprocessError):
            todo = set(sources)
    seconds = sum(COST_CU_PER_ARCH * n_archs if s.endswith(".cu") else COST_CPP for s in todo)
    cores = os.cpu_count() or 1
    return len(todo), seconds / min(int(os.environ.get("MAX_JOBS") or cores), cores)


def _check_packages(listed):
    """pyproject.toml lists the packages (the Triton kernels live outside python/): every package
    directory must be in that list, or an install would silently lack it."""
    found = {f"vtattn.{p}" for p in find_packages(str(ROOT / "python" / "vtattn"))}
    missing = sorted(found - set(listed or ()))
    if missing:
        sys.exit(f"vtattn: pyproject.toml's [tool.setuptools] packages lacks {', '.join(missing)}: add them")


def main():
    try:
        import torch
    except ImportError:
        sys.exit("vtattn: setup.py cannot import torch. vtattn builds against the environment's own torch "
                 "(2.11 or newer): install torch first, then build without pip's build isolation, which hides it:\n"
                 "    pip install --no-build-isolation -e .      (or: pip install --no-build-isolation .)")
    # torch's CUDA discovery logs "No CUDA runtime is found" on a machine without a GPU: expected here.
    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
    from torch.utils import cpp_extension

    _check_torch_is_the_environments(torch)
    ext_tools = _ext_module()
    build = ext_tools.env_build_dir(ROOT)
    temp = build / "temp"
    archs = ext_tools.cuda_archs()
    cuda_home, skip_reason = _cuda_plan(torch, cpp_extension, archs, ext_tools._env)
    if cuda_home is None and ext_tools._env.flag("VTATTN_REQUIRE_CUDA"):
        sys.exit(f"vtattn: VTATTN_REQUIRE_CUDA=1 but the CUDA kernels cannot be built: {skip_reason}")

    cpp_sources = ["csrc/ops.cpp", "csrc/build_info.cpp"] + sorted(glob.glob("csrc/cpu/*.cpp"))
    cu_sources = sorted(glob.glob("csrc/cuda/*.cu")) if cuda_home else []
    facts = {
        "version": None,  # the distribution's (pyproject.toml), known when building
        "git_commit": _git_commit(),
        "sources": ext_tools.source_stamp(ROOT),
        "python": sys.version.split()[0],
        "environment": sys.prefix,
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "with_cuda": cuda_home is not None,
        "cuda_skip_reason": skip_reason,
        "cuda_home": cuda_home,
        "cuda_archs": archs if cuda_home else [],
        "cuda_sources": [Path(s).stem for s in cu_sources],  # files; `vtattn info`'s compiled_ops lists ops
        "cpu_sources": [Path(s).stem for s in cpp_sources if "/cpu/" in s],
    }
    # No -std flag: torch picks the standard its headers need (C++20 from 2.14 on).
    cxx_flags = ["-O3", "-fopenmp"]
    include_dirs = [str(ROOT / "csrc" / "include"), str(temp / "include")]
    if cuda_home:
        os.environ["CUDA_HOME"] = cuda_home  # what torch found and checked above, for its nvcc calls
        # nvcc through scripts/nvcc_record.sh: ptxas's registers and static shared memory of every kernel go
        # to build/ptxas/ for `python -m vtattn.check_launches` (a PYTORCH_NVCC of your own, ccache, wins).
        if (ROOT / "scripts" / "nvcc_record.sh").exists():
            os.environ.setdefault("PYTORCH_NVCC", str(ROOT / "scripts" / "nvcc_record.sh"))
        nvcc_flags = ["-O3", "--use_fast_math", "-lineinfo", "--expt-relaxed-constexpr",
                      "-U__CUDA_NO_HALF_OPERATORS__", "-U__CUDA_NO_HALF_CONVERSIONS__",
                      "-U__CUDA_NO_BFLOAT16_OPERATORS__", "-U__CUDA_NO_BFLOAT16_CONVERSIONS__"]
        ext = cpp_extension.CUDAExtension(
            "vtattn._C", cpp_sources + cu_sources, include_dirs=include_dirs + _nvidia_include_dirs(),
            extra_compile_args={"cxx": cxx_flags + ["-DVTATTN_WITH_CUDA"], "nvcc": nvcc_flags + _gencode(archs)},
            extra_link_args=["-fopenmp"])
    else:
        ext = cpp_extension.CppExtension("vtattn._C", cpp_sources, include_dirs=include_dirs,
                                         extra_compile_args={"cxx": cxx_flags}, extra_link_args=["-fopenmp"])

    class BuildExt(cpp_extension.BuildExtension):
        """Objects in this environment's build directory (an editable install would use a fresh
        temporary one: no incremental build); an editable / --inplace build's _C goes there too."""

        def build_extensions(self):
            _check_packages(self.distribution.packages)
            facts["version"] = self.distribution.get_version()
            _write_if_changed(temp / "include" / "vtattn_build_info.h",
                              "// Written by setup.py: this build's facts (csrc/build_info.cpp returns them).\n"
                              f'#define VTATTN_BUILD_INFO R"vtattn({json.dumps(facts)})vtattn"\n')
            # Said here, not above: pip runs setup.py for its metadata too, where nothing is built.
            if cuda_home is None:
                say(f"building the CPU kernels only: {skip_reason}")
            flags = json.dumps([ext.sources, ext.include_dirs, ext.extra_compile_args])
            todo, seconds = _estimate(cpp_sources + cu_sources, temp, len(archs) if cuda_home else 0, flags)
            say(f"building in {build} ({'CPU + CUDA ' + ','.join(archs) if cuda_home else 'CPU only'}, torch "
                f"{torch.__version__}): {todo} of {len(cpp_sources) + len(cu_sources)} files to compile"
                + (f", ~{max(1, round(seconds / 60))} min on {os.cpu_count()} idle cores" if todo else ", then link"))
            (temp / "vtattn_flags.json").write_text(flags)  # next time: ninja's file of this build knows
            super().build_extensions()

        def finalize_options(self):
            super().finalize_options()
            self.build_temp = str(temp)
            self.force = True  # ninja decides what to recompile; setuptools' own check ignores flags

        def copy_extensions_to_source(self):
            for e in self.extensions:
                built = Path(self.build_lib, self.get_ext_filename(self.get_ext_fullname(e.name)))
                dest = build / "vtattn" / built.name
                dest.parent.mkdir(parents=True, exist_ok=True)
                # A new file renamed over the old: a process that has the old one loaded keeps it intact.
                shutil.copyfile(built, dest.with_suffix(".tmp"))
                os.replace(dest.with_suffix(".tmp"), dest)
                say(f"built {dest}")

    setup(  # metadata, packages and dependencies: pyproject.toml
        ext_modules=[ext],
        cmdclass={"build_ext": BuildExt.with_options(use_ninja=True)},
        options={"build": {"build_base": str(build)}},  # a regular install's build/lib: per environment too
    )


if __name__ == "__main__":
    main()
