"""Counting host syncs: every op whose output value or shape has to reach the host.

`count_syncs()` is a context manager that yields a `Syncs` record; inside it, a TorchDispatchMode
sees every aten op, and the Tensor methods that read values without dispatching anything
(`tolist`, `numpy`, `cpu`, ...) are wrapped. On a GPU each of these waits for the device; on the
CPU the same calls are counted, so a CPU test proves a code path free of them. A `Syncs` keeps
each sync's op and the innermost frames of vtattn / transformers code that issued it:

    with count_syncs() as syncs:
        model(...)                      # one decode step
    assert not syncs, syncs.report()
"""
import contextlib
import traceback

import torch
from torch.utils._python_dispatch import TorchDispatchMode

aten = torch.ops.aten

# Ops that read a value on the host, or whose output shape depends on values.
VALUE_OPS = {
    aten._local_scalar_dense.default,  # item(), int(t), bool(t), float(t)
    aten.is_nonzero.default,
    aten.equal.default,
    aten.allclose.default,
    aten.nonzero.default,
    aten.nonzero_numpy.default,
    aten.argwhere.default,
    aten.masked_select.default,
    aten.unique_consecutive.default,
    aten.unique_dim.default,
    aten._unique.default,
    aten._unique2.default,
    aten.bincount.default,
}

# Tensor methods that read values without any aten op reaching a dispatch mode.
METHODS = ("tolist", "numpy", "cpu", "__array__")


def _why(func, args, kwargs):
    """The reason `func(*args, **kwargs)` syncs, or None."""
    if func in VALUE_OPS:
        return str(func)
    if func in (aten.index.Tensor, aten.index_put.default, aten.index_put_.default, aten._index_put_impl_.default):
        indices = args[1] if len(args) > 1 else kwargs.get("indices", ())
        if any(isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8) for i in indices or ()):
            return f"{func} with a boolean index (its nonzero)"
    if func is aten.repeat_interleave.Tensor and kwargs.get("output_size") is None and len(args) < 3:
        return f"{func} without output_size"
    if func in (aten._to_copy.default, aten.copy_.default):
        src = args[1] if func is aten.copy_.default else args[0]
        dst = args[0].device if func is aten.copy_.default else kwargs.get("device")
        if isinstance(src, torch.Tensor) and dst is not None and src.device.type != "cpu" and \
                torch.device(dst).type == "cpu":
            return f"{func} to the host"
    return None


def _where():
    """The innermost frames of library code (vtattn, transformers) above this module."""
    frames = [f for f in traceback.extract_stack()[:-3] if f.filename != __file__ and "/torch/" not in f.filename]
    library = [f for f in frames if "/vtattn/" in f.filename or "/transformers/" in f.filename]
    return [f"{'/'.join(f.filename.split('/')[-2:])}:{f.lineno} {f.name}: {f.line}" for f in (library or frames)[-3:]]


class Syncs(list):
    """The syncs seen: (reason, frames) per sync."""

    def report(self):
        return "\n".join(f"{why}\n    " + "\n    ".join(where) for why, where in self) or "no host syncs"


class _Mode(TorchDispatchMode):
    def __init__(self, syncs):
        super().__init__()
        self.syncs = syncs

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        why = _why(func, args, kwargs)
        if why is not None:
            self.syncs.append((why, _where()))
        return func(*args, **kwargs)


@contextlib.contextmanager
def count_syncs():
    syncs = Syncs()
    originals = {name: getattr(torch.Tensor, name) for name in METHODS}

    def wrap(name, method):
        def counted(self, *args, **kwargs):
            syncs.append((f"Tensor.{name}", _where()))
            return method(self, *args, **kwargs)
        return counted

    for name, method in originals.items():
        setattr(torch.Tensor, name, wrap(name, method))
    try:
        with _Mode(syncs):
            yield syncs
    finally:
        for name, method in originals.items():
            setattr(torch.Tensor, name, method)


def step_syncs(model, inputs, steps):
    """The syncs of each forward a greedy `model.generate(**inputs)` of `steps` tokens runs after the
    prefill (one `Syncs` per decode step), and the generated sequences."""
    per_step, active = [], []

    def before(module, args, kwargs):
        active.append(count_syncs())
        per_step.append(active[-1].__enter__())

    def after(module, args, kwargs, out):
        active.pop().__exit__(None, None, None)

    hooks = [model.register_forward_pre_hook(before, with_kwargs=True),
             model.register_forward_hook(after, with_kwargs=True)]
    try:
        with torch.no_grad():
            tokens = model.generate(**inputs, max_new_tokens=steps, min_new_tokens=steps, do_sample=False,
                                    pad_token_id=0)
    finally:
        for h in hooks:
            h.remove()
    assert len(per_step) == steps
    return per_step[1:], tokens


def prefill_syncs(model, inputs):
    """The syncs of the prefill (the first forward) of a greedy `model.generate(**inputs)` of 2 tokens."""
    found = []

    def before(module, args, kwargs):
        if not found:
            found.append(count_syncs())
            found.append(found[0].__enter__())

    def after(module, args, kwargs, out):
        if len(found) == 2:
            found[0].__exit__(None, None, None)
            found.append(None)

    hooks = [model.register_forward_pre_hook(before, with_kwargs=True),
             model.register_forward_hook(after, with_kwargs=True)]
    try:
        with torch.no_grad():
            model.generate(**inputs, max_new_tokens=2, min_new_tokens=2, do_sample=False, pad_token_id=0)
    finally:
        for h in hooks:
            h.remove()
    return found[1]

