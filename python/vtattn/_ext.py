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
    """None when the loaded vtattn._C has a `device_type` ("cpu" or "cuda") kernel for `op`,
    else why not. Asks the dispatcher, so a stale build record cannot mislead it."""
    reason = load()
    if reason:
        return reason
    try:
        found = torch._C._dispatch_has_kernel_for_dispatch_key(f"vtattn_C::{op}", device_type.upper())
    except RuntimeError:  # the loaded library predates this op's schema
        found = False
    if found:
        return None
    info = build_info()
    if device_type == "cuda" and not info.get("with_cuda"):
        return f"vtattn._C was built without CUDA ({info.get('cuda_skip_reason')})"
    return f"vtattn._C has no {device_type} kernel for {op} (rebuild?)"
