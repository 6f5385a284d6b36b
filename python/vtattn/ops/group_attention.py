import torch

from . import _checks

_INT = (torch.int32, torch.int64)


def group_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, groups: torch.Tensor, *, num_groups: int,
                    causal: bool = False, scale: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """One attention pass whose output comes split by key group, with each group's probability mass:
    any re-weighting of the groups (VAR's redistribution) is then an elementwise combine,
    `out' = sum_g w_g * out[..., g, :]`, with no second pass and no [Nq, Nk] tensor.

    q: [B, Hq, Nq, D]; k, v: [B, Hkv, Nk, D] (GQA: query head h uses kv head h // (Hq // Hkv)).
    groups: int [Nk] or [B, Nk], each key's group in [0, num_groups), or -1 for a key no row sees
    (padding). causal: key j is visible to row i iff j <= i + Nk - Nq (end-aligned, as vtattn.attention).
    scale: defaults to D ** -0.5.
    Returns (out, mass): out [B, Hq, Nq, G, D] fp32 (laid out as [B, Nq, Hq, G, D]), the sum over the
    row's visible keys of group g of softmax probability times v, the softmax taken over ALL the row's
    visible keys (so out.sum(3) is plain attention); mass [B, Hq, Nq, G] fp32, the probability of each
    group (sums to 1 over g for a row with visible keys). A row that sees no key gives 0 in both.
    """
    if _checks.checking():
        _checks.attention_inputs(q, k, v)
        _checks.tensor("groups", groups, None, _INT)
        _checks.same_device({"q": q, "groups": groups})
        if isinstance(num_groups, bool) or not isinstance(num_groups, int) or num_groups < 1:
            raise ValueError(f"num_groups must be an int >= 1, got {num_groups!r}")
        B, Nk = k.shape[0], k.shape[2]
        if groups.dim() not in (1, 2) or groups.shape[-1] != Nk or (groups.dim() == 2 and groups.shape[0] != B):
            raise ValueError(f"groups must be [{Nk}] or [{B}, {Nk}] (one group per key), got {tuple(groups.shape)}")
        if groups.numel() and _checks.concrete(groups):
            low, high = torch.stack([groups.min(), groups.max()]).tolist()  # one sync: a bad id is a wrong answer
            if low < -1 or high >= num_groups:
                raise ValueError(f"groups must lie in [-1, num_groups={num_groups}), got min {low} max {high}")
    groups = groups.to(torch.int64).expand(k.shape[0], k.shape[2]).contiguous()
    scale = _checks.resolve_scale(scale, q.shape[-1])
    return torch.ops.vtattn.group_attention(q, k, v, groups, num_groups, bool(causal), scale)
