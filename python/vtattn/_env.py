"""Every VTATTN_* environment variable, with its meaning and default: the one table.

Python reads them only through `get` / `flag` / `integer` here (an unknown name is a KeyError, so
a typo cannot read a variable nobody sets); the shell scripts read theirs directly and are listed
for completeness. `python -m vtattn info` prints the table with the values set now.

setup.py loads this file by path (before vtattn is installed): no imports from vtattn or torch here."""
import os
import sys
from typing import NamedTuple

_TRUE = ("1", "true", "yes", "on")


class Var(NamedTuple):
    name: str
    default: str | None  # None: unset means "off" / "automatic", as `meaning` says
    read_by: str  # "vtattn" (the package at run time), "setup.py" (the build) or the script that reads it
    meaning: str


VARS: dict[str, Var] = {v.name: v for v in (
    Var("VTATTN_BACKEND", None, "vtattn",
        "force one backend for every op (cuda, triton, aten, cpp, torch), as vtattn.use_backend(name); a forced "
        "backend that cannot run the inputs raises BackendUnavailable with its reason. Unset: automatic choice"),
    Var("VTATTN_STRICT", "0", "vtattn",
        "1: CUDA inputs that no CUDA / Triton kernel takes raise BackendUnavailable instead of running the "
        "pure-PyTorch reference with a warning"),
    Var("VTATTN_TRITON_AUTOTUNE", "1", "vtattn",
        "0: Triton kernels launch their first (default) config instead of autotuning over every config that fits "
        "the device (tests set it: tuning compiles every config for each new shape)"),
    Var("VTATTN_TRITON_CONFIG", None, "vtattn",
        "i: Triton kernels launch config i of their list (the last one when a kernel has fewer), without tuning; "
        "tests/test_triton_configs.py runs every i. Unset: autotuning (or VTATTN_TRITON_AUTOTUNE=0)"),
    Var("VTATTN_CPU_ISA", None, "vtattn (the C++ CPU kernels, at their first call)",
        "avx2 or baseline: cap the instruction set of the C++ CPU kernels' tile operations (tests run each level); "
        "another value is an error at the first call. Unset: the best this CPU runs, avx512 > avx2 > baseline "
        "(`python -m vtattn info` shows it as cpu_tile_level)"),
    Var("VTATTN_GIT_COMMIT", None, "vtattn, scripts/gpu_check.sh",
        "the commit a benchmark run records (python -m vtattn.bench), where the tree has no .git "
        "(the GPU machine). Unset: `git rev-parse`, else the build's commit"),
    Var("VTATTN_SKIP_CUDA", "0", "setup.py, vtattn build-check",
        "1: build the C++ CPU kernels only, even where the CUDA kernels could be built"),
    Var("VTATTN_REQUIRE_CUDA", "0", "setup.py, vtattn build-check",
        "1: fail the build instead of building CPU-only when the CUDA kernels cannot be built (scripts/setup_env.sh "
        "and test.sh default it to 1); `python -m vtattn build-check` then also rebuilds a CPU-only build"),
    Var("VTATTN_CUDA_ARCHS", "80;90a", "setup.py, vtattn build-check",
        "the CUDA targets to build (semicolon- or comma-separated)"),
    Var("VTATTN_VENV", ".venv", "scripts/setup_env.sh, test.sh, bench.sh", "the virtualenv the scripts create and use"),
    Var("VTATTN_VLLM_VENV", ".venv-vllm", "scripts/vllm_env.sh", "the virtualenv of the vLLM plugin's tests"),
    Var("VTATTN_TEST_OLDEST", "1", "scripts/test.sh",
        "0: skip the second run of the suites on the oldest supported versions (scripts/oldest_env.sh test)"),
    Var("VTATTN_TEST_VLLM", "1", "scripts/test.sh",
        "0: skip the vLLM plugin's suite (tests/vllm, in its own environment: scripts/vllm_env.sh)"),
    Var("VTATTN_NVCC", "$CUDA_HOME/bin/nvcc", "scripts/nvcc_record.sh",
        "the nvcc that the build's recording wrapper runs"),
    Var("VTATTN_PTXAS_DIR", "build/ptxas", "scripts/nvcc_record.sh",
        "where the build records ptxas's resource report of each object (python -m vtattn.check_launches reads it)"),
)}


def _var(name: str) -> Var:
    try:
        return VARS[name]
    except KeyError:
        raise KeyError(f"{name} is not a vtattn environment variable (python/vtattn/_env.py lists them)") from None


# os.environ keeps the values in its `_data` dict (CPython on POSIX: bytes keys and values). One look-up
# there costs what os.environ.get's four Python frames cost tens of times over, and the internal decode
# paths read VTATTN_BACKEND at every call (`_dispatch.Direct`); it sees every change made through
# os.environ (monkeypatch.setenv included). Elsewhere: os.environ.get.
_DATA: dict[bytes, bytes] | None = getattr(os.environ, "_data", None) if os.name == "posix" else None
_ENCODING = sys.getfilesystemencoding()
_KEYS = {name: name.encode() for name in VARS}  # (ASCII names)


def get(name: str) -> str | None:
    """The variable's value; its default when unset or empty."""
    if _DATA is not None:
        raw = _DATA.get(_KEYS.get(name) or _var(name).name.encode())
        value = None if raw is None else raw.decode(_ENCODING, "surrogateescape")
    else:
        value = os.environ.get(name)
    return value or _var(name).default


def flag(name: str) -> bool:
    """Whether the variable (or its default) says yes: 1, true, yes or on."""
    return (get(name) or "").strip().lower() in _TRUE


def integer(name: str) -> int | None:
    """The variable as an int; None when neither it nor a default is set."""
    value = get(name)
    if value is None:
        return None
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"{name} must be an integer, got {value!r}") from None


def table() -> dict[str, str]:
    """{name: "value (set) | default ... - meaning"} of every variable, for `vtattn info`."""
    out = {}
    for v in VARS.values():
        now = os.environ.get(v.name)
        value = f"{now!r} (set)" if now else f"unset (default {v.default})" if v.default else "unset"
        out[v.name] = f"{value}; read by {v.read_by}: {v.meaning}"
    return out
