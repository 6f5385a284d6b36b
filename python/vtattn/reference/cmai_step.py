"""CMAI's second pass for a run of text rows (`patch.cmai`: every text row of a prefill, a decode
step's new rows), against the layer's record: the text and image keys / values as per-sample lists,
and every earlier text entry's P_ti. In chunks of rows, so that no temporary passes CHUNK_LOGITS
elements whatever the lengths (the prefill runs this form; a decode step the op's kernels)."""
from __future__ import annotations

import math

import torch

from ._common import acc_dtype

CHUNK_LOGITS = 1 << 22  # logits per chunk of rows (B x Hq x rows x (T + I))


def _grouped(a: torch.Tensor, b: torch.Tensor, kv_heads: int) -> torch.Tensor:
    """a [B, Hq, R, X] @ b [B, Hkv, X, Y] with query head h on kv head h // (Hq // Hkv): [B, Hq, R, Y]."""
    B, Hq, R, X = a.shape
    out = torch.matmul(a.reshape(B, kv_heads, (Hq // kv_heads) * R, X), b)
    return out.view(B, Hq, R, out.shape[-1])


def cmai_step(q: torch.Tensor, k_t: torch.Tensor, v_t: torch.Tensor, text: torch.Tensor, text_ok: torch.Tensor,
              k_i: torch.Tensor, v_i: torch.Tensor, image: torch.Tensor, image_ok: torch.Tensor, p_ti: torch.Tensor,
              keep: float, weight: float, scale: float) -> torch.Tensor:
    """The inhibited attention of the last R text entries, out [B, Hq, R, D] fp32 (fp64 for fp64
    inputs; 0 for an entry that holds no token); writes their P_ti rows.

    q [B, Hq, R, D]: the rows' queries, rows of entries T - R .. T - 1. The record: k_t / v_t
    [B, Hkv, T, D] the text entries' keys / values (GQA: query head h reads kv head h // (Hq / Hkv)),
    text [B, T] int64 their token positions, text_ok [B, T] bool which entries hold a token (those
    ascending by position); k_i / v_i [B, Hkv, I, D], image [B, I], image_ok [B, I] the image tokens
    alike; p_ti [B, Hq, T, I] fp32, entry t's probabilities on the image keys (rows before T - R are
    read, the R last written).

    Row r (entry e, position a, text_ok[e] true) sees the listed text and image tokens at positions
    <= a. With s = scale * q . k over them (fp32) and lse their log-sum-exp: p_ti[e] = exp(s_i - lse)
    (0 off the visible keys); focus on image key i = mean over query heads of sum over the visible
    text entries t of exp(s_t - lse) p_ti[t, i]; the row keeps the max(1, round(keep * n)) of its n
    visible image keys with the highest focus (ties to the lower index; round half to even), the
    others' probabilities are multiplied by `weight` (0 masks them) and the row renormalised."""
    B, Hq, R, D = q.shape
    Hkv = k_t.shape[1]
    T, I = text.shape[1], image.shape[1]
    first = T - R
    acc = acc_dtype(q)  # (fp64 for the float64 checks)
    kt, vt = k_t.to(acc).transpose(-1, -2), v_t.to(acc)
    ki, vi = k_i.to(acc).transpose(-1, -2), v_i.to(acc)  # (no copy for fp32)
    out = q.new_zeros(B, Hq, R, D, dtype=acc)
    step = max(1, CHUNK_LOGITS // max(1, B * Hq * (T + I)))
    shift = float("-inf") if weight == 0.0 else math.log(weight)
    for c in range(0, R, step):
        where = slice(first + c, first + min(R, c + step))
        at, ok = text[:, where], text_ok[:, where]  # [B, C] the rows' positions
        sees_t = (text_ok[:, None, :] & (text[:, None, :] <= at[:, :, None]) & ok[:, :, None])[:, None]
        sees_i = image_ok[:, None, :] & (image[:, None, :] <= at[:, :, None]) & ok[:, :, None]  # [B, C, I]
        qc = q[:, :, c:c + step].to(acc)
        s_t = (_grouped(qc, kt, Hkv) * scale).masked_fill(~sees_t, float("-inf"))
        s_i = (_grouped(qc, ki, Hkv) * scale).masked_fill(~sees_i[:, None], float("-inf"))
        lse = torch.logaddexp(s_t.logsumexp(-1), s_i.logsumexp(-1)).masked_fill(~ok[:, None], 0.0)[..., None]
        p_ti[:, :, where] = torch.exp(s_i - lse).detach()  # they only score
        done = where.stop  # entries past the chunk are later tokens: no row of it sees them
        focus = torch.matmul(torch.exp(s_t[..., :done] - lse).detach(), p_ti[:, :, :done]).mean(1)  # [B, C, I]
        n = sees_i.sum(-1, keepdim=True)
        budget = torch.where(n > 0, torch.round(keep * n.to(torch.float64)).clamp(min=1), 0)
        order = torch.sort(focus.masked_fill(~sees_i, float("-inf")), dim=-1, descending=True, stable=True).indices
        rank = torch.empty_like(order).scatter_(-1, order, torch.arange(I, device=q.device).expand_as(order))
        gone = (sees_i & (rank >= budget))[:, None]
        s_i = s_i.masked_fill(gone, shift) if weight == 0.0 else torch.where(gone, s_i + shift, s_i)
        top = torch.maximum(s_t.amax(-1), s_i.amax(-1)).masked_fill(~ok[:, None], 0.0)[..., None]
        e_t, e_i = torch.exp(s_t - top), torch.exp(s_i - top)
        total = e_t.sum(-1, keepdim=True) + e_i.sum(-1, keepdim=True)
        o = _grouped(e_t, vt, Hkv) + _grouped(e_i, vi, Hkv)
        out[:, :, c:c + step] = o / torch.where(total > 0, total, 1.0)
    return out
