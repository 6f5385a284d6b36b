"""CMAI's attention (cross-modality attention inhibition; Yang et al., "Enhancing Instruction-Following
Capability of Visual-Language Models by Reducing Image Redundancy", arXiv 2411.15453): the
specification, on a whole causal sequence, from eager B x H x N x N probabilities.

The rule (docs/selection.md, "CMAI"): a text query's focus on an image token aggregates the text-to-image
attention of the text tokens it sees by its own text-to-text attention (mean over heads); each text
query keeps its `keep` share of the image tokens it sees with the highest focus, and its attention to
the others is inhibited (multiplied by `weight` before renormalising; 0 masks them). Image and padding
rows are untouched."""
from __future__ import annotations

import torch

from ._common import acc_dtype, logits, probs


def cmai_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, images: torch.Tensor, real: torch.Tensor,
                   keep: float, weight: float, scale: float | None = None) -> torch.Tensor:
    """out [B, Hq, N, D] in q's dtype, for q [B, Hq, N, D], k / v [B, Hkv, N, D] (GQA) of a whole sequence
    under causal attention; images / real [B, N] bool: image tokens, and tokens that are not padding (a
    key that is not real is seen by no row; a row that sees no key gives 0).

    With P[b, h] the softmax probabilities (row i sees the real keys j <= i), text tokens t = real and not
    image: for a text row i and an image key j it sees, focus F[i, j] = mean_h sum_t P[h, i, t] P[h, t, j]
    over the text tokens t. Row i keeps the max(1, round(keep * n_i)) of its n_i visible image keys with
    the highest focus (ties to the lower index); its probabilities on the rest are multiplied by `weight`
    and the row renormalised: out_i = sum_j w_ij P_ij v_j / sum_j w_ij P_ij. Other rows: P @ V."""
    B, Hq, N, D = q.shape
    acc = acc_dtype(q)
    scale = D ** -0.5 if scale is None else scale
    s = logits(q, k, True, scale).masked_fill(~real[:, None, None, :], float("-inf"))
    p = probs(s, torch.logsumexp(s, dim=-1))  # [B, Hq, N, N]
    text = real & ~images
    focus = (torch.matmul(p * text[:, None, None, :].to(acc), p)).mean(1)  # [B, N, N]: rows i, keys j
    causal = torch.ones(N, N, dtype=torch.bool, device=q.device).tril()
    seen = text[:, :, None] & images[:, None, :] & real[:, None, :] & causal  # text row i sees image key j
    n = seen.sum(-1)
    budget = torch.where(n > 0, torch.round(keep * n.to(torch.float64)).clamp(min=1), 0)
    order = torch.sort(focus.masked_fill(~seen, float("-inf")), dim=-1, descending=True, stable=True).indices
    rank = torch.empty_like(order).scatter_(-1, order, torch.arange(N, device=q.device).expand(B, N, N))
    inhibited = seen & (rank >= budget[..., None])
    w = torch.where(inhibited, weight, 1.0).to(acc)[:, None]  # [B, 1, N, N]
    kept = p * w
    total = kept.sum(-1, keepdim=True)
    out = torch.matmul(kept / torch.where(total > 0, total, 1.0), v.to(acc).repeat_interleave(Hq // k.shape[1], 1))
    return out.to(q.dtype)
