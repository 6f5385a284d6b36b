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


def decode_inputs(q, k_cache, v_cache, lengths):
    """q [B, Hq, 1, D]; caches [B, Hkv, L_cap, D] of q's dtype with a unit last stride, Hq a multiple
    of Hkv; lengths int32 [B, Hkv] in [0, L_cap] (that range check syncs with the device)."""
    named = {"q": q, "k_cache": k_cache, "v_cache": v_cache}
    for n, t in named.items():
        tensor(n, t, 4, FLOAT_DTYPES)
        if t.dtype != q.dtype:
            raise TypeError(f"{n} has dtype {t.dtype} but q has {q.dtype}")
    tensor("lengths", lengths, 2, (torch.int32,))
    same_device({**named, "lengths": lengths})
    B, Hq, n_new, D = q.shape
    if n_new != 1:
        raise ValueError(f"q must be [B, Hq, 1, D] (one new token per sequence), got shape {tuple(q.shape)}")
    if D == 0:
        raise ValueError("q has head dim 0")
    Hkv, cap = k_cache.shape[1], k_cache.shape[2]
    if k_cache.shape[0] != B or k_cache.shape[3] != D:
        raise ValueError(f"k_cache must be [B={B}, Hkv, L_cap, D={D}], got shape {tuple(k_cache.shape)}")
    if Hkv == 0 or Hq % Hkv != 0:
        raise ValueError(f"q's {Hq} heads must be a multiple of k_cache's {Hkv} heads (GQA)")
    if v_cache.shape != k_cache.shape:
        raise ValueError(f"v_cache must have k_cache's shape {tuple(k_cache.shape)}, got {tuple(v_cache.shape)}")
    for n in ("k_cache", "v_cache"):
        if named[n].stride(-1) != 1 and named[n].shape[-1] > 1:
            raise ValueError(f"{n} needs a unit-stride last dim, got strides {named[n].stride()}")
    if tuple(lengths.shape) != (B, Hkv):
        raise ValueError(f"lengths must be [B, Hkv] = {[B, Hkv]}, got {list(lengths.shape)}")
    # The range check syncs: skipped on meta tensors and while a CUDA graph is being captured.
    capturing = lengths.is_cuda and torch.cuda.is_current_stream_capturing()
    if lengths.numel() and lengths.device.type != "meta" and not capturing \
            and not bool(((lengths >= 0) & (lengths <= cap)).all()):
        raise ValueError(f"lengths must lie in [0, L_cap={cap}], got min {int(lengths.min())}, "
                         f"max {int(lengths.max())}")

def paged_decode_inputs(q, k_pages, v_pages, block_table, lengths):
    """q [B, Hq, 1, D]; page pools [num_pages, page_size, D] of q's dtype with a unit last stride;
    block_table int32 [B, Hkv, max_pages] with Hq a multiple of Hkv; lengths int32 [B, Hkv] in
    [0, max_pages * page_size] and the used table entries in [0, num_pages) (those two value checks
    sync with the device: skipped on meta tensors and while a CUDA graph is being captured)."""
    named = {"q": q, "k_cache": k_pages, "v_cache": v_pages}
    tensor("q", q, 4, FLOAT_DTYPES)
    for n in ("k_cache", "v_cache"):
        tensor(n, named[n], 3, FLOAT_DTYPES)
        if named[n].dtype != q.dtype:
            raise TypeError(f"{n} has dtype {named[n].dtype} but q has {q.dtype}")
    tensor("block_table", block_table, 3, (torch.int32,))
    tensor("lengths", lengths, 2, (torch.int32,))
    same_device({**named, "block_table": block_table, "lengths": lengths})
    B, Hq, n_new, D = q.shape
    if n_new != 1:
        raise ValueError(f"q must be [B, Hq, 1, D] (one new token per sequence), got shape {tuple(q.shape)}")
    if D == 0:
        raise ValueError("q has head dim 0")
    num_pages, page, kd = k_pages.shape
    if kd != D or page == 0:
        raise ValueError(f"k_cache must be a page pool [num_pages, page_size > 0, D={D}], got shape "
                         f"{tuple(k_pages.shape)}")
    if v_pages.shape != k_pages.shape:
        raise ValueError(f"v_cache must have k_cache's shape {tuple(k_pages.shape)}, got {tuple(v_pages.shape)}")
    for n in ("k_cache", "v_cache"):
        if named[n].stride(-1) != 1 and D > 1:
            raise ValueError(f"{n} needs a unit-stride last dim, got strides {named[n].stride()}")
    Hkv, max_pages = block_table.shape[1], block_table.shape[2]
    if block_table.shape[0] != B:
        raise ValueError(f"block_table must be [B={B}, Hkv, max_pages], got shape {tuple(block_table.shape)}")
    if Hkv == 0 or Hq % Hkv != 0:
        raise ValueError(f"q's {Hq} heads must be a multiple of block_table's {Hkv} kv heads (GQA)")
    if tuple(lengths.shape) != (B, Hkv):
        raise ValueError(f"lengths must be [B, Hkv] = {[B, Hkv]}, got {list(lengths.shape)}")
    capturing = lengths.is_cuda and torch.cuda.is_current_stream_capturing()
    if not lengths.numel() or lengths.device.type == "meta" or capturing:
        return
    cap = max_pages * page
    if not bool(((lengths >= 0) & (lengths <= cap)).all()):
        raise ValueError(f"lengths must lie in [0, max_pages * page_size = {cap}], got min {int(lengths.min())}, "
                         f"max {int(lengths.max())}")
    used = torch.arange(max_pages, device=block_table.device) * page < lengths[..., None]
    bad = used & ((block_table < 0) | (block_table >= num_pages))
    if bool(bad.any()):
        b, g, i = (int(x) for x in bad.nonzero()[0])
        raise ValueError(f"block_table[{b}, {g}, {i}] = {int(block_table[b, g, i])} is a used page (lengths[{b}, "
                         f"{g}] = {int(lengths[b, g])}) but outside the pool's [0, num_pages={num_pages})")


def resolve_scale(scale, head_dim) -> float:
    if scale is None:
        return head_dim ** -0.5
    scale = float(scale)
    if not math.isfinite(scale):
        raise ValueError(f"scale must be finite, got {scale}")
    return scale


def selection(sel, x, name):
    """A select_tokens result that fits x [B, N, ...] (on x's device)."""
    fields = ("indices", "mask", "counts", "cu_seqlens")
    if not all(isinstance(getattr(sel, f, None), torch.Tensor) for f in fields):
        raise TypeError(f"selection must be a vtattn.Selection (select_tokens' result), got {type(sel).__name__}")
    B, N = x.shape[:2]
    if sel.indices.dim() != 2 or sel.indices.shape[0] != B or sel.indices.dtype != torch.int64:
        raise ValueError(f"selection.indices must be int64 [B={B}, K], got {sel.indices.dtype} "
                         f"{tuple(sel.indices.shape)}")
    if tuple(sel.mask.shape) != (B, N):
        raise ValueError(f"selection.mask is {tuple(sel.mask.shape)} but {name} has B, N = {(B, N)}")
    same_device({name: x, "selection": sel.indices})
