import torch

from ._common import logits, probs


def key_importance(q, k, lse, rows, causal: bool, scale: float):
    """fp32 [B, Hq, Nk]: sum over the rows `rows` ([B, R] int64, -1 skipped; None = all)
    of softmax(scale * q k^T); `lse` ([B, Hq, Nq]) replaces the rows' own log-sum-exp when given."""
    s = logits(q, k, causal, scale)
    if lse is None:
        lse = torch.logsumexp(s, dim=-1)
    p = probs(s, lse)
    if rows is None:
        return p.sum(dim=2).float()
    B, H, Nq, Nk = p.shape
    valid = rows >= 0
    idx = rows.clamp(min=0)[:, None, :, None].expand(B, H, rows.shape[1], Nk)
    picked = torch.gather(p, 2, idx) * valid[:, None, :, None].to(p.dtype)
    return picked.sum(dim=2).float()
