"""Backend choice: each backend declares whether it supports the inputs and, if not, why. The
order backends are tried in is data (vtattn/_dispatch_table.py, per op and CUDA architecture),
rewritten from a benchmark run by `python -m vtattn.bench --emit-dispatch`."""
import functools
import warnings
from collections.abc import Callable, Hashable, Mapping, Sequence
from typing import Any, Generic, NamedTuple, TypeVar

import torch

from . import _dispatch_table, _env

BACKENDS = ("aten", "cuda", "cpp", "triton", "torch")


class BackendUnavailable(RuntimeError):
    """A forced backend cannot run the given inputs (the message says why)."""


class ReferenceFallbackWarning(UserWarning):
    """CUDA tensors ran on the pure-PyTorch reference: no kernel took the inputs (N x N memory)."""


class Backend(NamedTuple):
    supports: Callable[..., str | None]  # same arguments as run; None = can run, else the reason
    run: Callable[..., Any]
    # the vtattn._C op that `run` is exactly (same arguments and result), or None: a compiled graph may
    # call that op itself instead of the public op's Python dispatch (`Direct.prepare`)
    kernel: str | None = None


_forced: str | None = None


def _check_name(name: str | None) -> None:
    if name is not None and name not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS} or None, got {name!r}")


def forced_backend() -> str | None:
    """The backend forced by use_backend(), else by VTATTN_BACKEND, else None (automatic)."""
    if _forced is not None:
        return None if _forced == "auto" else _forced
    name = _env.get("VTATTN_BACKEND")
    _check_name(name)
    return name


class use_backend:
    """Force one backend for every vtattn op: `vtattn.use_backend("triton")` for the rest of the
    program, or `with vtattn.use_backend("triton"): ...` for a block. None restores automatic
    choice (overriding VTATTN_BACKEND)."""

    def __init__(self, name: str | None) -> None:
        global _forced
        _check_name(name)
        self._previous = _forced
        _forced = "auto" if name is None else name

    def __enter__(self) -> "use_backend":
        return self

    def __exit__(self, *exc: object) -> None:
        global _forced
        _forced = self._previous


@functools.cache
def _arch(index: int) -> str:
    major, minor = torch.cuda.get_device_capability(index)
    return f"sm_{major}{minor}"


def _device_key(args: Sequence[object]) -> str:
    """"cpu", or the architecture of the CUDA tensors' device ("sm_90")."""
    t = next(a for a in args if isinstance(a, torch.Tensor))
    if t.device.type != "cuda":
        return "cpu"
    return _arch(t.device.index if t.device.index is not None else torch.cuda.current_device())


def order(op: str, key: str, table: Mapping[str, Mapping[str, tuple[str, ...]]] | None = None) -> tuple[str, ...]:
    """Backends to try for `op` on a device key ("cpu", "cuda" or "sm_90"), fastest first."""
    table = _dispatch_table.ORDER if table is None else table
    for k in (key, "cpu" if key == "cpu" else "cuda"):
        rows = table.get(k, {})
        if op in rows or "*" in rows:
            return tuple(rows[op] if op in rows else rows["*"])
    raise KeyError(f"the dispatch table has no order for {op} on {key}")


def _ordered(op: str, backends: dict[str, Backend], key: str) -> list[str]:
    """The op's backends in dispatch order; any the table does not name go just before the reference."""
    first = [n for n in order(op, key) if n in backends and n != "torch"]
    return first + [n for n in backends if n not in first and n != "torch"] + ["torch"] * ("torch" in backends)


def explain(backends: dict[str, Backend], args: Sequence[object], op: str = "*") -> dict[str, str | None]:
    """Every backend's answer for these inputs, in dispatch order (None = would run)."""
    return {n: backends[n].supports(*args) for n in _ordered(op, backends, _device_key(args))}


_warned: set[tuple[str, str]] = set()


def _strict() -> bool:
    return _env.flag("VTATTN_STRICT")


def _fell_back(op: str, refusals: dict[str, str]) -> None:
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


def choose(op: str, backends: dict[str, Backend], args: Sequence[object]) -> str:
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
    refusals: dict[str, str] = {}
    for name in _ordered(op, backends, key):
        reason = backends[name].supports(*args)
        if reason is None:
            if name == "torch" and key != "cpu":
                _fell_back(op, refusals)
            return name
        refusals[name] = reason
    raise BackendUnavailable(f"vtattn.{op}: no backend supports these inputs: {explain(backends, args, op)}")


# The choice is cached per (op, forced backend, shape class): a hit costs a dict lookup instead of
# asking every backend's supports() again. A shape class (`signature`) is what supports() may read:
# dtypes, devices, contiguity, sizes and scalar arguments, less the sizes that grow while decoding
# and that supports() only compares with fixed limits (an op's `shape_class`), so a growing cache
# keeps its entry. The forced backend is part of the key (use_backend / VTATTN_BACKEND switch entries); a CUDA
# fallback to the reference is never cached, so it warns (or raises under VTATTN_STRICT) as before.
_chosen: dict[tuple[Hashable, ...], str] = {}
_MAX_CHOSEN = 4096
_INT32_LIMIT = 2**31 - 1


def _length_class(n: int) -> tuple[str, bool, bool]:
    return ("length", n == 0, n >= _INT32_LIMIT)


def signature(args: Sequence[object], lengths: Mapping[int, tuple[int, ...]] | None = None) -> tuple[object, ...]:
    """The shape class of an op's arguments; `lengths` maps an argument's index to its growing dims.
    Every call of a public op builds it (a paged decode step's 13 arguments: ~5 us), so plain loops."""
    out: list[object] = []
    for i, a in enumerate(args):
        if isinstance(a, torch.Tensor):
            shape: tuple[object, ...] = a.shape  # (torch.Size: a tuple)
            grow = lengths.get(i) if lengths else None
            if grow:
                dims: list[object] = list(shape)
                for d in grow:
                    dims[d] = _length_class(a.shape[d])
                shape = tuple(dims)
            out.append((a.dtype, a.device, shape, a.is_contiguous()))
        else:
            out.append(tuple(a) if isinstance(a, list) else a)
    return tuple(out)


_generation = 0  # bumped by clear_cache: Direct handles choose again


def clear_cache() -> None:
    """Forget every cached backend choice (after loading or rebuilding kernels in a running process)."""
    global _generation
    _chosen.clear()
    _generation += 1


def _light(args: tuple[object, ...]) -> tuple[object, ...]:
    """What a backend's supports() reads of a Direct call's tensors besides their growing lengths: one
    handle serves every model and device of the process (a CPU and a CUDA model, fp32 and bf16, other
    head dims or head counts), so these choose again. Integer tensors (index lists, positions,
    tables, lengths) give their head count only where it is not their last dim ([B, H, L]): the
    last dims of [B, L] positions and [B, H, L] lists grow every step, and choosing again each step
    costs more than the kernel. A plain loop: every Direct call of a decode step builds it (~2 us
    for five tensors, ~4 us as a generator expression)."""
    out: list[object] = []
    for a in args:
        if isinstance(a, torch.Tensor):
            shape = a.shape
            n = len(shape)
            if a.is_floating_point():
                out.append((a.dtype, a.device, n, shape[1] if n > 1 else 0, shape[-1] if n else 0, a.is_contiguous()))
            else:
                out.append((a.dtype, a.device, n, shape[1] if n > 2 else 0, a.is_contiguous()))
        else:
            out.append(a)
    return tuple(out)


R = TypeVar("R")


class Direct(Generic[R]):
    """An internal caller's handle on the registered op `torch.ops.vtattn.<op>`, for arguments it
    built valid (a decode step's pages, lengths and lists): a call runs the backend the op would
    choose, without the op's Python layers (its autograd wrapper, its impl, the choice's key: ~15 us
    a call on CPU, per layer and step). The choice is made again when the arguments' dtypes, devices,
    head counts or head dims (`_light`), the caller's `stamp` (what else it knows may change the
    choice: a pool's size after growth) or the forced backend change, or after clear_cache(). Under
    torch.compile, and for inputs that require grad, the registered op itself runs (its fake impl
    traces; its autograd differentiates or refuses by name). `R` is what the op returns (its schema's
    Tensor or tuple of Tensors): `_ATTENTION: Direct[tuple[Tensor, Tensor]] = Direct("attention")`.
    by_stamp: the caller's stamp alone tells the arguments' classes apart (it names every dtype,
    device and head count the backends' supports() read: a cache's own pools and counters, made once),
    so no key is built from the arguments (~6 us for ten of them: more than a decode step's kernel).
    The op's `relation` of growing lengths, where a backend's supports() reads one (attention's
    aten backend: Nq == Nk or Nq == 1, a causal call's top-left alignment), is part of every key.
    Under torch.compile a by_stamp handle `prepare`d for the stamp calls the vtattn._C kernel chosen
    then as its own op."""
    __slots__ = ("op", "by_stamp", "_key", "_run", "_relation", "_kernels")
    _run: Callable[..., R]  # set by the first call: no key equals the initial None

    def __init__(self, op: str, by_stamp: bool = False) -> None:
        self.op, self.by_stamp = op, by_stamp
        self._key: tuple[object, ...] | None = None
        self._relation: Callable[[tuple[Any, ...]], Hashable] | None = None  # the op's, set by the first choice
        self._kernels: dict[object, str] = {}  # (stamp, forced backend) -> the vtattn._C op prepared for it

    def prepare(self, *args: Any, stamp: object) -> None:
        """Choose the backend for these arguments now, eagerly: where it is a vtattn._C kernel
        (`Backend.kernel`), a compiled graph of a later call with this stamp calls that op itself,
        without the public op's Python dispatch (~15 us a call on CPU; a compiled graph cannot make
        the choice, which reads the build and the device). A static CompressedCache prepares its
        decode step at the prefill."""
        from ._registry import OPS, kernel_ops
        kernel = OPS[self.op][choose(self.op, OPS[self.op], args)].kernel
        if self.by_stamp and kernel in kernel_ops():
            self._kernels[(stamp, _forced)] = kernel
        else:
            self._kernels.pop((stamp, _forced), None)

    def __call__(self, *args: Any, stamp: object = None) -> R:
        grad = torch.is_grad_enabled() and any(isinstance(a, torch.Tensor) and a.requires_grad for a in args)
        if grad or torch.compiler.is_compiling():
            # (the kernel op has no autograd: grad-requiring inputs take the public op's, which refuses them by name)
            kernel = None if grad else self._kernels.get((stamp, _forced))
            out: R = getattr(torch.ops.vtattn_C, kernel)(*args) if kernel else getattr(torch.ops.vtattn, self.op)(*args)
            return out
        relation = self._relation
        key = (_forced, _env.get("VTATTN_BACKEND"), _generation, stamp, None if self.by_stamp else _light(args),
               None if relation is None else relation(args))
        if key != self._key:
            from ._registry import OPS, RELATIONS  # the op's backends (_registry imports this module)
            backends = OPS[self.op]
            name = choose(self.op, backends, args)
            # a kernel backend's run is the vtattn._C op itself: called directly (one Python frame less)
            kernel = backends[name].kernel
            self._run = getattr(torch.ops.vtattn_C, kernel) if kernel else backends[name].run
            self._relation = RELATIONS.get(self.op)
            if self._relation is not relation:  # (the first call)
                key = (*key[:-1], None if self._relation is None else self._relation(args))
            # a CUDA fallback to the reference is chosen on every call, so it warns (or raises) as the op does
            self._key = key if name != "torch" or _device_key(args) == "cpu" else None
        return self._run(*args)


def run(op: str, backends: dict[str, Backend], *args: Any,
        shape_class: Callable[[tuple[Any, ...]], Hashable] | None = None) -> Any:
    key = (op, _forced, _env.get("VTATTN_BACKEND"), shape_class(args) if shape_class else signature(args))
    name = _chosen.get(key)
    if name is None:
        name = choose(op, backends, args)
        if name != "torch" or _device_key(args) == "cpu":
            if len(_chosen) >= _MAX_CHOSEN:
                _chosen.clear()
            _chosen[key] = name
    return backends[name].run(*args)
