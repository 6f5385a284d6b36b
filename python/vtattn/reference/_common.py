import torch


def visible_mask(nq: int, nk: int, causal: bool, device) -> torch.Tensor:
    """[Nq, Nk] bool: key j is visible to row i (causal masks aligned to the end)."""
    if not causal:
        return torch.ones(nq, nk, dtype=torch.bool, device=device)
    i = torch.arange(nq, device=device)[:, None]
    j = torch.arange(nk, device=device)[None, :]
    return j <= i + (nk - nq)


def expand_kv(x: torch.Tensor, hq: int) -> torch.Tensor:
    """Repeat kv heads so query head h reads kv head h // (Hq // Hkv)."""
    return x.repeat_interleave(hq // x.shape[1], dim=1)


def logits(q, k, causal: bool, scale: float) -> torch.Tensor:
    """Scaled fp32 (fp64 for fp64 inputs) logits [B, Hq, Nq, Nk], invisible keys at -inf."""
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    s = torch.matmul(q.to(acc), expand_kv(k, q.shape[1]).to(acc).transpose(-1, -2)) * scale
    return s.masked_fill(~visible_mask(q.shape[2], k.shape[2], causal, q.device), float("-inf"))


def probs(s: torch.Tensor, lse: torch.Tensor) -> torch.Tensor:
    """exp(s - lse) per row; a row without visible keys (lse -inf) is all 0. NaN in a row's logits
    or lse stays NaN (never zeroed: NaN input gives NaN output)."""
    p = torch.exp(s - lse.to(s.dtype)[..., None])
    return p.masked_fill(torch.isneginf(lse)[..., None], 0.0)
