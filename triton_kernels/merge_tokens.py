"""Token merge in Triton; semantics in the reference (vtattn/reference/merge_tokens.py).

_merge_assign: per tile of tokens, a running argmax of cosine similarity over tiles of kept keys
(tl.dot; never an [N, K] tensor) -> each pruned token's kept token and weight. _merge_reduce: per
kept slot, its own row plus its assigned rows (tile sums in a fixed order: deterministic)."""
import torch

from ._common import MAX_GRID_YZ, interpreting, on_device, tl, triton, wide
from .select_tokens import device_reason

NORM_EPS = tl.constexpr(1e-12)  # F.normalize's clamp: a zero key has cosine 0 with everything


def supports(x, keys, indices, mask, weighted) -> str | None:
    for name, t in (("x", x), ("keys", keys)):
        if t.dtype not in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
            return f"{name} must be floating, got {t.dtype}"
    if keys.dtype == torch.bfloat16 and interpreting():
        return "the Triton interpreter computes bf16 tl.dot wrongly"
    if x.shape[0] > MAX_GRID_YZ:
        return f"the Triton kernels take batch <= {MAX_GRID_YZ} (grid axis 1), got {x.shape[0]}"
    return device_reason(x, keys, indices, mask)


@triton.jit
def _load_keys(Keys, rows, ok, d, D, stride_kn, stride_kc, DOT_DTYPE: tl.constexpr):
    v = tl.load(Keys + rows[:, None] * stride_kn + d[None, :] * stride_kc,
                mask=ok[:, None] & (d < D)[None, :], other=0.0)
    return v.to(DOT_DTYPE)


@triton.jit
def _merge_assign(Keys, Indices, Mask, Assign, Weight, stride_kb, stride_kn, stride_kc, stride_ib, stride_ik,
                  stride_mb, stride_mn, N, D, K, WEIGHTED: tl.constexpr, DOT_DTYPE: tl.constexpr,
                  PRECISION: tl.constexpr, BLOCK_I: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_D: tl.constexpr):
    # int64 offsets: index * stride products may pass 2^31
    stride_kn, stride_kc, stride_mn, stride_ik = wide(stride_kn, 1), wide(stride_kc, 1), wide(stride_mn, 1), \
        wide(stride_ik, 1)
    b = tl.program_id(1).to(tl.int64)
    i = tl.program_id(0) * BLOCK_I + tl.arange(0, BLOCK_I)
    keys = Keys + b * stride_kb
    pruned = (i < N) & (tl.load(Mask + b * stride_mb + i * stride_mn, mask=i < N, other=1) == 0)
    sq = tl.zeros([BLOCK_I], tl.float32)
    for d0 in range(0, D, BLOCK_D):
        q = _load_keys(keys, i, i < N, d0 + tl.arange(0, BLOCK_D), D, stride_kn, stride_kc, DOT_DTYPE).to(tl.float32)
        sq += tl.sum(q * q, 1)
    q_inv = 1.0 / tl.maximum(tl.sqrt(sq), NORM_EPS)
    best = tl.full([BLOCK_I], float("-inf"), tl.float32)
    best_tok = tl.full([BLOCK_I], -1, tl.int32)
    for j0 in range(0, K, BLOCK_J):
        j = j0 + tl.arange(0, BLOCK_J)
        tok = tl.load(Indices + b * stride_ib + j * stride_ik, mask=j < K, other=-1)
        valid = (tok >= 0) & (tok < N)
        tok = tl.where(valid, tok, -1).to(tl.int32)
        dot = tl.zeros([BLOCK_I, BLOCK_J], tl.float32)
        k_sq = tl.zeros([BLOCK_J], tl.float32)
        for d0 in range(0, D, BLOCK_D):
            d = d0 + tl.arange(0, BLOCK_D)
            q = _load_keys(keys, i, i < N, d, D, stride_kn, stride_kc, DOT_DTYPE)
            kk = _load_keys(keys, tok, valid, d, D, stride_kn, stride_kc, DOT_DTYPE)
            dot = tl.dot(q, tl.trans(kk), dot, input_precision=PRECISION)
            k_sq += tl.sum(kk.to(tl.float32) * kk.to(tl.float32), 1)
        cos = dot * q_inv[:, None] * (1.0 / tl.maximum(tl.sqrt(k_sq), NORM_EPS))[None, :]
        # A NaN similarity ranks below every number (a NaN / inf key moves no other token).
        cos = tl.where(valid[None, :] & (cos == cos), cos, float("-inf"))
        # The tile's best, ties to the lower kept token index; then against the running best.
        tile_best = tl.max(cos, 1)
        tile_tok = tl.min(tl.where(valid[None, :] & (cos == tile_best[:, None]), tok[None, :], N), 1)
        better = (tile_tok < N) & ((best_tok < 0) | (tile_best > best) | ((tile_best == best) & (tile_tok < best_tok)))
        best = tl.where(better, tile_best, best)
        best_tok = tl.where(better, tile_tok, best_tok)
    merged = pruned & (best_tok >= 0)
    if WEIGHTED:  # best is -inf only when every similarity was NaN (cosines are >= -1): weight NaN
        w = tl.where(best == float("-inf"), float("nan"), tl.maximum(best, 0.0))
    else:
        w = tl.full([BLOCK_I], 1.0, tl.float32)
    tl.store(Assign + b * N + i, tl.where(merged, best_tok, -1), mask=i < N)
    tl.store(Weight + b * N + i, tl.where(merged, w, 0.0), mask=i < N)


@triton.jit
def _merge_reduce(X, Indices, Assign, Weight, Out, stride_xb, stride_xn, stride_xc, stride_ib, stride_ik, N, C, K,
                  BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr):
    # int64 offsets: index * stride products may pass 2^31
    stride_xn, stride_xc, stride_ik = wide(stride_xn, 1), wide(stride_xc, 1), wide(stride_ik, 1)
    slot = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    c = tl.program_id(2) * BLOCK_C + tl.arange(0, BLOCK_C)
    x = X + b * stride_xb
    tok = tl.load(Indices + b * stride_ib + slot * stride_ik)
    valid = (tok >= 0) & (tok < N)
    acc = tl.load(x + tok * stride_xn + c * stride_xc, mask=valid & (c < C), other=0.0).to(tl.float32)
    w_sum = 1.0
    tile = x + tl.arange(0, BLOCK_N)[:, None] * stride_xn + c[None, :] * stride_xc  # the first tile's rows
    for n0 in range(0, N, BLOCK_N):
        n = n0 + tl.arange(0, BLOCK_N)
        hit = valid & (tl.load(Assign + b * N + n, mask=n < N, other=-1) == tok)
        w = tl.load(Weight + b * N + n, mask=hit, other=0.0)
        rows = tl.load(tile + n0 * stride_xn, mask=hit[:, None] & (c < C)[None, :], other=0.0)
        acc += tl.sum(w[:, None] * rows.to(tl.float32), 0)
        w_sum += tl.sum(w, 0)
    out = tl.where(valid, acc / w_sum, 0.0)
    tl.store(Out + (b * K + slot) * C + c, out.to(Out.dtype.element_ty), mask=c < C)


def merge_tokens(x, keys, indices, mask, weighted: bool):
    B, N, C = x.shape
    K, D = indices.shape[1], keys.shape[2]
    out = torch.empty((B, K, C), dtype=x.dtype, device=x.device)
    if out.numel() == 0:
        return out
    assign = torch.empty((B, N), dtype=torch.int32, device=x.device)
    weight = torch.empty((B, N), dtype=torch.float32, device=x.device)
    # 16-bit keys multiply exactly into fp32 sums (tensor cores); wider keys run as fp32 with
    # full-precision (not tf32) dots: argmax decisions need the exact ranking.
    dot_dtype = tl.float32 if keys.dtype in (torch.float32, torch.float64) else getattr(tl, str(keys.dtype)[6:])
    precision = "ieee" if dot_dtype == tl.float32 else "tf32"  # (tf32 is ignored for 16-bit operands)
    interp = interpreting()
    block_i, block_j, block_d = (16, 16, 16) if interp else (64, 64, 32)
    block_n, block_c = (16, 16) if interp else (32, min(256, triton.next_power_of_2(C)))
    with on_device(x):
        if N:
            _merge_assign[(triton.cdiv(N, block_i), B)](
                keys, indices, mask, assign, weight, *keys.stride(), *indices.stride(), *mask.stride(), N, D, K,
                WEIGHTED=weighted, DOT_DTYPE=dot_dtype, PRECISION=precision, BLOCK_I=block_i, BLOCK_J=block_j,
                BLOCK_D=block_d)
        _merge_reduce[(K, B, triton.cdiv(C, block_c))](
            x, indices, assign, weight, out, *x.stride(), *indices.stride(), N, C, K, BLOCK_N=block_n, BLOCK_C=block_c)
    return out
