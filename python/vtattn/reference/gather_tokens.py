import torch


def gather_tokens(x: torch.Tensor, indices: torch.Tensor, cu_seqlens: torch.Tensor | None, total: int) -> torch.Tensor:
    """Rows x[b, indices[b, k]] of x [B, N, C]; indices outside [0, N) (the -1 padding) give zero rows.

    cu_seqlens None -> [B, K, C]. Else packed [total, C]: sample b's first
    cu_seqlens[b+1] - cu_seqlens[b] rows go to rows cu_seqlens[b]... of the output."""
    B, N, C = x.shape
    K = indices.shape[1]
    valid = (indices >= 0) & (indices < N)
    rows = torch.gather(x, 1, indices.clamp(0, max(N - 1, 0))[..., None].expand(B, K, C))
    out = rows.masked_fill(~valid[..., None], 0).contiguous()
    if cu_seqlens is None:
        return out
    if B == 0:
        return x.new_zeros(total, C)
    cu = cu_seqlens.long()
    r = torch.arange(total, device=x.device)
    b = torch.searchsorted(cu[1:].contiguous(), r, right=True).clamp(max=B - 1)  # sample of each packed row
    k = r - cu[b]
    ok = (k >= 0) & (k < K)
    return out[b, k.clamp(0, max(K - 1, 0))].masked_fill(~ok[:, None], 0)
