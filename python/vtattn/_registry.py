"""The torch.ops.vtattn ops: one definition each, a fake impl (meta tensors, torch.compile),
and one CPU/CUDA impl that dispatches to the first backend supporting the inputs."""
import torch

import importlib

from . import _aten, _ext, reference
from ._dispatch import Backend, run

_lib = torch.library.Library("vtattn", "DEF")
OPS: dict[str, dict] = {}  # op name -> its backends, filled by _define
SAMPLES: dict = {}  # op name -> (device, dtype) -> small args, for `vtattn info`


def _triton(op):
    """The launcher module of a Triton op, imported on first use (triton is optional)."""
    return importlib.import_module(f"vtattn.triton_kernels.{op}")


def _compiled(op, device_type):
    """Backend for the vtattn._C kernel of `op` on one device type; what the CUDA kernels
    accept is declared in vtattn._cuda_caps."""

    def supports(*args):
        t = args[0]
        if t.device.type != device_type:
            return f"tensors are on {t.device.type}, this backend runs {device_type} tensors"
        reason = _ext.has_kernel(op, device_type)
        if reason is None and device_type == "cuda":
            reason = getattr(importlib.import_module("vtattn._cuda_caps"), f"{op}_supports")(*args)
        return reason

    def run_(*args):
        return getattr(torch.ops.vtattn_C, op)(*args)

    return Backend(supports, run_)


def _triton_backend(op):
    def supports(*args):
        try:
            mod = _triton(op)
        except ImportError as e:
            return f"Triton kernels unavailable: {e}"
        return mod.supports(*args)

    return Backend(supports, lambda *args: getattr(_triton(op), op)(*args))


def _define(op, schema, backends, fake, sample):
    """Define torch.ops.vtattn.<op>: schema, fake impl, and a CPU/CUDA impl that dispatches.
    `sample(device, dtype)` builds small arguments on which `vtattn info` asks each backend."""
    _lib.define(schema)
    name = f"vtattn::{op}"
    torch.library.register_fake(name, fake, lib=_lib)

    def impl(*args):
        return run(op, backends, *args)

    for key in ("CPU", "CUDA"):
        _lib.impl(op, impl, key)
    OPS[op] = backends
    SAMPLES[op] = sample
    return backends


def token_major(out):
    """`out` in the layout every attention op returns: [B, H, N, D] viewed over [B, N, H, D]
    memory (SDPA's kernels write it; transformers' next step then needs no copy)."""
    if out.transpose(1, 2).is_contiguous():
        return out
    B, H, N, D = out.shape
    return out.new_empty(B, N, H, D).transpose(1, 2).copy_(out)


def _token_major_out(fn):
    def run_(*args):
        out, lse = fn(*args)
        return token_major(out), lse
    return run_


def _sample_qkv(device, dtype):
    q = torch.zeros(1, 2, 16, 64, device=device, dtype=dtype)
    k = torch.zeros(1, 2, 32, 64, device=device, dtype=dtype)
    return q, k, k


# ---- attention -----------------------------------------------------------------------------

def _attention_fake(q, k, v, causal, scale):
    B, H, N, D = q.shape
    return q.new_empty(B, N, H, D).transpose(1, 2), q.new_empty(B, H, N, dtype=torch.float32)


def _with_layout(backend):
    return Backend(backend.supports, _token_major_out(backend.run))


ATTENTION = _define(
    "attention",
    "attention(Tensor q, Tensor k, Tensor v, bool causal, float scale) -> (Tensor, Tensor)",
    {
        "aten": _with_layout(Backend(_aten.attention_supports, _aten.attention)),
        "cuda": _with_layout(_compiled("attention", "cuda")),
        "cpp": _with_layout(_compiled("attention", "cpu")),
        "triton": _with_layout(_triton_backend("attention")),
        "torch": _with_layout(Backend(lambda *a: None, reference.attention)),
    },
    _attention_fake,
    lambda device, dtype: (*_sample_qkv(device, dtype), False, 0.125),
)


# ---- key_importance ------------------------------------------------------------------------

def _key_importance_fake(q, k, lse, rows, causal, scale):
    return q.new_empty(q.shape[0], q.shape[1], k.shape[2], dtype=torch.float32)


KEY_IMPORTANCE = _define(
    "key_importance",
    "key_importance(Tensor q, Tensor k, Tensor? lse, Tensor? rows, bool causal, float scale) -> Tensor",
    {
        "cuda": _compiled("key_importance", "cuda"),
        "cpp": _compiled("key_importance", "cpu"),
        "triton": _triton_backend("key_importance"),
        "torch": Backend(lambda *a: None, reference.key_importance),
    },
    _key_importance_fake,
    lambda device, dtype: (*_sample_qkv(device, dtype)[:2], None, None, False, 0.125),
)
