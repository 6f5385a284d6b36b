import torch

from ._common import acc_dtype, expand_kv, probs


def index_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_indices: torch.Tensor, kv_counts: torch.Tensor,
                    q_positions: torch.Tensor, kv_positions: torch.Tensor, causal: bool, scale: float) -> torch.Tensor:
    """q [B, Hq, Nq, D]; k/v [B, Hkv, Nk, D]; kv_indices int64 [B, Hkv, L] whose first kv_counts[b, h]
    (int32 [B, Hkv]) entries list the keys (batch b, kv head h) attends to (in any order, a repeated
    index counts twice). causal: listed key j is visible to row i iff kv_positions[b, j] <= q_positions[b, i]
    (int64 [B, Nk], [B, Nq]). Returns out [B, Hq, Nq, D] in q's dtype; rows that see no key give 0.
    Unlisted keys are never read: NaN there never reaches the output."""
    B, Hkv, L = kv_indices.shape
    Hq = q.shape[1]
    listed = torch.arange(L, device=q.device) < kv_counts[..., None].long()  # [B, Hkv, L]
    idx = torch.where(listed, kv_indices, 0)
    acc = acc_dtype(q)

    def take(x: torch.Tensor) -> torch.Tensor:
        return torch.gather(x, 2, idx[..., None].expand(-1, -1, -1, x.shape[-1])).to(acc)

    kg = expand_kv(take(k), Hq)
    vg = expand_kv(take(v).masked_fill(~listed[..., None], 0.0), Hq)  # 0 * NaN would be NaN
    s = torch.matmul(q.to(acc), kg.transpose(-1, -2)) * scale  # [B, Hq, Nq, L]
    visible = expand_kv(listed[..., None, :], Hq)  # [B, Hq, 1, L]
    if causal:
        kpos = torch.gather(kv_positions, 1, idx.flatten(1)).view(B, Hkv, 1, L)
        visible = visible & expand_kv(kpos <= q_positions[:, None, :, None], Hq)
    s = s.masked_fill(~visible, float("-inf"))
    p = probs(s, torch.logsumexp(s, dim=-1))
    return torch.matmul(p, vg).to(q.dtype)
