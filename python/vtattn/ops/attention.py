import torch

from . import _checks


def attention(q, k, v, *, causal=False, scale=None, return_lse=False):
    """Flash-style attention forward: `softmax(q k^T * scale) v` without an N x N tensor.

    q: [B, Hq, Nq, D]; k, v: [B, Hkv, Nk, D] with Hq a multiple of Hkv (GQA); fp16/bf16/fp32.
    causal: key j is visible to row i when j <= i + Nk - Nq (aligned to the end, as
    FlashAttention); a row that sees no key returns 0 (and LSE -inf).
    scale: defaults to D ** -0.5.
    Returns out [B, Hq, Nq, D] (memory laid out as [B, Nq, Hq, D], like SDPA), and with
    return_lse=True also the fp32 log-sum-exp of each row's scaled logits, [B, Hq, Nq].
    """
    if _checks.checking():
        _checks.attention_inputs(q, k, v)
    scale = _checks.resolve_scale(scale, q.shape[-1])
    out, lse = torch.ops.vtattn.attention(q, k, v, bool(causal), scale)
    return (out, lse) if return_lse else out
