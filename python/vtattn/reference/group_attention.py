import torch

from ._common import acc_dtype, expand_kv, logits, probs

CHUNK_LOGITS = 1 << 22  # elements per tensor of the chunked form (16 MiB in fp32), whatever Nq x Nk is


def _onehot(groups: torch.Tensor, num_groups: int, dtype: torch.dtype) -> torch.Tensor:
    """[B, Nk, G]: 1 where key j is in group g (a hidden key, group -1 or out of range, is in none)."""
    return (groups[..., None] == torch.arange(num_groups, device=groups.device)).to(dtype)


def group_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, groups: torch.Tensor, num_groups: int,
                    causal: bool, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention whose output is split by key group. q [B, Hq, Nq, D]; k/v [B, Hkv, Nk, D]; groups int64
    [B, Nk]: key j of sample b is in group groups[b, j] in [0, num_groups), or hidden (-1: no row sees it,
    as padding). The softmax runs over every key a row sees (causal: j <= i + Nk - Nq), then splits:
    out[b, h, i, g] = sum over the row's visible keys j of group g of P[i, j] v_j (normalised by the WHOLE
    row's softmax, so sum_g out_g is plain attention) and mass[b, h, i, g] = sum of those P[i, j].
    Returns (out [B, Hq, Nq, G, D], mass [B, Hq, Nq, G]) fp32 (fp64 for fp64 inputs); a row without
    visible keys gives 0.
    Dense: [Nq, Nk] per head (the specification; `group_attention_chunked` is the torch backend)."""
    acc = acc_dtype(q)
    s = logits(q, k, causal, scale).masked_fill((groups < 0)[:, None, None, :], float("-inf"))
    p = probs(s, torch.logsumexp(s, dim=-1))  # [B, Hq, Nq, Nk]
    onehot = _onehot(groups, num_groups, acc)  # [B, Nk, G]
    mass = torch.matmul(p, onehot[:, None])  # [B, Hq, Nq, G]
    vg = expand_kv(v.to(acc).masked_fill((groups < 0)[:, None, :, None], 0.0), q.shape[1])  # 0 * NaN is NaN
    out = torch.stack([torch.matmul(p * onehot[:, None, None, :, g], vg) for g in range(num_groups)], dim=3)
    return out, mass


def group_attention_chunked(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, groups: torch.Tensor,
                            num_groups: int, causal: bool, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """`group_attention` without an [Nq, Nk] tensor (the torch backend): one online-softmax pass over key
    chunks per chunk of query rows, every tensor at most CHUNK_LOGITS elements but the inputs and
    outputs. Each chunk's probabilities meet one matrix holding, per key, its value in its group's
    D-wide slot (0 in the others), its one-hot group and a 1: a single matmul gives every group's
    output, its mass and the row's sum. Query heads sharing a kv head are rows of one matmul (no
    expanded K/V); causal chunks right of a query chunk's last row are skipped. Same results (fp32
    accumulation; the order of sums differs)."""
    B, Hq, Nq, D = q.shape
    Hkv, Nk, G = k.shape[1], k.shape[2], num_groups
    rep, W = Hq // Hkv, G * D + G + 1
    acc = acc_dtype(q)
    out = torch.empty(B, Nq, Hq, G, D, dtype=acc, device=q.device).transpose(1, 2)
    mass = torch.empty(B, Hq, Nq, G, dtype=acc, device=q.device)
    if B * Hq * Nq == 0 or Nk == 0:
        return out.zero_(), mass.zero_()
    per_row = max(1, CHUNK_LOGITS // (B * Hq))
    kc = min(Nk, max(1, min(per_row // min(Nq, 256), CHUNK_LOGITS // (B * Hkv * W))))  # logits and the value matrix
    qc = min(Nq, max(1, min(per_row // kc, CHUNK_LOGITS // (B * Hq * W))))  # logits and the partial outputs
    off, hidden = Nk - Nq, groups < 0
    hide = torch.zeros(B, 1, 1, 1, Nk, dtype=acc, device=q.device).masked_fill_(hidden[:, None, None, None],
                                                                               float("-inf"))
    ks, vs = (x.to(acc).masked_fill(hidden[:, None, :, None], 0.0) for x in (k, v))  # 0 * NaN is NaN
    onehot = _onehot(groups, G, acc)[:, None]  # [B, 1, Nk, G]
    values = torch.empty(B, Hkv, kc, W, dtype=acc, device=q.device)
    values[..., -1] = 1.0
    qg = q.view(B, Hkv, rep, Nq, D)
    for i0 in range(0, Nq, qc):
        i1 = min(Nq, i0 + qc)
        end = min(Nk, max(0, i1 + off)) if causal else Nk
        if end == 0:  # causal rows before the first key
            out[:, :, i0:i1], mass[:, :, i0:i1] = 0.0, 0.0
            continue
        n = i1 - i0
        qi = (qg[:, :, :, i0:i1].to(acc) * scale).reshape(B, Hkv, rep * n, D)
        m: torch.Tensor
        total: torch.Tensor
        for j0 in range(0, end, kc):
            j1 = min(end, j0 + kc)
            s = torch.matmul(qi, ks[:, :, j0:j1].transpose(-1, -2))  # [B, Hkv, rep * n, kc]: rows head-major
            bias = hide[..., j0:j1]
            if causal and j1 - 1 > i0 + off:
                rows = torch.arange(i0 + off, i1 + off, device=q.device)[:, None]
                bias = bias.masked_fill(torch.arange(j0, j1, device=q.device) > rows, float("-inf"))
            s.view(B, Hkv, rep, n, j1 - j0).add_(bias)
            m_new = s.amax(-1, keepdim=True) if j0 == 0 else torch.maximum(m, s.amax(-1, keepdim=True))
            m_safe = m_new.masked_fill(torch.isneginf(m_new), 0.0)  # no visible key yet: p and alpha 0, not NaN
            p = s.sub_(m_safe).exp_()
            vals, oh = values[:, :, :j1 - j0], onehot[:, :, j0:j1]
            torch.mul(vs[:, :, j0:j1, None], oh[..., None], out=vals[..., :G * D].view(B, Hkv, j1 - j0, G, D))
            vals[..., G * D:-1] = oh
            total = torch.matmul(p, vals) if j0 == 0 else total.mul_(torch.exp(m - m_safe)).add_(torch.matmul(p, vals))
            m = m_new
        total = total.div_(total[..., -1:].masked_fill(total[..., -1:] == 0, 1.0))  # rows without keys: 0
        total = total.view(B, Hq, n, W)
        out[:, :, i0:i1] = total[..., :G * D].view(B, Hq, n, G, D)
        mass[:, :, i0:i1] = total[..., G * D:-1]
    return out, mass
