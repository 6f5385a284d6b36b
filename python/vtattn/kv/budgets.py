"""KV budgets: token counts per layer, a pyramid schedule across layers, AdaKV's cross-head
allocation, and modality-aware limits. Pure tensor code; `policies.py` gives the scoring.

A budget is given as a ratio of the L prompt tokens, `budget=0.2` in (0, 1], or as a count,
`budget_tokens=100` (likewise `recent` / `recent_tokens` for windows, in [0, 1] / >= 0); inside,
it is a float ratio or an int count (`vtattn.pruning.resolve_keep`)."""
from typing import Any

import torch

from ..pruning import resolve_keep


def resolve_budget(budget: Any, budget_tokens: Any, name: str = "budget", stacklevel: int = 4) -> float | int:
    """The float ratio or int count of `name` / `name`_tokens; one of them is required."""
    out = resolve_keep(budget, budget_tokens, name=name, count_name=f"{name}_tokens", stacklevel=stacklevel)
    if out is None:
        raise TypeError(f"pass {name}= (a ratio in (0, 1] of the prompt) or {name}_tokens= (a token count)")
    return out


def resolve_window(recent: Any, recent_tokens: Any, name: str = "recent") -> float | int:
    """A recent window: the float ratio in [0, 1] or int count >= 0 of `name` / `name`_tokens."""
    out = resolve_keep(recent, recent_tokens, name=name, count_name=f"{name}_tokens", zero=True, stacklevel=4)
    if out is None:
        raise TypeError(f"pass {name}= (a ratio in [0, 1] of the prompt) or {name}_tokens= (a token count)")
    return out


def tokens(budget: float | int, n: int) -> int:
    """Tokens out of n: int(budget * n) for a ratio (truncated, as LOOK-M's int()), min(budget, n)
    for a count."""
    return int(budget * n) if isinstance(budget, float) else min(budget, n)


def pyramid(num_layers: int, mean_budget: float | None = None, *, mean_budget_tokens: int | None = None,
            beta: float = 20) -> list[float] | list[int]:
    """PyramidKV-style schedule: budgets decreasing linearly from the first layer to the last,
    from 2 * mean - mean / beta down to mean / beta, so the mean (the total) equals the uniform
    schedule's. A ratio mean (`mean_budget`) gives float ratios (for `budget=`); a count mean
    (`mean_budget_tokens`) gives ints (for `budget_tokens=`) summing to exactly num_layers * mean
    (cumulative rounding). Returns a list, one budget per layer."""
    if isinstance(num_layers, bool) or not isinstance(num_layers, int) or num_layers < 1:
        raise ValueError(f"num_layers must be a positive int, got {num_layers!r}")
    mean_budget = resolve_budget(mean_budget, mean_budget_tokens, "mean_budget", stacklevel=4)
    if not beta >= 1:
        raise ValueError(f"beta must be >= 1, got {beta}")
    low = mean_budget / beta
    high = 2 * mean_budget - low
    ratios = ([high - (high - low) * i / (num_layers - 1) for i in range(num_layers)] if num_layers > 1
              else [mean_budget])
    if isinstance(mean_budget, float) and ratios[0] > 1.0:
        raise ValueError(f"pyramid: the first layer's budget {ratios[0]:.3f} exceeds 1 (mean_budget={mean_budget}, "
                         f"beta={beta}); use a smaller mean_budget or beta")
    if isinstance(mean_budget, float):
        return ratios
    cum = [round(sum(ratios[:i])) for i in range(num_layers + 1)]
    counts = [cum[i + 1] - cum[i] for i in range(num_layers)]
    if min(counts) < 1:
        raise ValueError(f"pyramid: a layer gets no token (mean_budget={mean_budget}, beta={beta}); "
                         "use a smaller beta")
    return counts


def top_free(scores: torch.Tensor, allowed: torch.Tensor, free: torch.Tensor) -> torch.Tensor:
    """bool [B, H, L]: per (batch, head) the top free[b, h] allowed keys by score (ties to the
    lower position); fewer when fewer are allowed."""
    masked = scores.masked_fill(~allowed, float("-inf"))
    order = masked.argsort(dim=-1, descending=True, stable=True)
    rank = torch.arange(scores.shape[-1], device=scores.device)
    take = (rank < free[..., None]) & allowed.gather(-1, order)
    return torch.zeros_like(allowed).scatter(-1, order, take)


def adakv_allocate(scores: torch.Tensor, allowed: torch.Tensor, free: torch.Tensor, floor: float) -> torch.Tensor:
    """AdaKV cross-head allocation, bool [B, H, L]. The layer's budget sum_h free[b, h] is shared
    by the heads: each head first keeps its top int(floor * free[b, h]) keys, then one top-k over
    all heads' remaining allowed keys fills the rest. (AdaKV's code adds the floor to each head's
    share of a top-k over all keys, which can exceed a head's keys and lose budget; taking the
    floor first keeps the total exact.)"""
    B, H, L = scores.shape
    base = top_free(scores, allowed, (floor * free).long())
    rest = allowed & ~base
    extra = (free.sum(1) - base.sum((1, 2)))[:, None]  # [B, 1]: one pool per batch item
    more = top_free(scores.reshape(B, 1, H * L), rest.reshape(B, 1, H * L), extra).reshape(B, H, L)
    return base | more


def image_spans(modality: torch.Tensor) -> torch.Tensor:
    """int64 [B, L] image span ids (-1 for text) from a modality argument: bool (True = image;
    each contiguous run of image tokens is one image) or integer span ids (-1 = text) as given."""
    if modality.dtype == torch.bool:
        start = modality & ~torch.nn.functional.pad(modality[:, :-1], (1, 0))
        return torch.where(modality, start.long().cumsum(-1) - 1, -1)
    return modality.long()


def cap_per_image(scores: torch.Tensor, allowed: torch.Tensor, spans: torch.Tensor, max_per_image: int) -> torch.Tensor:
    """allowed, narrowed to the top max_per_image allowed keys of each image span per head (text
    keys stay as they are)."""
    spans = spans[:, None].expand_as(allowed)
    keep = allowed & (spans < 0)
    for s in range(int(spans.max()) + 1):
        in_span = allowed & (spans == s)
        keep |= top_free(scores, in_span, torch.full(scores.shape[:2], max_per_image, device=scores.device))
    return keep
