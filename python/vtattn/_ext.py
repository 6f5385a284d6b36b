"""Loading vtattn._C: once, lazily, never failing the import of vtattn."""
import functools
import importlib
import logging

import torch

log = logging.getLogger("vtattn")


def build_info() -> dict:
    try:
        from ._build_info import BUILD_INFO
    except ImportError:
        return {}
    return dict(BUILD_INFO)


@functools.cache
def load() -> str | None:
    """Load the compiled ops; None when loaded, else the reason they are unavailable (logged once)."""
    info = build_info()
    if not info:
        reason = "vtattn._C was not built (pip install --no-build-isolation -e .)"
    elif info["torch"] != torch.__version__:
        # A C++ extension is tied to the exact torch ABI it was built against.
        reason = f"vtattn._C was built for torch {info['torch']} but torch {torch.__version__} is running; rebuild"
    else:
        try:
            importlib.import_module("vtattn._C")
            return None
        except (ImportError, OSError) as e:
            reason = f"vtattn._C failed to load: {e}"
    log.warning("vtattn: compiled kernels unavailable: %s", reason)
    return reason


def has_kernel(op: str, device_type: str) -> str | None:
    """None when the compiled `device_type` ("cpu" or "cuda") kernel of `op` loads, else why not."""
    reason = load()
    if reason:
        return reason
    info = build_info()
    if device_type == "cuda" and not info["with_cuda"]:
        return f"vtattn._C was built without CUDA ({info['cuda_skip_reason']})"
    if op not in info[f"{device_type}_kernels"]:
        return f"no compiled {device_type} kernel for {op}"
    return None
