from typing import Literal, overload

import torch

from . import _checks


def _cu_seqlens(name: str, cu: torch.Tensor, total: int, device: torch.device) -> torch.Tensor | None:
    """cu_seqlens int32 [B + 1], 0 first, non-decreasing, ending at `total`; returns the lengths (None
    where the values cannot be read: meta / fake tensors)."""
    _checks.tensor(name, cu, 1, (torch.int32,))
    if cu.device != device:
        raise ValueError(f"{name} is on {cu.device} but q is on {device}")
    if cu.numel() == 0:
        raise ValueError(f"{name} must have B + 1 >= 1 entries, got none")
    if not _checks.concrete(cu):
        return None
    lens = cu.diff()
    if cu[0].item() != 0 or bool((lens < 0).any()):
        raise ValueError(f"{name} must start at 0 and be non-decreasing, got {cu.tolist()}")
    if cu[-1].item() != total:
        raise ValueError(f"{name} must end at the packed length {total}, got {cu[-1].item()}")
    return lens


def _max_seqlen(name: str, given: int | None, lens: torch.Tensor) -> int:
    longest = int(lens.max().item()) if lens.numel() else 0
    if given is None:
        return longest
    if int(given) < longest:
        raise ValueError(f"{name}={given} is below the longest sequence ({longest})")
    return int(given)


@overload
def varlen_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens_q: torch.Tensor,
                     cu_seqlens_k: torch.Tensor, *, max_seqlen_q: int | None = ..., max_seqlen_k: int | None = ...,
                     causal: bool = ..., scale: float | None = ..., return_lse: Literal[False] = ...,
                     softcap: float | None = ..., window: int | None = ...,
                     sinks: torch.Tensor | None = ...) -> torch.Tensor: ...
@overload
def varlen_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens_q: torch.Tensor,
                     cu_seqlens_k: torch.Tensor, *, max_seqlen_q: int | None = ..., max_seqlen_k: int | None = ...,
                     causal: bool = ..., scale: float | None = ..., return_lse: Literal[True],
                     softcap: float | None = ..., window: int | None = ...,
                     sinks: torch.Tensor | None = ...) -> tuple[torch.Tensor, torch.Tensor]: ...
@overload
def varlen_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens_q: torch.Tensor,
                     cu_seqlens_k: torch.Tensor, *, max_seqlen_q: int | None = ..., max_seqlen_k: int | None = ...,
                     causal: bool = ..., scale: float | None = ..., return_lse: bool,
                     softcap: float | None = ..., window: int | None = ...,
                     sinks: torch.Tensor | None = ...) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]: ...
def varlen_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens_q: torch.Tensor,
                     cu_seqlens_k: torch.Tensor, *, max_seqlen_q: int | None = None, max_seqlen_k: int | None = None,
                     causal: bool = False, scale: float | None = None, return_lse: bool = False,
                     softcap: float | None = None, window: int | None = None,
                     sinks: torch.Tensor | None = None) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Attention over a batch of variable-length sequences packed along the token dim, with no padding.

    q: [Tq, Hq, D]; k, v: [Tk, Hkv, D] (Hq a multiple of Hkv: GQA); fp16/bf16/fp32, any strides.
    cu_seqlens_q / cu_seqlens_k: int32 [B + 1], sequence b is q[cu_seqlens_q[b]:cu_seqlens_q[b+1]]
    against k/v[cu_seqlens_k[b]:cu_seqlens_k[b+1]]; empty sequences are allowed (a sequence with no
    keys gives out 0, LSE -inf).
    max_seqlen_q / max_seqlen_k: the longest sequences; computed (one host sync) when None, and must
    be given under torch.compile. Only max_seqlen_q sizes the launch; max_seqlen_k is validated and
    accepted for FlashAttention compatibility.
    causal: end-aligned within each sequence (row i of a sequence sees key j iff j <= i + Nk - Nq).
    scale: defaults to D ** -0.5.
    softcap, window, sinks: as `attention` (the window end-aligned within each sequence).
    Returns out [Tq, Hq, D] (contiguous, q's dtype) and with return_lse=True also the fp32
    log-sum-exp [Hq, Tq] (FlashAttention's varlen layout: heads first). Differentiable (q, k, v, sinks).
    """
    if _checks.checking():
        for n, t in {"q": q, "k": k, "v": v}.items():
            _checks.tensor(n, t, 3, _checks.FLOAT_DTYPES)
        # Reuse the 4-D checks on [1, H, T, D] views: dtype, device, head dim, GQA, v's shape.
        _checks.attention_inputs(*(t.transpose(0, 1)[None] for t in (q, k, v)))
        lens_q = _cu_seqlens("cu_seqlens_q", cu_seqlens_q, q.shape[0], q.device)
        lens_k = _cu_seqlens("cu_seqlens_k", cu_seqlens_k, k.shape[0], q.device)
        if cu_seqlens_q.numel() != cu_seqlens_k.numel():
            raise ValueError(f"cu_seqlens_q has {cu_seqlens_q.numel()} entries but cu_seqlens_k has "
                             f"{cu_seqlens_k.numel()} (both B + 1)")
        if lens_q is not None and lens_k is not None:
            max_seqlen_q = _max_seqlen("max_seqlen_q", max_seqlen_q, lens_q)
            _max_seqlen("max_seqlen_k", max_seqlen_k, lens_k)
        elif max_seqlen_q is None:
            raise ValueError("max_seqlen_q must be given when cu_seqlens_q is a meta / fake tensor (it sizes the "
                             "launch; finding it would read the values)")
    elif max_seqlen_q is None:
        raise ValueError("max_seqlen_q must be given under torch.compile (it sizes the launch; finding it "
                         "would read cu_seqlens_q on the host)")
    scale = _checks.resolve_scale(scale, q.shape[-1])
    softcap, window, sinks = _checks.attention_options(softcap, window, sinks, q, q.shape[1])
    out, lse = torch.ops.vtattn.varlen_attention(q, k, v, cu_seqlens_q, cu_seqlens_k, int(max_seqlen_q),
                                                 bool(causal), scale, softcap, window, sinks)
    return (out, lse) if return_lse else out
