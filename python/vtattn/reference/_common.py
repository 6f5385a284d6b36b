import torch


def visible_mask(nq: int, nk: int, causal: bool, device: torch.device | str, window: int = -1) -> torch.Tensor:
    """[Nq, Nk] bool: key j is visible to row i. With off = Nk - Nq (masks aligned to the end):
    causal hides j > i + off; a window w >= 0 hides j < i + off - w (with or without causal)."""
    i = torch.arange(nq, device=device)[:, None] + (nk - nq)
    j = torch.arange(nk, device=device)[None, :]
    visible = torch.ones(nq, nk, dtype=torch.bool, device=device)
    if causal:
        visible &= j <= i
    if window >= 0:
        visible &= j >= i - window
    return visible


def expand_kv(x: torch.Tensor, hq: int) -> torch.Tensor:
    """Repeat kv heads so query head h reads kv head h // (Hq // Hkv)."""
    return x.repeat_interleave(hq // x.shape[1], dim=1)


def acc_dtype(x: torch.Tensor) -> torch.dtype:
    """fp32 accumulation (fp64 for fp64 inputs, the float64 checks)."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def logits(q: torch.Tensor, k: torch.Tensor, causal: bool, scale: float, softcap: float = 0.0, window: int = -1) -> torch.Tensor:
    """Scaled fp32 (fp64 for fp64 inputs) logits [B, Hq, Nq, Nk], softcapped (c * tanh(s / c)) when
    softcap > 0, invisible keys at -inf."""
    acc = acc_dtype(q)
    s = torch.matmul(q.to(acc), expand_kv(k, q.shape[1]).to(acc).transpose(-1, -2)) * scale
    if softcap > 0:
        s = torch.tanh(s / softcap) * softcap
    return s.masked_fill(~visible_mask(q.shape[2], k.shape[2], causal, q.device, window), float("-inf"))


def row_lse(s: torch.Tensor, sinks: torch.Tensor | None) -> torch.Tensor:
    """Log-sum-exp of each row of s [B, Hq, Nq, Nk] with head h's sink logit (sinks [Hq], unscaled,
    valueless) joining the sum: log(exp(sink_h) + sum_j exp(s_ij)). -inf for a row without keys or sink."""
    lse = torch.logsumexp(s, dim=-1)
    if sinks is None:
        return lse
    return torch.logaddexp(lse, sinks.to(s.dtype)[:, None])


def probs(s: torch.Tensor, lse: torch.Tensor) -> torch.Tensor:
    """exp(s - lse) per row; a row without visible keys (lse -inf) is all 0, and so is a key a row
    does not see (s -inf), also in a NaN row. NaN in a row's visible logits or lse stays NaN (never
    zeroed: NaN input gives NaN output)."""
    p = torch.exp(s - lse.to(s.dtype)[..., None])
    return p.masked_fill(torch.isneginf(lse)[..., None] | torch.isneginf(s), 0.0)
