import torch

from ._common import expand_kv, logits, probs, row_lse


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, scale: float, softcap: float = 0.0,
              window: int = -1, sinks: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(out [B, Hq, Nq, D] in q's dtype, lse [B, Hq, Nq] fp32). Logits softcapped when softcap > 0,
    keys outside the causal / left window (window >= 0) hidden, sinks [Hq] joining each row's softmax
    denominator (see _common). Rows without keys: out 0, lse -inf (the sink logit with sinks)."""
    s = logits(q, k, causal, scale, softcap, window)
    lse = row_lse(s, sinks)
    p = probs(s, lse)
    out = torch.matmul(p, expand_kv(v, q.shape[1]).to(p.dtype))
    return out.to(q.dtype), lse.float()
