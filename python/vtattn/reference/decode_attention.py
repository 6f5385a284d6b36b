import torch

from ._common import expand_kv


def decode_attention(q, k_cache, v_cache, lengths, scale: float):
    """out [B, Hq, 1, D] in q's dtype: each query head attends to the first lengths[b, kv head] keys of
    its kv head's cache; a head with length 0 gives zeros. Lengths outside [0, L_cap] act clamped to it
    (as in the GPU kernels, where the public range check is skipped)."""
    Hq, cap = q.shape[1], k_cache.shape[2]
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    s = torch.matmul(q.to(acc), expand_kv(k_cache, Hq).to(acc).transpose(-1, -2)) * scale  # [B, Hq, 1, L]
    valid = torch.arange(cap, device=q.device) < expand_kv(lengths[..., None], Hq)  # [B, Hq, L]
    s = s.masked_fill(~valid[:, :, None, :], float("-inf"))
    p = torch.softmax(s, dim=-1).nan_to_num(0.0)  # empty heads: all -inf -> NaN -> 0
    return torch.matmul(p, expand_kv(v_cache, Hq).to(acc)).to(q.dtype)
