"""Finding and loading vtattn._C: once, lazily, never failing the import of vtattn.

Where a build lives:
- a regular install: beside the package (site-packages/vtattn/_C*.so), one per environment;
- an editable install (or `setup.py build_ext --inplace`) of a checkout: under the checkout's
  build/env/<environment>/<python>-torch<version>/ (`env_build_dir`), one per Python environment
  and torch, so that environments sharing a checkout never overwrite each other's build.
Imported from a checkout, the loader takes this environment's build there, else a _C beside the
package (a prebuilt copy); installed, the one beside the package. A build's facts (torch, CUDA
targets, the hash of its sources) are compiled into it (csrc/build_info.cpp) and checked against
the running torch after loading; `location()` says which file was loaded and why.

setup.py loads this file by path (before vtattn is installed): from vtattn only its sibling _env.py,
which it then loads by path too."""
import functools
import hashlib
import importlib.machinery
import importlib.util
import json
import logging
import os
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import torch


def _load_by_path(name: str, path: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot load {path}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


try:
    from . import _env
except ImportError:  # loaded by path from setup.py: its sibling _env.py, by path too
    _env = _load_by_path("_vtattn_env", Path(__file__).with_name("_env.py"))

log = logging.getLogger("vtattn")

PACKAGE = Path(__file__).resolve().parent


def env_build_dir(root: Path) -> Path:
    """The checkout `root`'s build directory for this Python environment and torch: its ninja
    objects (temp/) and, for an editable install, its vtattn/_C*.so."""
    prefix = os.path.realpath(sys.prefix)
    tag = hashlib.sha256(prefix.encode()).hexdigest()[:8]
    return (Path(root) / "build" / "env" / f"{Path(prefix).name.lstrip('.') or 'env'}-{tag}"
            / f"{sys.implementation.cache_tag}-torch{torch.__version__}")


def source_stamp(root: Path) -> str:
    """Hash of what the compiled part is made of: csrc/ and setup.py (its flags)."""
    root = Path(root)
    files = sorted(p for p in (root / "csrc").rglob("*") if p.is_file()) + [root / "setup.py"]
    h = hashlib.sha256()
    for p in files:
        h.update(p.relative_to(root).as_posix().encode() + b"\0" + p.read_bytes() + b"\0")
    return h.hexdigest()[:16]


def checkout_root() -> Path | None:
    """The checkout vtattn is imported from (an editable install, PYTHONPATH=python), else None."""
    root = PACKAGE.parent.parent
    if PACKAGE.parent.name == "python" and (root / "setup.py").is_file() and (root / "csrc").is_dir():
        return root
    return None


def _rebuild() -> str:
    root = checkout_root()
    if root is None:
        return "rebuild: reinstall vtattn in this environment (pip install --no-build-isolation <its checkout>)"
    return f"rebuild for this environment: cd {root} && pip install --no-build-isolation -e ."


def _beside_package() -> Path | None:
    for suffix in importlib.machinery.EXTENSION_SUFFIXES:
        if (PACKAGE / f"_C{suffix}").is_file():
            return PACKAGE / f"_C{suffix}"
    return None


def _candidate() -> tuple[Path | None, str]:
    """(the _C file to load, why it is this one) or (None, why there is none)."""
    root = checkout_root()
    beside = _beside_package()
    if root is None:
        if beside:
            return beside, "installed with the package"
        return None, f"vtattn._C is not in {PACKAGE} (installed without its compiled part?)"
    build = env_build_dir(root)
    for suffix in importlib.machinery.EXTENSION_SUFFIXES:
        if (build / "vtattn" / f"_C{suffix}").is_file():
            return build / "vtattn" / f"_C{suffix}", f"this environment's build of the checkout {root}"
    if beside:
        return beside, f"no build of the checkout for this environment ({build}): the copy beside the package"
    others = sorted(str(p.relative_to(root)) for p in (root / "build" / "env").glob("*/*/vtattn"))
    return None, (f"vtattn._C is not built for this environment ({sys.prefix}, torch {torch.__version__}): "
                  f"{_rebuild()}" + (f" (builds for other environments: {', '.join(others)})" if others else ""))


def _read_facts() -> dict[str, Any]:
    """The loaded library's build facts ({} for a library built before they were recorded)."""
    try:
        facts: dict[str, Any] = json.loads(torch.ops.vtattn_C.build_info())
        return facts
    except (AttributeError, RuntimeError):
        return {}


_where: tuple[str | None, str] = (None, "not loaded yet")  # set by load()


def _load_library() -> tuple[str | None, str | None, str]:
    """(why the compiled ops are unavailable or None, the file loaded or tried, why that file)."""
    module = sys.modules.get("vtattn._C")
    if module is not None:  # loaded before (load() again after cache_clear) or imported directly
        path = Path(module.__file__ or "vtattn._C")
        why = _where[1] if _where[0] == str(path) else "imported directly"
    else:
        candidate, why = _candidate()
        if candidate is None:
            return why, None, why
        path = candidate
        spec = importlib.util.spec_from_file_location("vtattn._C", path)
        if spec is None:
            return f"{path} is not a loadable extension module: {_rebuild()}", str(path), why
        try:
            sys.modules["vtattn._C"] = importlib.util.module_from_spec(spec)  # dlopen: registers the ops
        except (ImportError, OSError) as e:
            return f"{path} failed to load ({e}); was it built for another torch? {_rebuild()}", str(path), why
    facts = _read_facts()
    if not facts:
        reason = f"{path} carries no build facts (built by an older setup.py): {_rebuild()}"
    elif facts.get("torch") != torch.__version__:
        # A C++ extension is tied to the exact torch ABI it was built against.
        reason = (f"{path} was built for torch {facts.get('torch')} but torch {torch.__version__} is running: "
                  f"{_rebuild()}")
    else:
        reason = None
    return reason, str(path), why


@functools.cache
def load() -> str | None:
    """Load the compiled ops; None when loaded, else the reason they are unavailable (logged once)."""
    global _where
    reason, path, why = _load_library()
    _where = (path, why)
    if reason:
        log.warning("vtattn: compiled kernels unavailable: %s", reason)
    return reason


def location() -> tuple[str | None, str]:
    """(the vtattn._C file loaded or tried, why that one)."""
    load()
    return _where


def build_info() -> dict[str, Any]:
    """The facts of the loaded vtattn._C (setup.py records them): {} when none is loaded."""
    return _read_facts() if location()[0] is not None else {}


def stale_reason(root: Path) -> str | None:
    """None when the loaded build can be reused for checkout `root` as the environment asks
    (VTATTN_SKIP_CUDA, VTATTN_CUDA_ARCHS, VTATTN_REQUIRE_CUDA), else why it must be rebuilt."""
    reason = load()
    if reason:
        return reason
    facts = build_info()
    if facts.get("sources") != source_stamp(root):
        return "the sources (csrc/, setup.py) changed since the last build"
    skip = _env.flag("VTATTN_SKIP_CUDA")
    if skip and facts["with_cuda"]:
        return "VTATTN_SKIP_CUDA=1 but the last build has CUDA kernels"
    if not skip and not facts["with_cuda"]:
        if _env.flag("VTATTN_REQUIRE_CUDA") or facts["cuda_skip_reason"] == "VTATTN_SKIP_CUDA=1":
            return f"the last build has no CUDA kernels ({facts['cuda_skip_reason']})"
    archs = cuda_archs()
    if facts["with_cuda"] and facts["cuda_archs"] != archs:
        return f"CUDA targets {archs} asked, the last build has {facts['cuda_archs']}"
    return None


def cuda_archs() -> list[str]:
    """VTATTN_CUDA_ARCHS ("80;90a", semicolons or commas) as a list; the default is sm_80 and sm_90a."""
    spec = _env.get("VTATTN_CUDA_ARCHS") or ""
    return [a.strip() for a in spec.replace(",", ";").split(";") if a.strip()]


def has_kernel(op: str, device_type: str) -> str | None:
    """None when the loaded vtattn._C has a `device_type` ("cpu" or "cuda") kernel for `op` ("any":
    one for every device, a composite of other ops' kernels), else why not. Asks the dispatcher, so
    a stale build record cannot mislead it."""
    reason = load()
    if reason:
        return reason
    key = "CompositeExplicitAutograd" if device_type == "any" else device_type.upper()
    try:
        found = torch._C._dispatch_has_kernel_for_dispatch_key(f"vtattn_C::{op}", key)
    except RuntimeError:  # the loaded library predates this op's schema
        found = False
    if found:
        return None
    info = build_info()
    if device_type == "cuda" and not info.get("with_cuda"):
        return f"vtattn._C was built without CUDA ({info.get('cuda_skip_reason')})"
    return f"vtattn._C has no {device_type} kernel for {op} (rebuild?)"
