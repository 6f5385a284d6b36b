"""Visual-token pruning: which attention scores each method needs, the token importance it derives
from them, and token budgets (ratios, counts, per-view splits). Pure functions, no kernels.

(Formerly `vtattn.selection`, renamed so it cannot be confused with `vtattn.Selection`, the result of
`vtattn.select_tokens`; the old name still imports, with a DeprecationWarning.)

Nothing here knows about transformers: `vtattn.patch` records the scores (exact attention
probabilities from `vtattn.key_importance`, no N x N tensor) and hands them to these functions.

Conventions: an encoder has `num_layers` attention layers, indexed as `attentions[i]` (0-based,
negatives count from the end); `hidden_states[i]` is the output of layer i - 1 (hidden_states[0]
is the embeddings). A score row is fp32 [B, N] over all N encoder tokens, [CLS] first when the
encoder has one. Methods (docs/selection.md gives the exact rules):

  "cls"           FasterVLM: head-mean [CLS] attention row of the feature layer.
  "cls_ensemble"  VTC-CLS: head-mean [CLS] rows summed over `ensemble_layers`.
  "hired"         HiRED: budgets split over views by layer-0 [CLS] attention mass, then top-k by
                  the feature layer's [CLS] row (heads summed) within each view.
  "mean_received" encoders without [CLS]: mean attention each token receives (all rows).
  "rows"          FoPru's row strategy over the "cls" / "mean_received" importance: whole grid
                  rows with the highest total first, the rest of the budget by score.
  "auto"          "cls" when the encoder has a [CLS] token, else "mean_received".
"""
import numbers
import warnings
from typing import Any, Sequence

import torch

METHODS = ("auto", "cls", "cls_ensemble", "hired", "mean_received", "rows")
MERGE_MODES = (None, "mean", "weighted")
_NEEDS_CLS = ("cls", "cls_ensemble", "hired")


def resolve_keep(ratio: Any, count: Any, *, name: str = "keep", count_name: str = "keep_tokens", zero: bool = False,
                 default: float | int | None = None, stacklevel: int = 3) -> float | int | None:
    """One budget from a ratio argument `name` (a float in (0, 1], or [0, 1] when `zero`) and a
    count argument `count_name` (an int >= 1, or >= 0): the float ratio, the int count, or
    `default` when neither is given. An int given as the ratio is a count spelled the old way:
    1 is refused (1.0 keeps everything, a count of 1 one token); larger ints still count tokens,
    with a FutureWarning."""
    if ratio is not None and count is not None:
        raise ValueError(f"pass {name}= (a ratio) or {count_name}= (a token count), not both")
    if count is not None:
        if isinstance(count, bool) or not isinstance(count, numbers.Integral):
            raise TypeError(f"{count_name} must be an int token count, got {count!r}")
        if count < (0 if zero else 1):
            raise ValueError(f"{count_name} must be an int {'>= 0' if zero else '>= 1'}, got {count}")
        return int(count)
    if ratio is None:
        return default
    span = "[0, 1]" if zero else "(0, 1]"
    if isinstance(ratio, bool) or not isinstance(ratio, numbers.Real):
        raise TypeError(f"{name} must be a float ratio in {span} (a token count is {count_name}=), got {ratio!r}")
    if isinstance(ratio, numbers.Integral) and int(ratio) >= 1:
        if ratio == 1:
            raise ValueError(f"{name}=1 is ambiguous: {name}=1.0 keeps every token, {count_name}=1 keeps one")
        warnings.warn(f"{name}={ratio} (an int) is read as a token count: spell it {count_name}={ratio} "
                      f"({name} takes ratios in {span}; ints will be refused)", FutureWarning, stacklevel=stacklevel)
        return int(ratio)
    value = float(ratio)
    if not ((0.0 <= value if zero else 0.0 < value) and value <= 1.0):
        raise ValueError(f"{name} must be a ratio in {span} (a token count is {count_name}=), got {value}")
    return value


def check_keep(keep: object) -> None:
    """A resolved keep (`resolve_keep`): a float ratio in (0, 1] or an int count >= 1."""
    if isinstance(keep, bool) or not isinstance(keep, (int, float)):
        raise TypeError(f"keep must be a float ratio in (0, 1] or an int count, got {keep!r}")
    if (isinstance(keep, float) and not 0.0 < keep <= 1.0) or (isinstance(keep, int) and keep < 1):
        raise ValueError(f"keep must be a ratio in (0, 1] or a count >= 1, got {keep}")


def budget(keep: float | int, n: int, full: int | None = None) -> int:
    """Tokens kept out of n: max(1, round(keep * n)) for a ratio (Python rounding, half to even),
    min(keep, n) for a count. `full` (default n) is the size a count may not exceed: a count larger
    than the whole view is an error, while views cut short (LLaVA-NeXT unpadding) keep all they have."""
    if isinstance(keep, float):
        return max(1, round(keep * n)) if n else 0
    full = n if full is None else full
    if keep > full:
        raise ValueError(f"keep={keep} tokens is more than the {full} tokens of a view")
    return min(keep, n)


def resolve_method(method: str, *, has_cls: bool) -> str:
    """The concrete method: "auto" becomes "cls" or "mean_received"; [CLS] methods need a [CLS]."""
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {', '.join(map(repr, METHODS))}")
    if method == "auto":
        return "cls" if has_cls else "mean_received"
    if method in _NEEDS_CLS and not has_cls:
        raise ValueError(f"method {method!r} scores tokens with the [CLS] attention row, but this vision "
                         "encoder has no [CLS] token; use 'mean_received' or 'auto'")
    return method


def check_merge(merge: str | None) -> None:
    if merge not in MERGE_MODES:
        raise ValueError(f"merge must be None, 'mean' or 'weighted', got {merge!r}")


def layer_index(layer: int, num_layers: int, name: str = "layer") -> int:
    """A 0-based encoder layer index; negatives count from the end."""
    if isinstance(layer, bool) or not isinstance(layer, int):
        raise TypeError(f"{name} must be an int, got {layer!r}")
    if not -num_layers <= layer < num_layers:
        raise IndexError(f"{name} {layer} is out of range for an encoder of {num_layers} layers")
    return layer % num_layers


def feature_layer(hidden_state_index: int, num_layers: int) -> int:
    """The encoder layer whose output is `hidden_states[hidden_state_index]` (LLaVA's
    vision_feature_layer): -2 on a 24-layer CLIP-L is layer 22."""
    if isinstance(hidden_state_index, bool) or not isinstance(hidden_state_index, int):
        raise TypeError(f"the vision feature layer must be one int, got {hidden_state_index!r}")
    if not -(num_layers + 1) <= hidden_state_index <= num_layers:
        raise IndexError(f"vision feature layer {hidden_state_index} is out of range for "
                         f"{num_layers + 1} hidden states")
    index = hidden_state_index % (num_layers + 1)
    if index == 0:
        raise ValueError("the vision features are the embeddings (hidden_states[0]): no attention layer "
                         "precedes them to score tokens with")
    return index - 1


def ensemble_layers(layers: int | Sequence[int] | None, num_layers: int, feature: int) -> list[int]:
    """VTC-CLS layers, sorted and deduplicated. Default: the last third of the encoder up to the
    feature layer, `range(min(2 * num_layers // 3, feature), feature + 1)` (16..22 on CLIP-L)."""
    if layers is None:
        return list(range(min(2 * num_layers // 3, feature), feature + 1))
    if isinstance(layers, int):
        layers = [layers]
    layers = sorted({layer_index(l, num_layers, "ensemble layer") for l in layers})
    if not layers:
        raise ValueError("ensemble_layers is empty")
    return layers


def probes(method: str, *, has_cls: bool, feature: int,
           ensemble: Sequence[int] | None = None) -> dict[int, tuple[int | str, str]]:
    """{encoder layer: (rows, head reduction)} whose `key_importance` scores `method` needs."""
    if method == "rows":
        method = "cls" if has_cls else "mean_received"
    if method == "cls":
        return {feature: (0, "mean")}
    if method == "cls_ensemble":
        return {layer: (0, "mean") for layer in ensemble or ()}
    if method == "hired":
        return {0: (0, "sum"), feature: (0, "sum")}
    return {feature: ("all", "mean")}


def importance(method: str, scores: dict[int, torch.Tensor], *, has_cls: bool, feature: int,
               ensemble: Sequence[int] | None = None) -> torch.Tensor:
    """[B, N] token importance from the recorded {layer: [B, N]} scores (all N tokens, [CLS]
    column included: callers drop what is not a feature token, without renormalising)."""
    if method == "rows":
        method = "cls" if has_cls else "mean_received"
    if method == "cls_ensemble":
        return torch.stack([scores[layer] for layer in ensemble or ()]).sum(0)
    if method == "mean_received":
        return scores[feature] / scores[feature].shape[-1]  # column sums -> mean over the N rows
    return scores[feature]


def apportion(total: int, weights: Any, caps: Any) -> torch.Tensor:
    """Split `total` into integers proportional to `weights`, each at most its cap, summing to
    `total` exactly: largest remainders (ties to the lower index); shares above a cap are fixed at
    the cap and the rest re-split. All-zero weights split evenly. Returns int64 [S]."""
    weights = torch.as_tensor(weights, dtype=torch.float64).clamp(min=0)
    caps = torch.as_tensor(caps, dtype=torch.int64)
    if total > int(caps.sum()):
        raise ValueError(f"budget {total} exceeds the {int(caps.sum())} tokens available")
    out = torch.zeros_like(caps)
    free = caps > 0
    while True:
        if not bool(free.any()):
            return out
        rest = total - int(out[~free].sum())
        w = torch.where(free, weights, 0.0)
        w = w if float(w.sum()) > 0 else free.double()
        quota = rest * w / w.sum()
        over = free & (quota > caps)
        if not bool(over.any()):
            break
        out[over] = caps[over]
        free &= ~over
    share = quota.floor().long()
    left = rest - int(share.sum())
    order = sorted(range(len(share)), key=lambda i: (-(float(quota[i]) - int(share[i])), i))
    for i in [i for i in order if free[i]][:left]:
        share[i] += 1
    out[free] = share[free]
    return out


def region_mass(grid_scores: torch.Tensor, grid: int, nh: int, nw: int) -> torch.Tensor:
    """Sum of a square view's [g*g] scores in each cell of an nh x nw split of the g x g grid
    (rows [i*g//nh, (i+1)*g//nh), likewise columns), row-major: [nh * nw]."""
    s = grid_scores.reshape(grid, grid)
    rows = [i * grid // nh for i in range(nh + 1)]
    cols = [j * grid // nw for j in range(nw + 1)]
    return torch.stack([s[rows[i]:rows[i + 1], cols[j]:cols[j + 1]].sum()
                        for i in range(nh) for j in range(nw)])


def hired_budgets(keep: float | int, alpha: float, view_tokens: Any, crop_mass: Any) -> torch.Tensor:
    """HiRED per-view budgets for one image: view 0 is the full (base) image, the others its crops.
    Total T = budget(keep, sum(view_tokens)); the base view gets round(alpha * T) (capped at its
    tokens); the rest is split over the crops in proportion to `crop_mass` (the base view's
    layer-0 [CLS] attention falling into each crop's region) by `apportion`. int64 [1 + crops]."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    caps = torch.as_tensor(view_tokens, dtype=torch.int64)
    total = budget(keep, int(caps.sum()))
    crop_caps = int(caps[1:].sum())
    base = min(round(alpha * total), int(caps[0]))
    base = max(base, total - crop_caps)  # crops full: the base view takes what is left
    crops = apportion(total - base, crop_mass, caps[1:]) if len(caps) > 1 else caps[1:]
    return torch.cat([torch.tensor([base]), crops])


def hired_budgets_release(keep: float | int, alpha: float, views: int, early_base: torch.Tensor) -> torch.Tensor:
    """HiRED's per-view budgets as its release computes them (`hired_split="release"`), for one image
    of `views` views (the base view, then the crops) of n tokens each, padding included. Total
    T = int(views * n * keep) (a count: keep itself); the base view gets min(int(T * alpha), n); the
    crops share S = min(T - base, (views - 1) * n): the base view's top int(n * (1 - alpha)) tokens by
    its layer-0 [CLS] row `early_base` [n] (ties to the lower index) are counted in views - 1
    consecutive chunks of its row-major tokens (chunk k: [k * n // C, (k + 1) * n // C) for C crops),
    and crop k gets int(S * count_k / total) (fp32 as the release; 0 when nothing is counted), at most
    n. int64 [views]."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    n, crops = early_base.numel(), views - 1
    total = keep if isinstance(keep, int) else int(views * n * keep)
    base = min(int(total * alpha), n)
    share = min(total - base, crops * n)
    out = torch.zeros(views, dtype=torch.int64)
    out[0] = base
    if crops < 1 or share <= 0:
        return out
    marked = torch.zeros(n, dtype=torch.bool)
    marked[torch.sort(-early_base.double().cpu(), stable=True).indices[:int(n * (1 - alpha))]] = True
    counts = torch.stack([marked[k * n // crops:(k + 1) * n // crops].sum() for k in range(crops)])
    if int(counts.sum()) > 0:
        out[1:] = (counts / counts.sum() * share).to(torch.int64).clamp(max=n)
    return out


def rows_first(scores: torch.Tensor, width: int, counts: Any) -> torch.Tensor:
    """FoPru's row strategy as scores for a top-k: the counts[b] // width grid rows of row b
    with the highest total score (ties to the lower row) are lifted above every other token, so a
    top-k of counts[b] keeps those whole rows and fills the rest by score. Negative scores mark
    tokens that are not part of the view: they count for nothing and are never lifted."""
    B, N = scores.shape
    if N % width:
        raise ValueError(f"{N} tokens do not form grid rows of width {width}")
    counts = torch.as_tensor(counts, device=scores.device).reshape(B, 1)
    totals = scores.clamp(min=0).view(B, N // width, width).sum(-1)
    order = torch.sort(-totals, dim=-1, stable=True).indices
    rows = torch.arange(N // width, device=scores.device).expand(B, -1)
    rank = torch.empty_like(order).scatter_(1, order, rows)
    lifted: torch.Tensor = (rank < counts // width).repeat_interleave(width, dim=1) & (scores >= 0)
    return scores + lifted * (2 * scores.amax() + 1)
