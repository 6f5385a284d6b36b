"""Cases for the token-selection ops: select_tokens + gather_tokens, and merge_tokens.

Tokens: the tower's patch tokens (N - 1 for CLIP's [CLS], N for SigLIP), C = Hq * D (the
feature width). Bytes counted once per op:
- select+gather: scores read (fp32) + kept rows read and written + indices (int64) and mask written.
- merge: x and keys read once + kept rows written.
"""
from typing import Any

import torch
import torch.nn.functional as F

import vtattn

from .cases import Builder, Case, Impl, Inputs, Maker, Shape, _vtattn_impls

KEEPS = (0.1, 0.25, 0.5)
MERGE_KEEP = 0.25
_HAS_CLS = {"clip-l336": True, "siglip-so400m": False}


def _dims(name: str, s: Shape) -> tuple[int, int, int]:
    return s["B"], s["N"] - _HAS_CLS[name], s["Hq"] * s["D"]


def _maker(B: int, N: int, C: int, keep: float | None = None) -> Maker:
    def make(device: torch.device, dtype: torch.dtype, seed: int) -> Inputs:
        g = torch.Generator(device=device).manual_seed(seed)
        x: Inputs = {"scores": torch.rand(B, N, device=device, generator=g),  # fp32, as key_importance gives
             "x": torch.randn(B, N, C, device=device, dtype=dtype, generator=g)}
        if keep is not None:  # merge: keys and a selection made outside the timing
            x["keys"] = torch.randn(B, N, C, device=device, dtype=dtype, generator=g)
            x["sel"] = vtattn.select_tokens(x["scores"], keep)
        return x
    return make


def _torch_topk_gather(x: Inputs, keep: float) -> torch.Tensor:
    """What pruning code writes by hand: top-k, sort back to token order, gather."""
    scores: torch.Tensor = x["scores"]
    xs: torch.Tensor = x["x"]
    k = max(1, round(keep * scores.shape[1]))
    idx = scores.topk(k, dim=1).indices.sort(dim=1).values
    return xs.gather(1, idx[..., None].expand(-1, -1, xs.shape[2]))


def select_cases(name: str, s: Shape, backends: list[str]) -> list[Case]:
    if name not in _HAS_CLS:
        return []
    B, N, C = _dims(name, s)
    cases = []
    for keep in KEEPS:
        K = max(1, round(keep * N))
        moved = lambda elt, K=K: B * N * 4 + 2 * B * K * C * elt + B * K * 8 + B * N
        c = Case("select_tokens", f"{name}:keep-{keep}", {"B": B, "N": N, "C": C, "keep": keep}, _maker(B, N, C),
                 bytes_fn=moved)
        call = lambda x, keep=keep: vtattn.gather_tokens(x["x"], vtattn.select_tokens(x["scores"], keep))
        c.impls = _vtattn_impls(backends, call)
        baseline = lambda x, keep=keep: _torch_topk_gather(x, keep)
        c.impls.append(Impl("torch-topk", baseline, role="baseline"))
        cases.append(c)
    return cases


def _naive_merge(x: Inputs) -> torch.Tensor:
    """Cosine matrix [B, N, K] + argmax + index_add: each pruned token averaged into its most
    similar kept token (mode="mean")."""
    sel, keys = x["sel"], F.normalize(x["keys"].float(), dim=-1)
    xs: torch.Tensor = x["x"].float()
    B, N, C = xs.shape
    idx = sel.indices
    kept_keys = keys.gather(1, idx[..., None].expand(-1, -1, C))
    best = (keys @ kept_keys.transpose(1, 2)).argmax(-1)  # [B, N]: slot of the most similar kept token
    pruned = ~sel.mask
    slot = (best + torch.arange(B, device=xs.device)[:, None] * idx.shape[1])[pruned]
    acc = xs.gather(1, idx[..., None].expand(-1, -1, C)).reshape(-1, C).index_add(0, slot, xs[pruned])
    count = torch.ones(acc.shape[0], device=xs.device).index_add(0, slot, torch.ones_like(slot, dtype=xs.dtype))
    return (acc / count[:, None]).view(B, -1, C).to(x["x"].dtype)


def merge_cases(name: str, s: Shape, backends: list[str]) -> list[Case]:
    if name not in _HAS_CLS:
        return []
    B, N, C = _dims(name, s)
    K = max(1, round(MERGE_KEEP * N))
    c = Case("merge_tokens", f"{name}:keep-{MERGE_KEEP}", {"B": B, "N": N, "C": C, "keep": MERGE_KEEP},
             _maker(B, N, C, MERGE_KEEP), bytes_fn=lambda elt: 2 * B * N * C * elt + B * K * C * elt)
    c.impls = _vtattn_impls(backends, lambda x: vtattn.merge_tokens(x["x"], x["sel"], keys=x["keys"]))
    c.impls.append(Impl("torch-naive", _naive_merge, role="baseline"))
    return [c]


BUILDERS: dict[str, Builder] = {"select_tokens": select_cases, "merge_tokens": merge_cases}
