"""Backend choice: each backend declares whether it supports the inputs and, if not, why."""
import os
from typing import Callable, NamedTuple

import torch

BACKENDS = ("aten", "cuda", "cpp", "triton", "torch")
# Fastest first; the reference ("torch") runs everything.
DEFAULT_ORDER = {"cuda": ("aten", "cuda", "triton", "torch"), "cpu": ("cpp", "torch")}


class BackendUnavailable(RuntimeError):
    """A forced backend cannot run the given inputs (the message says why)."""


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


def _device_kind(args) -> str:
    t = next(a for a in args if isinstance(a, torch.Tensor))
    return "cuda" if t.device.type == "cuda" else "cpu"


def explain(backends: dict[str, Backend], args) -> dict[str, str | None]:
    """Every backend's answer for these inputs, in default order (None = would run)."""
    order = DEFAULT_ORDER[_device_kind(args)]
    names = [n for n in order if n in backends] + [n for n in backends if n not in order]
    return {n: backends[n].supports(*args) for n in names}


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
    for name in DEFAULT_ORDER[_device_kind(args)]:
        if name in backends and backends[name].supports(*args) is None:
            return name
    raise BackendUnavailable(f"vtattn.{op}: no backend supports these inputs: {explain(backends, args)}")


def run(op: str, backends: dict[str, Backend], *args):
    return backends[choose(op, backends, args)].run(*args)
