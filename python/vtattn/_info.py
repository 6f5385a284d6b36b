"""What was built, what loads from where, and which backend each op would use here (and why not others)."""
import importlib.metadata
import sys
from pathlib import Path
from typing import Any

import torch

from . import _dispatch, _env, _ext, _registry


def _version(pkg: str) -> str | None:
    try:
        return importlib.metadata.version(pkg)
    except importlib.metadata.PackageNotFoundError:
        return None


def info() -> dict[str, Any]:
    """Versions, where vtattn and its compiled part load from, the build's facts, the VTATTN_*
    environment variables, and for each op and device the backend chosen and why the others refuse."""
    devices = [("cpu", torch.float32)]
    if torch.cuda.is_available():
        devices.append(("cuda", torch.bfloat16))
    backends = {}
    for op, table in _registry.OPS.items():
        for device, dtype in devices:
            args = _registry.SAMPLES[op](device, dtype)
            answers = _dispatch.explain(table, args, op)
            try:
                chosen = _dispatch.choose(op, table, args)
            except _dispatch.BackendUnavailable as e:
                chosen = f"none ({e})"
            backends[f"{op}[{device},{str(dtype).removeprefix('torch.')}]"] = {
                "chosen": chosen, "refusals": {n: r for n, r in answers.items() if r}}
    reason = _ext.load()
    so, why = _ext.location()
    # the ops vtattn._C has a kernel for, as the dispatcher sees them ("any": a composite of other ops' kernels)
    compiled = {d: [op for op in _registry.OPS if _ext.has_kernel(op, d) is None] for d in ("cpu", "cuda", "any")}
    return {
        "vtattn": _ext.build_info().get("version") or _version("vtattn"),
        "vtattn_path": str(Path(__file__).resolve().parent),
        "python": f"{sys.version.split()[0]} ({sys.prefix})",
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "triton": _version("triton"),
        "transformers": _version("transformers"),
        "cuda_device": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "compiled_kernels": reason or "loaded",
        "compiled_path": f"{so} ({why})" if so else None,
        "compiled_ops": None if reason else compiled,
        "cpu_tile_level": None if reason else torch.ops.vtattn_C.cpu_tile_level(),
        "build": _ext.build_info(),
        "forced_backend": _dispatch.forced_backend(),
        "environment": _env.table(),
        "backends": backends,
    }
