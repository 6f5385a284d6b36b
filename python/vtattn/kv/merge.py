"""LOOK-M's KV merging: evicted keys/values folded into the kept token whose key is most similar.

Per (batch, kv head), every evicted token that may merge (`mergeable`) joins the kept token c with
the highest key cosine similarity (ties to the lower kept position), and values follow keys:
- "avg":      k_c <- (k_c + sum_e k_e) / (1 + n_c)
- "pivotal":  each evicted token is first averaged with its pivot, then the group is averaged with
              k_c: k_c <- (k_c + sum_e (k_e + k_c) / 2) / (1 + n_c)  ==  (k_c + avg_c) / 2
- "weighted": k_c <- (k_c + sum_e w_e k_e) / (1 + sum_e w_e), w_e = max(cos(k_e, k_c), 0)
It runs on the `merge_tokens` kernels (fused nearest-kept search, no [evicted, kept] tensor) with
keys and values side by side as one [L, 2D] row per token.

rule="release": LOOK-M's released code for "avg" and "weighted" (docs/kv.md): only the evicted
tokens that pass its similarity filter merge, and "weighted" divides by 1 + n with unclamped
cosines; plain PyTorch with a [L, L] similarity per (batch, kv head)."""
import torch
import torch.nn.functional as F

MODES = ("avg", "pivotal", "weighted")
RULES = ("vtattn", "release")
RELEASE_MODES = ("avg", "weighted")  # the release's filtered merges


def merge_kv(k: torch.Tensor, v: torch.Tensor, indices: torch.Tensor, mergeable: torch.Tensor, mode: str,
             rule: str = "vtattn") -> tuple[torch.Tensor, torch.Tensor]:
    """k, v [B, Hkv, L, D]; indices int64 [B, Hkv, K] kept positions (-1 padded); mergeable bool
    [B, Hkv, L] (True = an evicted token that folds into its nearest kept one; kept tokens are
    ignored). Returns the kept rows (k, v) [B, Hkv, K, D] after merging, zero rows at padding.
    rule: "vtattn" (the formulas above) or "release" (`merge_kv_release`)."""
    if mode not in MODES:
        raise ValueError(f"merge must be one of {MODES}, got {mode!r}")
    if rule == "release":
        return merge_kv_release(k, v, indices, mergeable, mode)
    if rule != "vtattn":
        raise ValueError(f"merge rule must be one of {RULES}, got {rule!r}")
    B, H, L, D = k.shape
    K = indices.shape[-1]
    kept = torch.zeros(B, H, L + 1, dtype=torch.bool, device=k.device)
    kept = kept.scatter(-1, torch.where(indices < 0, L, indices), True)[..., :L]  # padding -> column L
    x = torch.cat([k, v], -1).view(B * H, L, 2 * D)
    idx = indices.reshape(B * H, K)
    stays = ~(mergeable & ~kept)  # merge_tokens folds in the tokens whose mask is False
    out = torch.ops.vtattn.merge_tokens(x, k.reshape(B * H, L, D), idx, stays.view(B * H, L), mode == "weighted")
    if mode == "pivotal":
        own = torch.ops.vtattn.gather_tokens(x, idx, None, 0)
        out = ((own.float() + out.float()) / 2).to(x.dtype)
    out = out.view(B, H, K, 2 * D)
    return out[..., :D], out[..., D:]


def merge_kv_release(k: torch.Tensor, v: torch.Tensor, indices: torch.Tensor, mergeable: torch.Tensor,
                     mode: str) -> tuple[torch.Tensor, torch.Tensor]:
    """LOOK-M's release merge ("avg" | "weighted"), per sample. In each kv head, every evicted token
    e (mergeable, not kept) finds the kept token c with the highest key cosine cos_e (ties to the
    lower position). As in the release, the evicted tokens of a head are taken in position order and
    the p-th of every head passes the filter when the mean over heads of their cos_e is at least the
    mean over all heads and evicted tokens. Passing tokens merge: k_c <- (k_c + sum_e w_e k_e) /
    (1 + n_c), w_e = 1 ("avg") or cos_e unclamped ("weighted"); values follow keys. The release's
    "avg" pairs the filtered targets with the first evicted rows (src unfiltered): here each token
    merges its own row. Same arguments and result as `merge_kv`."""
    if mode not in RELEASE_MODES:
        raise ValueError(f"the release merges with {RELEASE_MODES}, got {mode!r}")
    B, H, L, D = k.shape
    acc = torch.float64 if k.dtype == torch.float64 else torch.float32
    valid = indices >= 0
    kept = torch.zeros(B, H, L + 1, dtype=torch.bool, device=k.device)
    kept = kept.scatter(-1, torch.where(valid, indices, L), True)[..., :L]
    evicted = mergeable & ~kept & kept.any(-1, keepdim=True)
    kn = F.normalize(k.to(acc), dim=-1)
    sim = (kn @ kn.transpose(-1, -2)).masked_fill(~kept[:, :, None, :], float("-inf"))  # [B, H, L, L]
    cos, target = sim.max(-1)  # the first maximum: the lowest kept position
    cos = cos.masked_fill(~evicted, 0.0)
    rank = (evicted.cumsum(-1) - 1).clamp(min=0)  # the p of each evicted token in its head
    by_rank = cos.new_zeros(B, H, L).scatter_add_(-1, rank, cos)
    present = cos.new_zeros(B, H, L).scatter_add_(-1, rank, evicted.to(acc))
    head_mean = by_rank.sum(1) / present.sum(1).clamp(min=1)  # [B, L] over heads, per p
    overall = cos.sum((1, 2)) / evicted.sum((1, 2)).clamp(min=1)  # [B]
    passes = evicted & (head_mean >= overall[:, None]).gather(1, rank.flatten(1)).view(B, H, L)
    w = passes.to(acc) * (cos if mode == "weighted" else 1.0)
    x = torch.cat([k, v], -1).to(acc)
    slot = torch.where(passes, target, L)  # the kept position each passing token joins
    sums = x.new_zeros(B, H, L + 1, 2 * D).scatter_add_(2, slot[..., None].expand(B, H, L, 2 * D), w[..., None] * x)
    n = x.new_zeros(B, H, L + 1).scatter_add_(2, slot, passes.to(acc))
    merged = (x + sums[:, :, :L]) / (1 + n[:, :, :L])[..., None]
    at = indices.clamp(min=0)
    out = merged.gather(2, at[..., None].expand(*at.shape, 2 * D)).masked_fill(~valid[..., None], 0).to(k.dtype)
    return out[..., :D], out[..., D:]
