import torch

from ._common import acc_dtype, expand_kv, probs


def decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, lengths: torch.Tensor,
                     scale: float) -> torch.Tensor:
    """out [B, Hq, 1, D] in q's dtype: each query head attends to the first lengths[b, kv head] keys of
    its kv head's cache; a head with length 0 gives zeros. Lengths outside [0, L_cap] act clamped to it
    (as in the GPU kernels, where the public range check is skipped). Nothing past a length is read:
    NaN there never reaches the output."""
    Hq, cap = q.shape[1], k_cache.shape[2]
    acc = acc_dtype(q)
    valid = (torch.arange(cap, device=q.device) < expand_kv(lengths[..., None], Hq))[:, :, None, :]  # [B, Hq, 1, L]
    s = torch.matmul(q.to(acc), expand_kv(k_cache, Hq).to(acc).transpose(-1, -2)) * scale
    s = s.masked_fill(~valid, float("-inf"))
    p = probs(s, torch.logsumexp(s, dim=-1))
    v = expand_kv(v_cache, Hq).to(acc).masked_fill(~valid.transpose(-1, -2), 0.0)  # 0 * NaN would be NaN
    return torch.matmul(p, v).to(q.dtype)
