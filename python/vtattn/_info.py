"""What was built, what loads, and which backend each op would use here (and why not others)."""
import importlib.metadata
import sys

import torch

from . import _dispatch, _ext, _registry


def _version(pkg):
    try:
        return importlib.metadata.version(pkg)
    except importlib.metadata.PackageNotFoundError:
        return None


def info() -> dict:
    devices = [("cpu", torch.float32)]
    if torch.cuda.is_available():
        devices.append(("cuda", torch.bfloat16))
    backends = {}
    for op, table in _registry.OPS.items():
        for device, dtype in devices:
            args = _registry.SAMPLES[op](device, dtype)
            answers = _dispatch.explain(table, args)
            try:
                chosen = _dispatch.choose(op, table, args)
            except _dispatch.BackendUnavailable as e:
                chosen = f"none ({e})"
            backends[f"{op}[{device},{str(dtype).removeprefix('torch.')}]"] = {
                "chosen": chosen, "refusals": {n: r for n, r in answers.items() if r}}
    return {
        "vtattn": _ext.build_info().get("version") or _version("vtattn"),
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "triton": _version("triton"),
        "transformers": _version("transformers"),
        "cuda_device": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "build": _ext.build_info(),
        "compiled_kernels": _ext.load() or "loaded",
        "forced_backend": _dispatch.forced_backend(),
        "backends": backends,
    }
