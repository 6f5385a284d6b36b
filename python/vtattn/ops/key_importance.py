from typing import Callable

import torch

from . import _checks

_REDUCE: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {"mean": lambda s: s.mean(1), "sum": lambda s: s.sum(1), "max": lambda s: s.amax(1)}


def key_importance(q: torch.Tensor, k: torch.Tensor, *, rows: int | slice | str | torch.Tensor | list[int],
                   lse: torch.Tensor | None = None, scale: float | None = None, causal: bool = False,
                   reduce_heads: str | None = None, softcap: float | None = None, window: int | None = None,
                   sinks: torch.Tensor | None = None) -> torch.Tensor:
    """Exact attention mass each key receives from chosen query rows, without an N x N tensor.

    scores[b, h, j] = sum over the chosen rows i of softmax(q k^T * scale)[b, h, i, j]: the same
    numbers as eager attention's `attentions[..., i, :]` summed over i.

    q: [B, Hq, Nq, D]; k: [B, Hkv, Nk, D] (GQA allowed).
    rows: an int (0 for [CLS]; negatives count from the end), a slice (any step), a LongTensor of row
      indices ([R] shared or [B, R] per sample; duplicates count twice), a bool mask [B, Nq]
      (or [Nq]), or "all" (column sums).
    lse: optional fp32 [B, Hq, Nq] from `attention(..., return_lse=True)`; saves recomputing it (NaN or
      +inf in a selected row is refused; -inf marks a row without keys).
    causal: row i sees keys j <= i + Nk - Nq.
    softcap, window, sinks: as `attention`: the scores are that call's probabilities (e.g. Gemma2's
      softcapped or GPT-OSS's sink-normalised attention weights); a given lse replaces the rows' own.
    reduce_heads: None -> fp32 [B, Hq, Nk]; "mean" | "sum" | "max" -> fp32 [B, Nk].
    """
    check = _checks.checking()
    if check:
        _checks.attention_inputs(q, k)
        if reduce_heads is not None and reduce_heads not in _REDUCE:
            raise ValueError(f"reduce_heads must be None, 'mean', 'sum' or 'max', got {reduce_heads!r}")
        if lse is not None:
            _checks.tensor("lse", lse, 3, (torch.float32,))
            _checks.same_device({"q": q, "lse": lse})
            if lse.shape != q.shape[:3]:
                raise ValueError(f"lse must have shape [B, Hq, Nq] = {tuple(q.shape[:3])}, "
                                 f"got {tuple(lse.shape)}")
    B, _, Nq, D = q.shape
    index = _row_index(rows, B, Nq, q.device, check)
    if check and lse is not None:
        _checks.lse_values(lse, index)
    scale = _checks.resolve_scale(scale, D)
    softcap, window, sinks = _checks.attention_options(softcap, window, sinks, q, q.shape[1])
    scores = torch.ops.vtattn.key_importance(q, k, lse, index, bool(causal), scale, softcap, window, sinks)
    return scores if reduce_heads is None else _REDUCE[reduce_heads](scores)


def _row_index(rows: object, B: int, Nq: int, device: torch.device, check: bool) -> torch.Tensor | None:
    """The kernel form of `rows`: None (every row) or int64 [B, R] with -1 for 'no row'."""
    if isinstance(rows, str):
        if rows != "all":
            raise ValueError(f"rows must be 'all' when a string, got {rows!r}")
        return None
    if isinstance(rows, bool):
        raise TypeError("rows must be an int, slice, tensor or 'all', got a bool")
    if isinstance(rows, int):
        if not -Nq <= rows < Nq:
            raise IndexError(f"rows={rows} is out of range for {Nq} query rows")
        return torch.full((B, 1), rows % Nq, dtype=torch.int64, device=device)
    if isinstance(rows, slice):
        try:
            picked = range(Nq)[rows]  # any step, negative ones too
        except (TypeError, ValueError) as e:
            raise type(e)(f"rows={rows} is not a valid slice: {e}") from None
        if not picked:
            raise ValueError(f"rows={rows} selects no query row (Nq={Nq})")
        return torch.arange(picked.start, picked.stop, picked.step, device=device).expand(B, -1).contiguous()
    if isinstance(rows, (list, tuple)):
        rows = torch.tensor(rows, dtype=torch.int64, device=device)
    if not isinstance(rows, torch.Tensor):
        raise TypeError(f"rows must be an int, slice, tensor or 'all', got {type(rows).__name__}")
    if rows.device != device:
        raise ValueError(f"rows is on {rows.device} but q is on {device}")
    if rows.dim() not in (1, 2) or (rows.dim() == 2 and rows.shape[0] != B):
        raise ValueError(f"rows must be [R] or [B={B}, R] (bool: [Nq] or [B, Nq]), got {tuple(rows.shape)}")
    if rows.dtype == torch.bool:
        if rows.shape[-1] != Nq:
            raise ValueError(f"rows (bool mask) must have Nq={Nq} columns, got {tuple(rows.shape)}")
        mask = rows.expand(B, Nq)
        if check and _checks.concrete(mask) and not bool(mask.any(-1).all()):
            raise ValueError("rows (bool mask) selects no query row for some batch items")
        return torch.where(mask, torch.arange(Nq, device=device), -1)
    if rows.dtype.is_floating_point or rows.dtype.is_complex:
        raise TypeError(f"rows must be an integer or bool tensor, got {rows.dtype}")
    if rows.shape[-1] == 0:
        raise ValueError("rows selects no query row (empty index tensor)")
    if check and _checks.concrete(rows) and bool(((rows < -Nq) | (rows >= Nq)).any()):
        raise IndexError(f"rows has indices out of range for {Nq} query rows")
    rows = rows.to(torch.int64)
    return torch.where(rows < 0, rows + Nq, rows).expand(B, -1).contiguous()
