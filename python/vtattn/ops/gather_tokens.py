from typing import Literal, overload

import torch

from . import _checks
from .select_tokens import Selection


@overload
def gather_tokens(x: torch.Tensor, selection: Selection, *, packed: Literal[False] = ...) -> torch.Tensor: ...
@overload
def gather_tokens(x: torch.Tensor, selection: Selection, *,
                  packed: Literal[True]) -> tuple[torch.Tensor, torch.Tensor]: ...
@overload
def gather_tokens(x: torch.Tensor, selection: Selection, *,
                  packed: bool) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]: ...
def gather_tokens(x: torch.Tensor, selection: Selection, *,
                  packed: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """The kept tokens of x [B, N, C] (any strides, any float dtype) given a `select_tokens` result.

    packed=False: [B, K, C], rows past counts[b] zero. packed=True: (tokens [T, C], cu_seqlens
    int32 [B + 1]) with T = sum(counts), sample b in rows cu_seqlens[b]:cu_seqlens[b+1] (varlen
    attention layout); T costs a host sync unless the selection's keep was static. The selection's
    values are checked eagerly (one host sync; skipped under torch.compile and on meta tensors).
    """
    if _checks.checking():
        _checks.tensor("x", x, 3, _checks.FLOAT_DTYPES + (torch.float64,))
        _checks.selection(selection, x, "x")
    if not packed:
        return torch.ops.vtattn.gather_tokens(x, selection.indices, None, 0)
    total = getattr(selection, "total", None)
    if total is None:
        if _checks.checking() and not _checks.concrete(selection.cu_seqlens):
            raise ValueError("gather_tokens(packed=True) needs the packed length sum(counts), which a meta / fake "
                             "selection with tensor counts does not hold: select with a static keep")
        total = int(selection.cu_seqlens[-1])
    return torch.ops.vtattn.gather_tokens(x, selection.indices, selection.cu_seqlens, total), selection.cu_seqlens
