"""Argument checks shared by the public functions: clear errors that name the argument."""
import math
import numbers
from typing import Any, Collection

import torch
from torch._subclasses.fake_tensor import is_fake

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def checking() -> bool:
    """Validation runs eagerly only: under torch.compile the fake impls carry the shapes."""
    return not torch.compiler.is_compiling()


def concrete(t: torch.Tensor) -> bool:
    """Whether t's values can be read for a value check: not on meta, not a fake tensor (shape
    propagation outside torch.compile), not while a CUDA graph is captured (the read would sync)."""
    if t.device.type == "meta" or is_fake(t):
        return False
    return not (t.is_cuda and torch.cuda.is_current_stream_capturing())


def tensor(name: str, x: object, ndim: int | None = None, dtypes: Collection[torch.dtype] | None = None) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if ndim is not None and x.dim() != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {tuple(x.shape)}")
    if dtypes is not None and x.dtype not in dtypes:
        raise TypeError(f"{name} must have dtype in {[str(d) for d in dtypes]}, got {x.dtype}")


def same_device(named: dict[str, torch.Tensor | None]) -> None:
    for n, t in named.items():
        if t is not None:
            tensor(n, t)
    devices = {n: t.device for n, t in named.items() if t is not None}
    first = next(iter(devices))
    for n, d in devices.items():
        if d != devices[first]:
            raise ValueError(f"{n} is on {d} but {first} is on {devices[first]}")


def attention_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor | None = None) -> None:
    """q [B, Hq, Nq, D], k (and v) [B, Hkv, Nk, D]; one float dtype; Hq a multiple of Hkv."""
    named: dict[str, torch.Tensor] = {"q": q, "k": k} if v is None else {"q": q, "k": k, "v": v}
    for n, t in named.items():
        tensor(n, t, 4, FLOAT_DTYPES)
    same_device(dict(named))
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


def decode_inputs(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, lengths: torch.Tensor) -> None:
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
    # The range check syncs: skipped on meta / fake tensors and while a CUDA graph is being captured.
    if lengths.numel() and concrete(lengths) and not bool(((lengths >= 0) & (lengths <= cap)).all()):
        raise ValueError(f"lengths must lie in [0, L_cap={cap}], got min {int(lengths.min())}, "
                         f"max {int(lengths.max())}")


def paged_decode_inputs(q: torch.Tensor, k_pages: torch.Tensor, v_pages: torch.Tensor, block_table: torch.Tensor,
                        lengths: torch.Tensor) -> None:
    """q [B, Hq, 1, D]; page pools [num_pages, page_size, D] of q's dtype with a unit last stride;
    block_table int32 [B, Hkv, max_pages] with Hq a multiple of Hkv; lengths int32 [B, Hkv] in
    [0, max_pages * page_size] and the used table entries in [0, num_pages) (those two value checks
    sync with the device: skipped on meta / fake tensors and while a CUDA graph is being captured)."""
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
    if not lengths.numel() or not concrete(lengths):
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


def attention_options(softcap: float | None, window: int | None, sinks: torch.Tensor | None, q: torch.Tensor,
                      heads: int) -> tuple[float, int, torch.Tensor | None]:
    """The attention family's options in op form: (softcap float, 0.0 = off; window int, -1 = off;
    sinks fp32 contiguous [heads] on q's device, or None). Scalar and metadata checks only (no sync)."""
    if softcap is None:
        softcap = 0.0
    if isinstance(softcap, bool) or not isinstance(softcap, numbers.Real):
        raise TypeError(f"softcap must be a float or None, got {type(softcap).__name__}")
    softcap = float(softcap)
    if not math.isfinite(softcap) or softcap < 0:
        raise ValueError(f"softcap must be a finite number >= 0 (0 or None: off), got {softcap}")
    if window is None:
        window = -1
    elif isinstance(window, bool) or not isinstance(window, numbers.Integral) or window < 0:
        raise ValueError(f"window must be an int >= 0 (keys left of the row's own position) or None, got {window!r}")
    window = int(window)
    if sinks is not None:
        tensor("sinks", sinks, 1)
        if not sinks.dtype.is_floating_point:
            raise TypeError(f"sinks must be a float tensor, got {sinks.dtype}")
        if sinks.shape[0] != heads:
            raise ValueError(f"sinks must have one logit per query head, [{heads}], got {tuple(sinks.shape)}")
        same_device({"q": q, "sinks": sinks})
        sinks = sinks.to(torch.float32).contiguous()
    return softcap, window, sinks


def resolve_scale(scale: float | torch.Tensor | None, head_dim: int) -> float:
    if scale is None:
        return float(head_dim ** -0.5)
    if isinstance(scale, bool) or not (isinstance(scale, numbers.Real) or
                                       (isinstance(scale, torch.Tensor) and scale.numel() == 1)):
        raise TypeError(f"scale must be a float or None, got {scale!r}")
    scale = float(scale)
    if not math.isfinite(scale):
        raise ValueError(f"scale must be finite, got {scale}")
    return scale


def lse_values(lse: torch.Tensor, rows: torch.Tensor | None) -> None:
    """A user-supplied lse [B, Hq, Nq] must be finite or -inf (a row without keys) in the rows read
    (rows: None = all, else int64 [B, R], -1 skipped): +inf would silently zero every score of a row.
    One sync; skipped where the values cannot be read."""
    if not lse.numel() or not concrete(lse):
        return
    read = torch.ones_like(lse, dtype=torch.bool)
    if rows is not None:
        read = torch.zeros(lse.shape[0], lse.shape[2] + 1, dtype=torch.bool, device=lse.device)
        read = read.scatter_(1, torch.where(rows >= 0, rows, lse.shape[2]), True)[:, None, :-1].expand_as(lse)
    bad = read & (lse.isnan() | lse.isposinf())
    if bool(bad.any()):
        at = tuple(bad.nonzero()[0].tolist())
        raise ValueError(f"lse must be finite (or -inf for a row without keys) in the rows read, got "
                         f"{float(lse[at])} at lse{list(at)}")


def selection(sel: Any, x: torch.Tensor, name: str) -> None:
    """A select_tokens result that fits x [B, N, ...] (on x's device), values included (one sync,
    skipped where they cannot be read): an index out of range would silently become a zero row, a
    mask that disagrees with the indices a wrong merge."""
    fields = ("indices", "mask", "counts", "cu_seqlens")
    if not all(isinstance(getattr(sel, f, None), torch.Tensor) for f in fields):
        raise TypeError(f"selection must be a vtattn.Selection (select_tokens' result), got {type(sel).__name__}")
    B, N = x.shape[:2]
    ind, mask, counts, cu = sel.indices, sel.mask, sel.counts, sel.cu_seqlens
    if ind.dtype != torch.int64:
        raise TypeError(f"selection.indices must be torch.int64, got {ind.dtype}")
    if ind.dim() != 2 or ind.shape[0] != B:
        raise ValueError(f"selection.indices must be int64 [B={B}, K] to fit {name}, got shape {list(ind.shape)}")
    for field, t, dtype, shape in (("mask", mask, torch.bool, (B, N)), ("counts", counts, torch.int64, (B,)),
                                   ("cu_seqlens", cu, torch.int32, (B + 1,))):
        if t.dtype != dtype:
            raise TypeError(f"selection.{field} must be {dtype}, got {t.dtype}")
        if tuple(t.shape) != shape:
            raise ValueError(f"selection.{field} is {list(t.shape)} but must be {list(shape)} to fit {name} "
                             f"(B, N = {B}, {N})")
    same_device({name: x, "selection": ind, "selection.mask": mask, "selection.counts": counts,
                 "selection.cu_seqlens": cu})
    if B == 0 or not concrete(ind):
        return
    K = ind.shape[1]
    listed = torch.arange(K, device=ind.device) < counts[:, None]  # [B, K]
    bad_index = torch.where(listed, (ind < 0) | (ind >= N), ind != -1)
    hits = torch.zeros(B, N + 1, dtype=torch.int64, device=ind.device)  # how often each token is listed
    hits = hits.scatter_add_(1, torch.where(listed & ~bad_index, ind, N), torch.ones_like(ind))[:, :N]
    cumsum = torch.cat([counts.new_zeros(1), counts.cumsum(0)])
    facts = torch.stack([((counts < 0) | (counts > K)).any(), bad_index.any(), (hits != mask).any(),
                         (cu.long() != cumsum).any(), cu[-1].long()]).tolist()  # the one sync
    counts_bad, index_bad, mask_bad, cu_bad, cu_total = facts
    if counts_bad:
        b = int(((counts < 0) | (counts > K)).nonzero()[0])
        raise ValueError(f"selection.counts must lie in [0, K={K}], got counts[{b}] = {int(counts[b])}")
    if index_bad:
        b, k = bad_index.nonzero()[0].tolist()
        what = f"in [0, N={N}) (slot {k} < counts[{b}] = {int(counts[b])})" if k < counts[b] else \
            f"-1 (padding: slot {k} >= counts[{b}] = {int(counts[b])})"
        raise ValueError(f"selection.indices[{b}, {k}] = {int(ind[b, k])} must be {what}")
    if mask_bad:
        b, i = (hits != mask).nonzero()[0].tolist()
        raise ValueError(f"selection.mask[{b}, {i}] = {bool(mask[b, i])} but token {i} is listed {int(hits[b, i])} "
                         f"times in selection.indices[{b}, :counts[{b}]] (the mask must mark each listed token once)")
    if cu_bad:
        raise ValueError(f"selection.cu_seqlens must be [0, cumsum(counts)] = {cumsum.tolist()}, got {cu.tolist()}")
    total = getattr(sel, "total", None)
    if total is not None and total != cu_total:
        raise ValueError(f"selection.total = {total} but the counts sum to {cu_total}")
