"""BiFormer-style bi-level routing (Zhu et al., CVPR 2023) over the image tokens of a multimodal prompt:
images are 2-D grids of tokens cut into regions; region-level affinity from pooled queries and keys picks
the top-k key regions of each query region, and token attention runs inside the routed regions. Text
tokens stay dense. Written from the paper and the authors' release (rayleizhu/BiFormer, TopkRouting /
BiLevelRoutingAttention); differences in docs/sparse.md.

Per sample (and per query head with per_head=True; else one routing shared by all heads, as BiFormer,
whose affinity over concatenated head channels is the sum over heads of per-head affinities):
1. region means of q and k (kv head h // (Hq // Hkv)); affinity A = Qr Kr^T over the prompt's regions;
   causal: key regions whose first token comes after the query region's last token are not candidates;
2. each query region routes to its top_k candidates (ties: the lower region) and to itself;
3. an image query token sees every text key and the keys of its routed regions; a text query token sees
   every key; listed per block: query block m lists key block j when some query token of m sees some key
   of j (block granularity: other keys of a listed block are visible too), plus block m itself;
   causal keeps the blocks j <= m (the kernel then masks element by element).

Cost (FLOPs, per sample): N * D * (Hq + Hkv) for the means, 2 * R^2 * D * Hq for the affinity, and
boolean products of nb x R x R and nb x R x nb (small next to 2 * N^2 * D * Hq of dense attention).
"""
from typing import Any, Sequence, Union

import torch

from ._common import causal_blocks, cdiv, check_count, check_qk, descending_rank

Grid = tuple[int, int, int]  # an image's (start, height, width) in tokens
Regions = Union[Sequence[Grid], Sequence[Sequence[Grid]]]  # one list for the batch, or one per sample


def region_ids(grids: Sequence[tuple[int, int, int]], N: int, region_shape: Sequence[int]) -> torch.Tensor:
    """int64 [N]: the region of each token (-1 for text). grids: (start, height, width) per image, its
    height * width tokens in raster order from `start`; each cut into region_shape = (rows, cols) tiles
    (the last ones ragged), numbered image by image in raster order."""
    rid = torch.full((N,), -1, dtype=torch.int64)
    rh, rw = region_shape
    next_id = 0
    for start, height, width in grids:
        if start < 0 or height < 1 or width < 1 or start + height * width > N:
            raise ValueError(f"region_routing: image grid (start={start}, height={height}, width={width}) must "
                             f"have positive sizes and lie within the {N} tokens")
        if bool((rid[start:start + height * width] >= 0).any()):
            raise ValueError(f"region_routing: image grids overlap at (start={start}, height={height}, width={width})")
        r = torch.arange(height)[:, None] // rh
        c = torch.arange(width)[None, :] // rw
        rid[start:start + height * width] = (next_id + r * cdiv(width, rw) + c).flatten()
        next_id += cdiv(height, rh) * cdiv(width, rw)
    return rid


def _per_sample(regions: Sequence[Any], B: int) -> list[list[Grid]]:
    """regions as one list of grids per sample."""
    if len(regions) and isinstance(regions[0], (tuple, list)) and len(regions[0]) and \
            isinstance(regions[0][0], (tuple, list)):
        if len(regions) != B:
            raise ValueError(f"region_routing: regions has {len(regions)} per-sample lists, the batch has {B}")
        return [list(r) for r in regions]
    return [list(regions)] * B


def region_routing_flops(B: int, Hq: int, Hkv: int, N: int, D: int, regions: int, block_size: int = 128) -> int:
    nb = cdiv(N, block_size)
    return B * (N * D * (Hq + Hkv) + 2 * regions * regions * D * Hq + 2 * nb * regions * (regions + nb))


def region_routing(q: torch.Tensor, k: torch.Tensor, regions: Regions, *, top_k: int = 4,
                   region_shape: tuple[int, int] = (4, 4), block_size: int = 128, causal: bool = True,
                   per_head: bool = False, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """Region-routing block lists for prefill self-attention over text and image tokens.

    q: [B, Hq, N, D], k: [B, Hkv, N, D]. regions: the images as (start, height, width) token grids, one list
    shared by the batch or one list per sample. top_k: key regions each query region routes to (besides
    itself); region_shape: (rows, cols) tokens per region. causal: lists for
    block_sparse_attention(..., causal=True) (a decoder prompt); False for an encoder. per_head: one routing
    per query head (else one per sample). Returns (kv_num_blocks int32 [B, Hq or 1, nb], kv_indices int32
    [B, Hq or 1, nb, nb])."""
    from ._blocks import from_dense_blocks

    fn = "region_routing"
    B = check_qk(fn, q, k, block_size)[0]
    check_count(fn, "top_k", top_k)
    if (not isinstance(region_shape, (tuple, list)) or len(region_shape) != 2
            or any(isinstance(x, bool) or not isinstance(x, int) or x < 1 for x in region_shape)):
        raise ValueError(f"{fn}: region_shape must be two positive ints (rows, cols), got {region_shape!r}")
    rids = torch.stack([region_ids(g, q.shape[2], tuple(region_shape)) for g in _per_sample(regions, B)])
    return from_dense_blocks(region_blocks(q, k, rids.to(q.device), top_k, block_size, causal, per_head, dtype))


def _incidence(rid: torch.Tensor, nb: int, R: int, bs: int) -> tuple[torch.Tensor, torch.Tensor]:
    """bool [B, nb, R]: block m holds a token of region r; and bool [B, nb]: block m holds a text token."""
    B, N = rid.shape
    blk = (torch.arange(N, device=rid.device) // bs).expand(B, N)
    inc = torch.zeros(B, nb, R + 1, dtype=torch.bool, device=rid.device)
    inc[torch.arange(B, device=rid.device)[:, None], blk, torch.where(rid < 0, R, rid)] = True
    return inc[..., :R], inc[..., R]


def region_blocks(q: torch.Tensor, k: torch.Tensor, rid: torch.Tensor, top_k: int, bs: int, causal: bool,
                  per_head: bool, dtype: torch.dtype) -> torch.Tensor:
    """bool [B, Hq or 1, nb, nb] of region_routing; rid int64 [B, N] (-1: text)."""
    B, Hq, N, D = q.shape
    g, dev = Hq // k.shape[1], q.device
    nb, R = cdiv(N, bs), int(rid.max()) + 1 if rid.numel() else 0
    text_q = torch.ones(B, nb, dtype=torch.bool, device=dev)
    if R > 0:
        slot = (torch.arange(B, device=dev)[:, None] * (R + 1) + torch.where(rid < 0, R, rid)).flatten()  # [B * N]
        counts = torch.zeros(B * (R + 1), dtype=dtype, device=dev).index_add_(
            0, slot, torch.ones(B * N, dtype=dtype, device=dev)).view(B, R + 1)[:, :R]  # 0: a region of others

        def mean(x: torch.Tensor) -> torch.Tensor:  # [B, H, N, D] -> [B, H, R, D] region means
            H = x.shape[1]
            sums = torch.zeros(B * (R + 1), H * D, dtype=dtype, device=dev).index_add_(
                0, slot, x.transpose(1, 2).reshape(B * N, H * D).to(dtype))
            return (sums.view(B, R + 1, H, D)[:, :R] / counts.clamp(min=1)[..., None, None]).transpose(1, 2)

        aff = mean(q) @ mean(k).repeat_interleave(g, 1).transpose(-1, -2)  # [B, Hq, R, R]
        if not per_head:
            aff = aff.sum(1, keepdim=True)
        pos = torch.arange(N, device=dev).expand(B, N).flatten()
        first = torch.full((B * (R + 1),), N, device=dev).scatter_reduce(0, slot, pos, "amin").view(B, R + 1)[:, :R]
        last = torch.full((B * (R + 1),), -1, device=dev).scatter_reduce(0, slot, pos, "amax").view(B, R + 1)[:, :R]
        cand = (counts > 0)[:, None, :] & (counts > 0)[:, :, None]  # [B, R query, R key]
        if causal:
            cand &= first[:, None, :] <= last[:, :, None]
        aff = aff.masked_fill(~cand[:, None], float("-inf"))
        routed = (descending_rank(aff) < top_k) & cand[:, None]
        routed |= torch.eye(R, dtype=torch.bool, device=dev)
        q_inc, text_q = _incidence(rid, nb, R, bs)
        k_inc = q_inc.to(dtype)
        reach = (q_inc.to(dtype)[:, None] @ routed.to(dtype)) @ k_inc.transpose(1, 2)[:, None]  # [B, H', nb, nb]
        blocks = reach > 0
    else:
        blocks = torch.zeros(B, 1, nb, nb, dtype=torch.bool, device=dev)
    text_k = text_q  # the same blocks hold text, as queries and as keys
    blocks = blocks | text_q[:, None, :, None] | text_k[:, None, None, :]
    blocks = blocks | torch.eye(nb, dtype=torch.bool, device=dev)
    return blocks & causal_blocks(nb, dev) if causal else blocks
