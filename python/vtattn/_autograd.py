"""Gradients of the registered ops. attention and varlen_attention: FlashAttention's backward in pure
PyTorch, recomputing the probabilities from the saved LSE one chunk of query rows at a time (so it runs
after any backend's forward, on any device, and traces under torch.compile). gather_tokens: its adjoint
(a scatter-add), so pruned models still train. Every other op with float outputs refuses inputs that
require grad instead of returning a result without a gradient."""
from collections.abc import Callable, Sequence
from typing import Any

import torch

from .reference._common import acc_dtype, expand_kv, probs

CHUNK_LOGITS = 1 << 24  # logits per chunk of query rows ([B, Hq, rows, Nk]): bounds the backward's memory


def _backward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor, lse: torch.Tensor,
              dout: torch.Tensor, dlse: torch.Tensor | None, scale: float, softcap: float, sinks: torch.Tensor | None,
              visible: Callable[[int, int], torch.Tensor]
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Gradients of (out, lse) = attention(q [B, Hq, Nq, D], k/v [B, Hkv, Nk, D]) given dout, dlse.
    visible(r0, r1): bool mask of rows r0..r1 broadcastable to [B, Hq, r1 - r0, Nk].
    With delta_i = <dO_i, O_i> - dlse_i: dV = P^T dO, dS = P (dO V^T - delta) (times 1 - (s/c)^2 under a
    softcap c), dQ = scale dS K, dK = scale dS^T Q (summed over a GQA group), dsink_h = -sum_i
    exp(sink_h - lse_i) delta_i. Returns (dq, dk, dv, dsinks) in the accumulation dtype."""
    acc = acc_dtype(q)
    B, Hq, Nq, D = q.shape
    Hkv, Nk = k.shape[1], k.shape[2]
    ke, ve = expand_kv(k, Hq).to(acc), expand_kv(v, Hq).to(acc)
    delta = (dout.to(acc) * out.to(acc)).sum(-1)
    if dlse is not None:
        delta = delta - dlse.to(acc)
    dq, dk, dv = [], q.new_zeros(B, Hq, Nk, D, dtype=acc), q.new_zeros(B, Hq, Nk, D, dtype=acc)
    step = max(1, CHUNK_LOGITS // max(1, B * Hq * Nk))
    for r0 in range(0, Nq, step):
        r1 = min(Nq, r0 + step)
        qc, doc = q[:, :, r0:r1].to(acc), dout[:, :, r0:r1].to(acc)
        s = torch.matmul(qc, ke.transpose(-1, -2)) * scale
        if softcap > 0:
            t = torch.tanh(s / softcap)
            s = t * softcap
        p = probs(s.masked_fill(~visible(r0, r1), float("-inf")), lse[:, :, r0:r1])
        dv += torch.matmul(p.transpose(-1, -2), doc)
        ds = p * (torch.matmul(doc, ve.transpose(-1, -2)) - delta[:, :, r0:r1, None])
        if softcap > 0:
            ds = ds * (1 - t * t)
        dq.append(torch.matmul(ds, ke) * scale)
        dk += torch.matmul(ds.transpose(-1, -2), qc) * scale
    group = Hq // Hkv
    dk, dv = (x.view(B, Hkv, group, Nk, D).sum(2) for x in (dk, dv))
    dsinks = None
    if sinks is not None:  # lse >= sink: lse is -inf only with a sink of -inf, whose gradient is 0
        lse = lse.to(acc)
        w = torch.where(torch.isneginf(lse), 0.0, torch.exp(sinks.to(acc)[:, None] - lse))
        dsinks = -(w * delta).sum((0, 2))
    return torch.cat(dq, 2) if dq else q.new_zeros(q.shape, dtype=acc), dk, dv, dsinks


def _cast(grads: Sequence[torch.Tensor | None], like: Sequence[torch.Tensor]) -> tuple[torch.Tensor | None, ...]:
    return tuple(None if g is None else g.to(t.dtype) for g, t in zip(grads, like))


def _attention_setup(ctx: Any, inputs: tuple[Any, ...], output: tuple[torch.Tensor, torch.Tensor]) -> None:
    q, k, v, causal, scale, softcap, window, sinks = inputs
    ctx.options = causal, scale, softcap, window
    ctx.save_for_backward(q, k, v, *output, sinks)


def _rule(end: torch.Tensor, pos_k: torch.Tensor, causal: bool, window: int, visible: torch.Tensor) -> torch.Tensor:
    """visible &= the causal / window rule for rows whose own position among the keys is end [R]."""
    if causal:
        visible = visible & (pos_k[None, :] <= end[:, None])
    if window >= 0:
        visible = visible & (pos_k[None, :] >= end[:, None] - window)
    return visible


def _attention_backward(ctx: Any, dout: torch.Tensor, dlse: torch.Tensor | None) -> tuple[torch.Tensor | None, ...]:
    q, k, v, out, lse, sinks = ctx.saved_tensors
    causal, scale, softcap, window = ctx.options
    Nq, Nk = q.shape[2], k.shape[2]
    pos_k = torch.arange(Nk, device=q.device)
    every = torch.ones((), dtype=torch.bool, device=q.device)

    def visible(r0: int, r1: int) -> torch.Tensor:
        return _rule(torch.arange(r0, r1, device=q.device) + (Nk - Nq), pos_k, causal, window, every)

    dq, dk, dv, dsinks = _backward(q, k, v, out, lse, dout, dlse, scale, softcap, sinks, visible)
    return (*_cast((dq, dk, dv), (q, k, v)), None, None, None, None, dsinks)


def _varlen_setup(ctx: Any, inputs: tuple[Any, ...], output: tuple[torch.Tensor, torch.Tensor]) -> None:
    q, k, v, cu_q, cu_k, _, causal, scale, softcap, window, sinks = inputs
    ctx.options = causal, scale, softcap, window
    ctx.save_for_backward(q, k, v, *output, sinks, cu_q, cu_k)


def _varlen_visible(cu_q: torch.Tensor, cu_k: torch.Tensor, Tq: int, Tk: int, causal: bool, window: int
                    ) -> Callable[[int, int], torch.Tensor]:
    """visible(r0, r1) over packed rows and keys: same sequence, and the causal / window rule on the
    positions within it (end-aligned), without reading cu_seqlens on the host."""
    def locate(cu: torch.Tensor, T: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        cu = cu.long()
        t = torch.arange(T, device=cu.device)
        # empty sequences own no row; the clamp keeps indices in range even for unvalidated cu_seqlens
        seq = (torch.searchsorted(cu, t, right=True) - 1).clamp(0, max(cu.numel() - 2, 0))
        return seq, t - cu[seq], cu[seq + 1] - cu[seq]

    seq_q, pos_q, len_q = locate(cu_q, Tq)
    seq_k, pos_k, _ = locate(cu_k, Tk)
    len_k = (cu_k[1:] - cu_k[:-1]).long()
    end = pos_q + len_k[seq_q] - len_q  # each row's own position among its sequence's keys
    return lambda r0, r1: _rule(end[r0:r1], pos_k, causal, window, seq_q[r0:r1, None] == seq_k[None, :])


def _varlen_backward(ctx: Any, dout: torch.Tensor, dlse: torch.Tensor | None) -> tuple[torch.Tensor | None, ...]:
    q, k, v, out, lse, sinks, cu_q, cu_k = ctx.saved_tensors
    causal, scale, softcap, window = ctx.options
    # [T, H, D] -> [1, H, T, D]
    heads_first: Callable[[torch.Tensor], torch.Tensor] = lambda x: x.transpose(0, 1)[None]  # noqa: E731
    visible = _varlen_visible(cu_q, cu_k, q.shape[0], k.shape[0], causal, window)
    hq, hk, hv, hout = (heads_first(x) for x in (q, k, v, out))
    dq, dk, dv, dsinks = _backward(hq, hk, hv, hout, lse[None], heads_first(dout),
                                   None if dlse is None else dlse[None], scale, softcap, sinks, visible)
    dq, dk, dv = (x[0].transpose(0, 1) for x in (dq, dk, dv))
    return (*_cast((dq, dk, dv), (q, k, v)), None, None, None, None, None, None, None, dsinks)


def _gather_tokens_setup(ctx: Any, inputs: tuple[Any, ...], output: torch.Tensor) -> None:
    x, indices, cu_seqlens, total = inputs
    ctx.x_shape, ctx.total = x.shape, total
    ctx.save_for_backward(indices, cu_seqlens)


def _gather_tokens_backward(ctx: Any, dout: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
    """dx[b, indices[b, k]] += dout of the row that copied it (the reference's mapping, duplicates add)."""
    indices, cu = ctx.saved_tensors
    B, N, C = ctx.x_shape
    K = indices.shape[1]
    dx = dout.new_zeros(B, N, C)
    if N == 0 or K == 0:
        return dx, None, None, None
    if cu is None:
        b, idx = torch.arange(B, device=dout.device)[:, None].expand(B, K), indices
    else:  # packed row r copies slot r - cu[b] of its sample b
        cu = cu.long()
        r = torch.arange(ctx.total, device=dout.device)
        b = torch.searchsorted(cu[1:].contiguous(), r, right=True).clamp(max=B - 1)
        k = r - cu[b]
        idx = torch.where((k >= 0) & (k < K), indices[b, k.clamp(0, K - 1)], -1)
    valid = (idx >= 0) & (idx < N)
    dx.index_put_((b, idx.clamp(0, N - 1)), dout.masked_fill(~valid[..., None], 0), accumulate=True)
    return dx, None, None, None


def _refusal(op: str) -> Callable[[Any, tuple[Any, ...], Any], None]:
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: Any) -> None:
        raise RuntimeError(f"vtattn.{op} has no gradient; its inputs require grad. Call it under torch.no_grad() or "
                           "on detached tensors (attention, varlen_attention and gather_tokens are differentiable).")
    return setup_context


def register(op: str, lib: torch.library.Library) -> None:
    """Autograd for torch.ops.vtattn.<op>: the backward above, or a refusal of grad-requiring inputs."""
    backward: Callable[..., Any]
    setup: Callable[[Any, tuple[Any, ...], Any], None]
    if op == "attention":
        backward, setup = _attention_backward, _attention_setup
    elif op == "varlen_attention":
        backward, setup = _varlen_backward, _varlen_setup
    elif op == "gather_tokens":
        backward, setup = _gather_tokens_backward, _gather_tokens_setup
    else:
        backward, setup = (lambda ctx, *grads: None), _refusal(op)
    torch.library.register_autograd(f"vtattn::{op}", backward, setup_context=setup, lib=lib)
