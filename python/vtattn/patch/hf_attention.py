"""`attn_implementation="vtattn"` for transformers models, and the score probes the patches use.

transformers calls `fn(module, query, key, value, attention_mask, scaling=..., dropout=..., **kw)`
with [B, H, N, D] tensors and wants `(out [B, N, H, D], weights)`. Unmasked attention (vision
towers) runs `vtattn.attention`; where a probe asks for it, the same call's LSE gives exact
attention scores through `vtattn.key_importance`, so a tower never needs eager attention."""
import contextlib
import contextvars
from dataclasses import dataclass

import torch

import vtattn
from ..kv._claim import claim

NAME = "vtattn"


@dataclass
class Probe:
    """What to record at one attention module: `scores = key_importance(q, k, rows=rows,
    reduce_heads=reduce)` ([B, N] fp32; none when rows is None) and, with `keys=True`, the
    module's attention keys head-concatenated ([B, N, H * D]). With `parts` a list, every call's
    scores are appended to it (a module called once per image, as Qwen2-VL's ViT)."""
    rows: object = 0
    reduce: str = "mean"
    keys: bool = False
    scores: torch.Tensor | None = None
    key_states: torch.Tensor | None = None
    parts: list | None = None


_PROBES = contextvars.ContextVar("vtattn_probes", default=None)


@contextlib.contextmanager
def probing(probes):
    """Within the block, the attention modules that are keys of `probes` ({module: Probe}) fill
    their Probe. A context variable, so concurrent threads each see their own probes."""
    token = _PROBES.set(probes)
    try:
        yield probes
    finally:
        _PROBES.reset(token)


def attention_forward(module, query, key, value, attention_mask, dropout=0.0, scaling=None,
                      is_causal=None, **kwargs):
    layer = claim(key)  # keys a vtattn.kv.CompressedCache layer just returned
    if layer is not None:
        return layer.attend(query, key, value, attention_mask, scaling).transpose(1, 2), None
    probes = _PROBES.get()
    probe = probes.get(module) if probes else None
    if attention_mask is not None or (dropout and module.training):
        if probe is not None:
            raise NotImplementedError("vtattn score probes need unmasked attention without dropout")
        # Masked attention outside a CompressedCache (a padded LLM batch on a plain cache): an
        # arbitrary 4-D mask has no vtattn kernel, so PyTorch SDPA runs it with that mask (never
        # eager: the path this package exists to avoid). FastV and the cache route their own.
        from transformers.integrations.sdpa_attention import sdpa_attention_forward
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                      scaling=scaling, is_causal=is_causal, **kwargs)
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    # vtattn aligns a causal mask to the end (row i sees keys j <= i + Nk - Nq): right for
    # decoding against a cache, where transformers leaves the mask out.
    if probe is None or probe.rows is None:
        out = vtattn.attention(query, key, value, causal=causal, scale=scaling)
    else:  # the LSE of this very call turns q k^T into exact probabilities, row by row
        out, lse = vtattn.attention(query, key, value, causal=causal, scale=scaling, return_lse=True)
        probe.scores = vtattn.key_importance(query, key, rows=probe.rows, lse=lse, scale=scaling,
                                             causal=causal, reduce_heads=probe.reduce)
        if probe.parts is not None:
            probe.parts.append(probe.scores)
    if probe is not None and probe.keys:
        probe.key_states = key.transpose(1, 2).flatten(2)
    return out.transpose(1, 2), None  # free: out is laid out [B, N, H, D] in memory


def register_hf_attention():
    """Register "vtattn" with transformers' AttentionInterface (and SDPA-style mask creation for
    it, which masked models such as the LLM need), so `attn_implementation="vtattn"` works for any
    model. Idempotent."""
    from transformers import AttentionInterface, AttentionMaskInterface
    AttentionInterface.register(NAME, attention_forward)
    AttentionMaskInterface.register(NAME, AttentionMaskInterface()["sdpa"])
