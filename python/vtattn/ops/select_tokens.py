import numbers
import warnings
from typing import Any, NamedTuple, Sequence

import torch
import torch.nn.functional as F

from .. import pruning
from . import _checks


class _Fields(NamedTuple):
    indices: torch.Tensor  # [B, K] int64: kept token positions, -1 past counts[b]
    mask: torch.Tensor  # [B, N] bool: kept tokens
    counts: torch.Tensor  # [B] int64: kept tokens per sample
    cu_seqlens: torch.Tensor  # [B + 1] int32: zero-prepended cumsum of counts (packed layout)


class Selection(_Fields):
    """The result of `select_tokens`. `total` is the packed token count sum(counts) when it is
    known without reading the device (every sample keeps K tokens: a static keep), else None."""

    @property
    def total(self) -> int | None:
        return None


class _Uniform(Selection):
    """A Selection whose every sample keeps K = indices.shape[1] tokens, so total = B * K. A subclass,
    not an instance attribute: torch 2.11's dynamo mis-guards attributes of a NamedTuple instance."""

    @property
    def total(self) -> int:
        return self.indices.shape[0] * self.indices.shape[1]


def select_tokens(scores: torch.Tensor, keep: float | int | torch.Tensor | None = None, *,
                  keep_tokens: int | torch.Tensor | None = None, segments: Sequence[int] | None = None,
                  sort: bool = True) -> Selection:
    """Keep the top-scoring tokens of every sample (and of every segment: crop, frame).

    scores: float [B, N], ranked in fp32; ties go to the lower index (deterministic).
    keep: a ratio in (0, 1]: each segment keeps max(1, round(keep * length)) tokens (Python's round).
    keep_tokens (instead of keep): an int count per segment, or an integer tensor of counts: [B] per
      sample (one segment) or [B, S] per (sample, segment). Tensor counts cost a host sync (the
      output width). An int or a tensor passed as keep still counts tokens (FutureWarning; keep=1 raises).
    segments: None (one segment of N) or S segment lengths summing to N, shared by the batch.
    sort: True lists kept tokens in ascending (original) order; False segment by segment in
      descending-score order.
    Returns Selection(indices [B, K] int64 with K the largest per-sample total and -1 past
    counts[b], mask [B, N] bool, counts [B] int64, cu_seqlens [B + 1] int32).
    """
    check = _checks.checking()
    if check:
        _checks.tensor("scores", scores, 2, _checks.FLOAT_DTYPES + (torch.float64,))
    B, N = scores.shape
    segments = _segments(segments, N) if check else [N] if segments is None else [int(n) for n in segments]
    budgets, max_keep, total = _budgets(_keep(keep, keep_tokens), segments, B, scores.device, check)
    if check and _checks.concrete(scores) and bool(scores.isnan().any()):
        raise ValueError("scores contains NaN")
    indices, mask, counts = torch.ops.vtattn.select_tokens(scores, budgets, segments, max_keep, bool(sort))
    return (Selection if total is None else _Uniform)(indices, mask, counts,
                                                       F.pad(counts.cumsum(0, dtype=torch.int32), (1, 0)))


def _segments(segments: object, N: int) -> list[int]:
    if N == 0:
        raise ValueError("scores has no tokens (N = 0)")
    if segments is None:
        return [N]
    if not isinstance(segments, (list, tuple)) or not all(
            isinstance(n, numbers.Integral) and not isinstance(n, bool) for n in segments):
        raise TypeError(f"segments must be a list or tuple of int lengths, got {segments!r}")
    segments = [int(n) for n in segments]
    if not segments or min(segments) < 1:
        raise ValueError(f"segments must be positive lengths (no empty segment), got {segments}")
    if sum(segments) != N:
        raise ValueError(f"segments sum to {sum(segments)} but scores has N = {N} tokens")
    return segments


def _keep(keep: Any, keep_tokens: Any) -> float | int | torch.Tensor:
    """The one budget of keep / keep_tokens: a float ratio, an int count or an integer tensor."""
    if isinstance(keep, torch.Tensor) or isinstance(keep_tokens, torch.Tensor):
        if keep is not None and keep_tokens is not None:
            raise ValueError("pass keep= (a ratio) or keep_tokens= (counts), not both")
        if keep is not None:
            warnings.warn("select_tokens(keep=<tensor>) counts tokens: spell it keep_tokens=<tensor> (keep takes "
                          "ratios in (0, 1])", FutureWarning, stacklevel=3)
        counts: torch.Tensor = keep if keep is not None else keep_tokens
        return counts
    resolved = pruning.resolve_keep(keep, keep_tokens, stacklevel=4)
    if resolved is None:
        raise TypeError("select_tokens needs keep= (a ratio in (0, 1]) or keep_tokens= (a count or a tensor of counts)")
    return resolved


def _budgets(keep: float | int | torch.Tensor, segments: list[int], B: int, device: torch.device,
             check: bool) -> tuple[torch.Tensor, int, int | None]:
    """(budgets int64 [B, S], the output width K, the packed total when static else None)."""
    if isinstance(keep, torch.Tensor):
        return _tensor_budgets(keep, segments, B, device, check)
    if isinstance(keep, int):
        if keep > min(segments):
            raise ValueError(f"keep_tokens={keep} is more than the {min(segments)} tokens of the shortest segment")
        per_segment = [keep] * len(segments)
    else:
        per_segment = [max(1, round(keep * n)) for n in segments]
    K = sum(per_segment)
    return _device_row(per_segment, device).expand(B, -1), K, B * K


def _device_row(values: list[int], device: torch.device) -> torch.Tensor:
    """int64 [1, S] on device, without a host sync (a fill, or a copy from pinned memory)."""
    if len(set(values)) == 1:
        return torch.full((1, len(values)), values[0], dtype=torch.int64, device=device)
    row = torch.tensor([values], dtype=torch.int64)
    if device.type == "cuda" and not torch.compiler.is_compiling():
        return row.pin_memory().to(device, non_blocking=True)
    return row.to(device)


def _tensor_budgets(keep: torch.Tensor, segments: list[int], B: int, device: torch.device,
                    check: bool) -> tuple[torch.Tensor, int, int | None]:
    S = len(segments)
    if keep.dtype == torch.bool or keep.dtype.is_floating_point or keep.dtype.is_complex:
        raise TypeError(f"keep_tokens must be an integer tensor of counts when a tensor, got {keep.dtype}")
    if keep.device != device:
        raise ValueError(f"keep_tokens is on {keep.device} but scores is on {device}")
    if keep.dim() == 1 and S > 1:
        raise ValueError(f"keep_tokens of shape [B] gives one count per sample; with {S} segments give [B, S]")
    if tuple(keep.shape) not in ((B,), (B, S)):
        raise ValueError(f"keep_tokens must have shape [B] = ({B},) or [B, S] = ({B}, {S}), got {tuple(keep.shape)}")
    budgets = keep.to(torch.int64).reshape(B, S)
    counts = budgets.sum(1)
    if check and not _checks.concrete(keep):
        raise ValueError("keep_tokens as a tensor sets the output width from its values, which a meta / fake tensor does "
                         "not hold: pass an int count or a ratio")
    if not check:
        return budgets, int(counts.max()) if B else 0, None
    lengths = torch.tensor(segments, device=device)
    facts = torch.stack([(budgets < 0).any().long(), (budgets > lengths).any().long(), (counts == 0).any().long(),
                         counts.max(), counts.min()]).tolist() if B else [0, 0, 0, 0, 0]  # one host sync
    negative, too_many, empty, K, K_min = facts
    if negative:
        raise ValueError("keep_tokens has negative counts")
    if too_many:
        raise ValueError(f"keep_tokens asks for more tokens than a segment has (segment lengths {segments})")
    if empty:
        raise ValueError(f"keep_tokens keeps no token of sample {int((counts == 0).nonzero()[0])}")
    return budgets, K, B * K if K == K_min else None
