import torch


def select_tokens(scores: torch.Tensor, budgets: torch.Tensor, segments: list[int], max_keep: int,
                  sort: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Segmented top-k: (indices [B, max_keep] int64, mask [B, N] bool, counts [B] int64).

    scores [B, N] (compared in fp32; NaN ranks above +inf, -0 ties with +0, as torch.sort);
    budgets int64 [B, S], clamped to [0, segment length]; segments: S lengths summing to N.
    In each (sample, segment) the budget's top scores are kept, ties to the lower index.
    indices lists the kept tokens in ascending order (sort=True) or segment by segment in
    descending-score order (sort=False); slots past counts[b] hold -1."""
    B, N = scores.shape
    s = scores.float()
    kept = torch.zeros(B, N, dtype=torch.bool, device=scores.device)
    rank = torch.empty(B, N, dtype=torch.int64, device=scores.device)  # segment-major score order
    start = 0
    for i, length in enumerate(segments):
        part = slice(start, start + length)
        order = torch.sort(s[:, part], dim=1, descending=True, stable=True).indices
        r = torch.empty_like(order).scatter_(1, order, torch.arange(length, device=s.device).expand(B, length))
        kept[:, part] = r < budgets[:, i].clamp(0, length)[:, None]
        rank[:, part] = start + r
        start += length
    counts = kept.sum(1)
    position = rank if not sort else torch.arange(N, device=s.device).expand(B, N)
    # Kept tokens first, in output order; keys are distinct, so the order is unique.
    picked = torch.where(kept, position, N + position).argsort(dim=1)[:, :max_keep]
    slots = torch.arange(max_keep, device=s.device)
    return torch.where(slots < counts[:, None], picked, -1), kept, counts
