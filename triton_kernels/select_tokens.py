"""Segmented top-k token selection in Triton; semantics in the reference
(vtattn/reference/select_tokens.py). One program per (segment, sample) ranks every token against
its segment in tiles (rank = tokens with a higher key, or an equal key and a lower index) and
keeps rank < k; a running cumsum over the token tiles gives ascending slots. O(L^2) per segment
of L tokens: the CUDA kernel (radix select) is the fast path, this one serves the rest."""
import torch

from ._common import MAX_GRID_YZ, TRITON_ERROR, interpreting, on_device, tl, triton, wide

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def device_reason(*tensors) -> str | None:
    """Why the Triton token kernels cannot run on these tensors' device, or None."""
    if TRITON_ERROR is not None:
        return TRITON_ERROR
    device = tensors[0].device
    if any(t.device != device for t in tensors):
        return "tensors on different devices"
    if device.type == "cpu":
        return None if interpreting() else "Triton on CPU tensors needs TRITON_INTERPRET=1"
    return None if device.type == "cuda" else f"Triton backend runs on CUDA tensors, not {device.type}"


def device_ints(values, device) -> torch.Tensor:
    """int32 tensor of `values` on device without a host sync (from pinned memory on CUDA)."""
    t = torch.tensor(values, dtype=torch.int32)
    return t.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else t.to(device)


def supports(scores, budgets, segments, max_keep, sort) -> str | None:
    if scores.dtype not in FLOAT_DTYPES:
        return f"scores must be floating, got {scores.dtype}"
    if scores.shape[0] > MAX_GRID_YZ:
        return f"the Triton kernel takes batch <= {MAX_GRID_YZ} (grid axis 1), got {scores.shape[0]}"
    return device_reason(scores, budgets)


@triton.jit
def score_key(x):
    """int32 key with the order of the fp32 scores: -0 ties with +0, NaN ranks above +inf."""
    bits = x.to(tl.int32, bitcast=True)
    bits = tl.where(x != x, 0x7FC00000, tl.where(x == 0.0, 0, bits))
    return tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits)  # negative floats: larger magnitude, smaller key


@triton.jit
def _select_tokens(Scores, Budgets, Offsets, Indices, Mask, Counts,
                   stride_sb, stride_sn, stride_bb, stride_bs, S, N, K,
                   SORT: tl.constexpr, BLOCK_I: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_S: tl.constexpr):
    stride_sn = wide(stride_sn, 1)  # int64 offsets: they may pass 2^31
    s = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    start = tl.load(Offsets + s)
    L = tl.load(Offsets + s + 1) - start
    # Budgets clamped to their segments: this segment's first output slot and the sample's total.
    first = 0
    total = 0
    for t0 in range(0, S, BLOCK_S):
        t = t0 + tl.arange(0, BLOCK_S)
        lens = tl.load(Offsets + t + 1, mask=t < S, other=0) - tl.load(Offsets + t, mask=t < S, other=0)
        k_t = tl.minimum(tl.maximum(tl.load(Budgets + b * stride_bb + t * stride_bs, mask=t < S, other=0), 0), lens)
        k_t = k_t.to(tl.int32)  # <= the segment length
        first += tl.sum(tl.where(t < s, k_t, 0))
        total += tl.sum(k_t)
    k = tl.minimum(tl.maximum(tl.load(Budgets + b * stride_bb + s * stride_bs), 0), L)
    if s == 0:
        tl.store(Counts + b, total.to(tl.int64))
    out = Indices + b * K
    row = Scores + b * stride_sb + start * stride_sn
    kept_before = 0
    for i0 in range(0, L, BLOCK_I):
        i = i0 + tl.arange(0, BLOCK_I)
        key_i = score_key(tl.load(row + i * stride_sn, mask=i < L, other=0.0).to(tl.float32))
        rank = tl.zeros([BLOCK_I], tl.int32)
        for j0 in range(0, L, BLOCK_J):
            j = j0 + tl.arange(0, BLOCK_J)
            key_j = score_key(tl.load(row + j * stride_sn, mask=j < L, other=0.0).to(tl.float32))
            beats = (key_j[None, :] > key_i[:, None]) | ((key_j[None, :] == key_i[:, None]) & (j[None, :] < i[:, None]))
            rank += tl.sum((beats & (j < L)[None, :]).to(tl.int32), 1)
        keep = (i < L) & (rank < k)
        tl.store(Mask + b * N + start + i, keep, mask=i < L)
        if SORT:
            pos = first + kept_before + tl.cumsum(keep.to(tl.int32), 0) - keep.to(tl.int32)
        else:
            pos = first + rank
        tl.store(out + pos, (start + i).to(tl.int64), mask=keep & (pos < K))
        kept_before += tl.sum(keep.to(tl.int32))
    if s == S - 1:
        for p0 in range(tl.minimum(total, K), K, BLOCK_I):
            p = p0 + tl.arange(0, BLOCK_I)
            tl.store(out + p, tl.full([BLOCK_I], -1, tl.int64), mask=p < K)


def select_tokens(scores, budgets, segments, max_keep: int, sort: bool):
    B, N = scores.shape
    S = len(segments)
    indices = torch.empty((B, max_keep), dtype=torch.int64, device=scores.device)
    mask = torch.empty((B, N), dtype=torch.bool, device=scores.device)
    counts = torch.empty((B,), dtype=torch.int64, device=scores.device)
    if B == 0:
        return indices, mask, counts
    offsets = [0]
    for n in segments:
        offsets.append(offsets[-1] + n)
    block_i, block_j = (16, 16) if interpreting() else (64, 128)
    with on_device(scores):
        _select_tokens[(S, B)](scores, budgets, device_ints(offsets, scores.device), indices, mask, counts,
                               *scores.stride(), *budgets.stride(), S, N, max_keep, SORT=sort,
                               BLOCK_I=block_i, BLOCK_J=block_j, BLOCK_S=min(1024, triton.next_power_of_2(S)))
    return indices, mask, counts
