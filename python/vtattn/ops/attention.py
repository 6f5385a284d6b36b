from typing import Literal, overload

import torch

from . import _checks


@overload
def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool = ..., scale: float | None = ...,
              return_lse: Literal[False] = ..., softcap: float | None = ..., window: int | None = ...,
              sinks: torch.Tensor | None = ...) -> torch.Tensor: ...
@overload
def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool = ..., scale: float | None = ...,
              return_lse: Literal[True], softcap: float | None = ..., window: int | None = ...,
              sinks: torch.Tensor | None = ...) -> tuple[torch.Tensor, torch.Tensor]: ...
@overload
def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool = ..., scale: float | None = ...,
              return_lse: bool, softcap: float | None = ..., window: int | None = ...,
              sinks: torch.Tensor | None = ...) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]: ...
def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool = False, scale: float | None = None,
              return_lse: bool = False, softcap: float | None = None, window: int | None = None,
              sinks: torch.Tensor | None = None) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Flash-style attention forward: `softmax(q k^T * scale) v` without an N x N tensor.

    q: [B, Hq, Nq, D]; k, v: [B, Hkv, Nk, D] with Hq a multiple of Hkv (GQA); fp16/bf16/fp32.
    causal: key j is visible to row i when j <= i + Nk - Nq (aligned to the end, as
    FlashAttention); a row that sees no key returns 0 (and LSE -inf).
    scale: defaults to D ** -0.5.
    softcap: c > 0 caps the logits as c * tanh(s / c) (Gemma2's attn_logit_softcapping); None/0: off.
    window: w >= 0 hides keys j < i + Nk - Nq - w (a left window of w keys before the row's own
      position, FlashAttention's window_size=(w, ...); transformers' sliding_window=W is w = W - 1).
    sinks: [Hq] float, one learned logit per query head joining the softmax denominator without a
      value (GPT-OSS); a row that sees no key then has LSE sinks[h].
    Returns out [B, Hq, Nq, D] (memory laid out as [B, Nq, Hq, D], like SDPA), and with
    return_lse=True also the fp32 log-sum-exp of each row's (capped) logits and sink, [B, Hq, Nq].
    Differentiable (q, k, v, sinks; the LSE too).
    """
    if _checks.checking():
        _checks.attention_inputs(q, k, v)
    scale = _checks.resolve_scale(scale, q.shape[-1])
    softcap, window, sinks = _checks.attention_options(softcap, window, sinks, q, q.shape[1])
    out, lse = torch.ops.vtattn.attention(q, k, v, bool(causal), scale, softcap, window, sinks)
    return (out, lse) if return_lse else out
