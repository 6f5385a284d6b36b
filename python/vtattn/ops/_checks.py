"""Argument checks shared by the public functions: clear errors that name the argument."""
import math

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def checking() -> bool:
    """Validation runs eagerly only: under torch.compile the fake impls carry the shapes."""
    return not torch.compiler.is_compiling()


def tensor(name, x, ndim=None, dtypes=None):
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if ndim is not None and x.dim() != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {tuple(x.shape)}")
    if dtypes is not None and x.dtype not in dtypes:
        raise TypeError(f"{name} must have dtype in {[str(d) for d in dtypes]}, got {x.dtype}")


def same_device(named: dict):
    devices = {n: t.device for n, t in named.items() if t is not None}
    first = next(iter(devices))
    for n, d in devices.items():
        if d != devices[first]:
            raise ValueError(f"{n} is on {d} but {first} is on {devices[first]}")


def attention_inputs(q, k, v=None):
    """q [B, Hq, Nq, D], k (and v) [B, Hkv, Nk, D]; one float dtype; Hq a multiple of Hkv."""
    named = {"q": q, "k": k} if v is None else {"q": q, "k": k, "v": v}
    for n, t in named.items():
        tensor(n, t, 4, FLOAT_DTYPES)
    same_device(named)
    for n, t in named.items():
        if t.dtype != q.dtype:
            raise TypeError(f"{n} has dtype {t.dtype} but q has {q.dtype}")
    B, Hq, _, D = q.shape
    if k.shape[0] != B:
        raise ValueError(f"k has batch {k.shape[0]} but q has {B}")
    if k.shape[-1] != D:
        raise ValueError(f"k has head dim {k.shape[-1]} but q has {D}")
    if D == 0:
        raise ValueError("q has head dim 0")
    Hkv = k.shape[1]
    if Hkv == 0 or Hq % Hkv != 0:
        raise ValueError(f"q's {Hq} heads must be a multiple of k's {Hkv} heads (GQA)")
    if v is not None and v.shape != k.shape:
        raise ValueError(f"v must have k's shape {tuple(k.shape)}, got {tuple(v.shape)}")


def resolve_scale(scale, head_dim) -> float:
    if scale is None:
        return head_dim ** -0.5
    scale = float(scale)
    if not math.isfinite(scale):
        raise ValueError(f"scale must be finite, got {scale}")
    return scale
