import torch

from . import _checks


def decode_attention(q, k_cache, v_cache, lengths, *, scale=None):
    """One decode step of attention over a KV cache whose valid length varies per (batch, kv head).

    q: [B, Hq, 1, D]; k_cache, v_cache: [B, Hkv, L_cap, D] (any strides with a unit last dim), Hq a
    multiple of Hkv (GQA: query head h reads kv head h // (Hq // Hkv)); fp16/bf16/fp32.
    lengths: int32 [B, Hkv] on the caches' device, each in [0, L_cap]: query heads of kv head
    (b, g) attend to keys [0, lengths[b, g]) only. A length of 0 gives an all-zero output row.
    scale: defaults to D ** -0.5.
    Returns [B, Hq, 1, D] in q's dtype. No host synchronisation in the op itself (CUDA-graph
    safe); the eager check of the length range syncs once, and is skipped under torch.compile
    and while a CUDA graph is being captured.
    """
    if _checks.checking():
        _checks.decode_inputs(q, k_cache, v_cache, lengths)
    scale = _checks.resolve_scale(scale, q.shape[-1])
    return torch.ops.vtattn.decode_attention(q, k_cache, v_cache, lengths, scale)
