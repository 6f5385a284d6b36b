"""KV budgets: token counts per layer, a pyramid schedule across layers, AdaKV's cross-head
allocation, and modality-aware limits. Pure tensor code; `policies.py` gives the scoring.

A budget is a float ratio in (0, 1] of the L prompt tokens or an int count >= 1 (as
`vtattn.selection.check_keep`: `1` is one token, `1.0` is everything)."""
import torch


def check_budget(budget, name="budget"):
    if isinstance(budget, bool) or not isinstance(budget, (int, float)):
        raise TypeError(f"{name} must be a float ratio in (0, 1] or a positive int count, got {budget!r}")
    if isinstance(budget, float) and not 0.0 < budget <= 1.0:
        raise ValueError(f"{name} must be a ratio in (0, 1] (or a positive int count), got {budget}")
    if isinstance(budget, int) and budget < 1:
        raise ValueError(f"{name} must be a positive token count (or a ratio in (0, 1]), got {budget}")


def check_window(window, name):
    """A recent-window size: a ratio in [0, 1] or an int count >= 0."""
    if isinstance(window, bool) or not isinstance(window, (int, float)):
        raise TypeError(f"{name} must be a float ratio in [0, 1] or an int count, got {window!r}")
    if (isinstance(window, float) and not 0.0 <= window <= 1.0) or (isinstance(window, int) and window < 0):
        raise ValueError(f"{name} must be a ratio in [0, 1] or an int count >= 0, got {window}")


def tokens(budget, n):
    """Tokens out of n: int(budget * n) for a ratio (truncated, as LOOK-M's int()), min(budget, n)
    for a count."""
    return int(budget * n) if isinstance(budget, float) else min(budget, n)


def pyramid(num_layers, mean_budget, *, beta=20):
    """PyramidKV-style schedule: budgets decreasing linearly from the first layer to the last,
    from 2 * mean - mean / beta down to mean / beta, so the mean (the total) equals the uniform
    schedule's. A ratio mean gives float ratios; a count mean gives ints summing to exactly
    num_layers * mean (cumulative rounding). Returns a list, one budget per layer."""
    if isinstance(num_layers, bool) or not isinstance(num_layers, int) or num_layers < 1:
        raise ValueError(f"num_layers must be a positive int, got {num_layers!r}")
    check_budget(mean_budget, "mean_budget")
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


def top_free(scores, allowed, free):
    """bool [B, H, L]: per (batch, head) the top free[b, h] allowed keys by score (ties to the
    lower position); fewer when fewer are allowed."""
    masked = scores.masked_fill(~allowed, float("-inf"))
    order = masked.argsort(dim=-1, descending=True, stable=True)
    rank = torch.arange(scores.shape[-1], device=scores.device)
    take = (rank < free[..., None]) & allowed.gather(-1, order)
    return torch.zeros_like(allowed).scatter(-1, order, take)


def adakv_allocate(scores, allowed, free, floor):
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


def image_spans(modality):
    """int64 [B, L] image span ids (-1 for text) from a modality argument: bool (True = image;
    each contiguous run of image tokens is one image) or integer span ids (-1 = text) as given."""
    if modality.dtype == torch.bool:
        start = modality & ~torch.nn.functional.pad(modality[:, :-1], (1, 0))
        return torch.where(modality, start.long().cumsum(-1) - 1, -1)
    return modality.long()


def cap_per_image(scores, allowed, spans, max_per_image):
    """allowed, narrowed to the top max_per_image allowed keys of each image span per head (text
    keys stay as they are)."""
    spans = spans[:, None].expand_as(allowed)
    keep = allowed & (spans < 0)
    for s in range(int(spans.max()) + 1):
        in_span = allowed & (spans == s)
        keep |= top_free(scores, in_span, torch.full(scores.shape[:2], max_per_image, device=scores.device))
    return keep
