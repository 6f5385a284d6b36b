"""Backend choice: each backend declares whether it supports the inputs and, if not, why. The
order backends are tried in is data (vtattn/_dispatch_table.py, per op and CUDA architecture),
rewritten from a benchmark run by `python -m vtattn.bench --emit-dispatch`."""
import functools
import os
import warnings
from typing import Callable, NamedTuple

import torch

from . import _dispatch_table

BACKENDS = ("aten", "cuda", "cpp", "triton", "torch")


class BackendUnavailable(RuntimeError):
    """A forced backend cannot run the given inputs (the message says why)."""


class ReferenceFallbackWarning(UserWarning):
    """CUDA tensors ran on the pure-PyTorch reference: no kernel took the inputs (N x N memory)."""


class Backend(NamedTuple):
    supports: Callable[..., str | None]  # same arguments as run; None = can run, else the reason
    run: Callable


_forced: str | None = None
_UNSET = object()


def _check_name(name):
    if name is not None and name not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS} or None, got {name!r}")


def forced_backend() -> str | None:
    """The backend forced by use_backend(), else by VTATTN_BACKEND, else None (automatic)."""
    if _forced is not None:
        return None if _forced == "auto" else _forced
    name = os.environ.get("VTATTN_BACKEND") or None
    _check_name(name)
    return name


class use_backend:
    """Force one backend for every vtattn op: `vtattn.use_backend("triton")` for the rest of the
    program, or `with vtattn.use_backend("triton"): ...` for a block. None restores automatic
    choice (overriding VTATTN_BACKEND)."""

    def __init__(self, name: str | None):
        global _forced
        _check_name(name)
        self._previous = _forced
        _forced = "auto" if name is None else name

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        global _forced
        _forced = self._previous


@functools.cache
def _arch(index: int) -> str:
    major, minor = torch.cuda.get_device_capability(index)
    return f"sm_{major}{minor}"


def _device_key(args) -> str:
    """"cpu", or the architecture of the CUDA tensors' device ("sm_90")."""
    t = next(a for a in args if isinstance(a, torch.Tensor))
    if t.device.type != "cuda":
        return "cpu"
    return _arch(t.device.index if t.device.index is not None else torch.cuda.current_device())


def order(op: str, key: str, table: dict | None = None) -> tuple:
    """Backends to try for `op` on a device key ("cpu", "cuda" or "sm_90"), fastest first."""
    table = _dispatch_table.ORDER if table is None else table
    for k in (key, "cpu" if key == "cpu" else "cuda"):
        rows = table.get(k, {})
        if op in rows or "*" in rows:
            return tuple(rows.get(op, rows.get("*")))
    raise KeyError(f"the dispatch table has no order for {op} on {key}")


def _ordered(op: str, backends: dict[str, Backend], key: str) -> list[str]:
    """The op's backends in dispatch order; any the table does not name go just before the reference."""
    first = [n for n in order(op, key) if n in backends and n != "torch"]
    return first + [n for n in backends if n not in first and n != "torch"] + ["torch"] * ("torch" in backends)


def explain(backends: dict[str, Backend], args, op: str = "*") -> dict[str, str | None]:
    """Every backend's answer for these inputs, in dispatch order (None = would run)."""
    return {n: backends[n].supports(*args) for n in _ordered(op, backends, _device_key(args))}


_warned: set = set()


def _strict() -> bool:
    return os.environ.get("VTATTN_STRICT", "0").strip().lower() in ("1", "true", "yes", "on")


def _fell_back(op: str, refusals: dict[str, str]):
    """CUDA inputs reached the reference: raise under VTATTN_STRICT=1, else warn once per (op, reasons)."""
    reasons = "; ".join(f"{n}: {r}" for n, r in refusals.items())
    message = (f"vtattn.{op}: no CUDA/Triton kernel takes these inputs, so the pure-PyTorch reference runs them "
               f"(N x N memory, slow): {reasons}. `python -m vtattn info` shows each backend's answer; "
               "VTATTN_STRICT=1 makes this an error.")
    if _strict():
        raise BackendUnavailable(message)
    if (op, reasons) not in _warned:
        _warned.add((op, reasons))
        warnings.warn(message, ReferenceFallbackWarning, stacklevel=2)


def choose(op: str, backends: dict[str, Backend], args) -> str:
    forced = forced_backend()
    if forced is not None:
        if forced not in backends:
            raise BackendUnavailable(f"vtattn.{op}: there is no {forced!r} backend for this op "
                                     f"(it has {sorted(backends)})")
        reason = backends[forced].supports(*args)
        if reason is not None:
            raise BackendUnavailable(f"vtattn.{op}: backend {forced!r} cannot run these inputs: {reason}")
        return forced
    key = _device_key(args)
    refusals = {}
    for name in _ordered(op, backends, key):
        reason = backends[name].supports(*args)
        if reason is None:
            if name == "torch" and key != "cpu":
                _fell_back(op, refusals)
            return name
        refusals[name] = reason
    raise BackendUnavailable(f"vtattn.{op}: no backend supports these inputs: {explain(backends, args, op)}")


def run(op: str, backends: dict[str, Backend], *args):
    return backends[choose(op, backends, args)].run(*args)
