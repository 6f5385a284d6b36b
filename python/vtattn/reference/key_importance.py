import torch

from ._common import logits, probs, row_lse


def key_importance(q: torch.Tensor, k: torch.Tensor, lse: torch.Tensor | None, rows: torch.Tensor | None, causal: bool,
                   scale: float, softcap: float = 0.0, window: int = -1,
                   sinks: torch.Tensor | None = None) -> torch.Tensor:
    """fp32 [B, Hq, Nk]: sum over the rows `rows` ([B, R] int64, -1 skipped; None = all) of the
    attention probabilities of `attention` with the same options (softcap, window, sinks); `lse`
    ([B, Hq, Nq]) replaces the rows' own log-sum-exp (sinks included) when given."""
    s = logits(q, k, causal, scale, softcap, window)
    if lse is None:
        lse = row_lse(s, sinks)
    p = probs(s, lse)
    if rows is None:
        return p.sum(dim=2).float()
    B, H, Nq, Nk = p.shape
    valid = rows >= 0
    idx = rows.clamp(min=0)[:, None, :, None].expand(B, H, rows.shape[1], Nk)
    picked = torch.gather(p, 2, idx) * valid[:, None, :, None].to(p.dtype)
    return picked.sum(dim=2).float()
