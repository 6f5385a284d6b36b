import torch

from . import _checks

_INT = (torch.int32, torch.int64)


def _positions(name: str, pos: torch.Tensor | None, B: int, N: int, default: torch.Tensor) -> torch.Tensor:
    """[B, N] int64 contiguous positions from an int [N] or [B, N] tensor (default when None)."""
    if pos is None:
        pos = default
    elif _checks.checking():
        _checks.tensor(name, pos, None, _INT)
        if pos.dim() not in (1, 2) or pos.shape[-1] != N or (pos.dim() == 2 and pos.shape[0] != B):
            raise ValueError(f"{name} must be [{N}] or [{B}, {N}], got {tuple(pos.shape)}")
    return pos.to(torch.int64).expand(B, N).contiguous()


def index_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_indices: torch.Tensor, *,
                    kv_counts: torch.Tensor | None = None, q_positions: torch.Tensor | None = None,
                    kv_positions: torch.Tensor | None = None, causal: bool = False,
                    scale: float | None = None) -> torch.Tensor:
    """Attention in which every (batch, kv head) sees only its own listed keys, read by index inside
    the kernel (no gathered copy of K/V).

    q: [B, Hq, Nq, D]; k, v: [B, Hkv, Nk, D] (GQA: query head h uses kv head h // (Hq // Hkv)).
    kv_indices: int32/int64 [B, Hkv, L], key indices in [0, Nk); entries past kv_counts are ignored
    (may be -1 padding). Any order; a repeated index counts as two keys (as gather-then-attention).
    kv_counts: int32 [B, Hkv] in [0, L], the valid prefix of each list (default L). A (batch, head)
    with count 0 gives out 0 for its rows.
    causal: listed key j is visible to row i iff kv_positions[b, j] <= q_positions[b, i], so pruned
    sequences keep the original causality. q_positions int [Nq] or [B, Nq] defaults to
    arange(Nq) + Nk - Nq (end-aligned, as vtattn.attention); kv_positions int [Nk] or [B, Nk] to
    arange(Nk). A row that sees no key gives 0.
    scale: defaults to D ** -0.5.
    Returns out [B, Hq, Nq, D] in q's dtype, laid out as [B, Nq, Hq, D] (like vtattn.attention).
    """
    if _checks.checking():
        _checks.attention_inputs(q, k, v)
        _checks.tensor("kv_indices", kv_indices, 3, _INT)
        _checks.same_device({"q": q, "kv_indices": kv_indices, "kv_counts": kv_counts,
                             "q_positions": q_positions, "kv_positions": kv_positions})
        if tuple(kv_indices.shape[:2]) != tuple(k.shape[:2]):
            raise ValueError(f"kv_indices must be [B, Hkv, L] = [{k.shape[0]}, {k.shape[1]}, L], "
                             f"got {tuple(kv_indices.shape)}")
    B, Hkv, L = kv_indices.shape
    Nq, Nk = q.shape[2], k.shape[2]
    if kv_counts is None:
        kv_counts = torch.full((B, Hkv), L, dtype=torch.int32, device=q.device)
    elif _checks.checking():
        _checks.tensor("kv_counts", kv_counts, 2, (torch.int32,))
        if tuple(kv_counts.shape) != (B, Hkv):
            raise ValueError(f"kv_counts must be [{B}, {Hkv}], got {tuple(kv_counts.shape)}")
    kv_indices = kv_indices.to(torch.int64).contiguous()
    if _checks.checking() and kv_counts.numel() and _checks.concrete(kv_counts):
        _check_lists(kv_indices, kv_counts, Nk)
    q_positions = _positions("q_positions", q_positions, B, Nq, torch.arange(Nq, device=q.device) + (Nk - Nq))
    kv_positions = _positions("kv_positions", kv_positions, B, Nk, torch.arange(Nk, device=q.device))
    scale = _checks.resolve_scale(scale, q.shape[-1])
    return torch.ops.vtattn.index_attention(q, k, v, kv_indices, kv_counts.contiguous(), q_positions, kv_positions,
                                            bool(causal), scale)


def _check_lists(kv_indices: torch.Tensor, kv_counts: torch.Tensor, Nk: int) -> None:
    """kv_counts in [0, L], listed indices in [0, Nk): one sync (a bad value is a wrong answer or, in
    the GPU kernels, a row of zeros)."""
    L = kv_indices.shape[2]
    bad_count = (kv_counts < 0) | (kv_counts > L)
    listed = torch.arange(L, device=kv_indices.device) < kv_counts[..., None]
    bad = listed & ((kv_indices < 0) | (kv_indices >= Nk))
    count_bad, index_bad = torch.stack([bad_count.any(), bad.any()]).tolist()
    if count_bad:
        raise ValueError(f"kv_counts must lie in [0, L={L}], got min {kv_counts.min().item()} "
                         f"max {kv_counts.max().item()}")
    if index_bad:
        raise ValueError(f"kv_indices must lie in [0, Nk={Nk}) within kv_counts, got "
                         f"{kv_indices[bad][0].item()} at {tuple(bad.nonzero()[0].tolist())}")
