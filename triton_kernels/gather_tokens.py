"""Row gather of kept tokens in Triton (padded [B, K, C] or packed [T, C]); semantics in the
reference (vtattn/reference/gather_tokens.py)."""
import torch

from ._common import interpreting, on_device, tl, triton, wide
from .select_tokens import device_reason


def supports(x, indices, cu_seqlens, total) -> str | None:
    if x.dtype not in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        return f"x must be floating, got {x.dtype}"
    return device_reason(*(t for t in (x, indices, cu_seqlens) if t is not None))


@triton.jit
def _gather_tokens(X, Indices, Cu, Out, stride_xb, stride_xn, stride_xc, stride_ib, stride_ik, B, N, K, C, rows,
                   PACKED: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_B: tl.constexpr):
    stride_xn, stride_xc = wide(stride_xn, 1), wide(stride_xc, 1)  # int64 offsets: they may pass 2^31
    r = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    if PACKED:  # sample of each packed row: how many samples end at or before it (as searchsorted)
        b = tl.zeros([BLOCK_R], tl.int64)
        for t0 in range(0, B, BLOCK_B):
            t = t0 + tl.arange(0, BLOCK_B)
            ends = tl.load(Cu + 1 + t, mask=t < B, other=0)
            b += tl.sum(((ends[None, :] <= r[:, None]) & (t < B)[None, :]).to(tl.int64), 1)
        b = tl.minimum(b, B - 1)
        k = r - tl.load(Cu + b, mask=r < rows, other=0)
    else:
        b = r // K
        k = r % K
    ok = (r < rows) & (k >= 0) & (k < K)
    idx = tl.load(Indices + b * stride_ib + k * stride_ik, mask=ok, other=-1)
    valid = ok & (idx >= 0) & (idx < N)
    src = X + b[:, None] * stride_xb + idx[:, None] * stride_xn
    for c0 in range(0, C, BLOCK_C):
        c = c0 + tl.arange(0, BLOCK_C)
        v = tl.load(src + c[None, :] * stride_xc, mask=valid[:, None] & (c < C)[None, :], other=0.0)
        tl.store(Out + r[:, None] * C + c[None, :], v, mask=(r < rows)[:, None] & (c < C)[None, :])


def gather_tokens(x, indices, cu_seqlens, total: int):
    B, N, C = x.shape
    K = indices.shape[1]
    packed = cu_seqlens is not None
    out = torch.empty((total, C) if packed else (B, K, C), dtype=x.dtype, device=x.device)
    rows = (total if B else 0) if packed else B * K
    if rows == 0 or C == 0:
        return out.zero_()
    block_r, block_c = (4, 16) if interpreting() else (8, min(256, triton.next_power_of_2(C)))
    with on_device(x):
        _gather_tokens[(triton.cdiv(rows, block_r),)](
            x, indices, cu_seqlens if packed else indices, out, *x.stride(), *indices.stride(), B, N, K, C, rows,
            PACKED=packed, BLOCK_R=block_r, BLOCK_C=block_c, BLOCK_B=min(64, triton.next_power_of_2(B)))
    return out
