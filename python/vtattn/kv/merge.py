"""LOOK-M's KV merging: evicted keys/values folded into the kept token whose key is most similar.

Per (batch, kv head), every evicted token that may merge (`mergeable`) joins the kept token c with
the highest key cosine similarity (ties to the lower kept position), and values follow keys:
- "avg":      k_c <- (k_c + sum_e k_e) / (1 + n_c)
- "pivotal":  each evicted token is first averaged with its pivot, then the group is averaged with
              k_c: k_c <- (k_c + sum_e (k_e + k_c) / 2) / (1 + n_c)  ==  (k_c + avg_c) / 2
- "weighted": k_c <- (k_c + sum_e w_e k_e) / (1 + sum_e w_e), w_e = max(cos(k_e, k_c), 0)
It runs on the `merge_tokens` kernels (fused nearest-kept search, no [evicted, kept] tensor) with
keys and values side by side as one [L, 2D] row per token."""
import torch

MODES = ("avg", "pivotal", "weighted")


def merge_kv(k, v, indices, mergeable, mode):
    """k, v [B, Hkv, L, D]; indices int64 [B, Hkv, K] kept positions (-1 padded); mergeable bool
    [B, Hkv, L] (True = an evicted token that folds into its nearest kept one; kept tokens are
    ignored). Returns the kept rows (k, v) [B, Hkv, K, D] after merging, zero rows at padding."""
    if mode not in MODES:
        raise ValueError(f"merge must be one of {MODES}, got {mode!r}")
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
