import torch

from ._common import expand_kv, logits, probs


def attention(q, k, v, causal: bool, scale: float):
    """(out [B, Hq, Nq, D] in q's dtype, lse [B, Hq, Nq] fp32); rows without keys: out 0, lse -inf."""
    s = logits(q, k, causal, scale)
    lse = torch.logsumexp(s, dim=-1)
    p = probs(s, lse)
    out = torch.matmul(p, expand_kv(v, q.shape[1]).to(p.dtype))
    return out.to(q.dtype), lse.float()
