"""Pieces shared by the sparse-prefill policies (vtattn.sparse.flexprefill, hip, region_routing, moa):
argument checks, block pooling, the stable top-k order every policy breaks ties with, and the
self-attention causal block mask. Policies work on block masks (bool [B, H, Q_blocks, K_blocks]) and
convert once at the end (_blocks.from_dense_blocks)."""
from typing import Any

import torch


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def check_block_size(fn: str, block_size: Any) -> int:
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size <= 0:
        raise ValueError(f"{fn}: block_size must be a positive int, got {block_size!r}")
    return block_size


def check_qk(fn: str, q: torch.Tensor, k: torch.Tensor, block_size: Any) -> tuple[int, int, int, int, int]:
    """(B, Hq, Hkv, N, D) of prefill self-attention inputs q [B, Hq, N, D], k [B, Hkv, N, D]."""
    for name, t in (("q", q), ("k", k)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            raise ValueError(f"{fn}: {name} must be a 4-D [B, H, N, D] tensor, got "
                             f"{tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__}")
        if not t.is_floating_point():
            raise TypeError(f"{fn}: {name} must be a floating tensor, got {t.dtype}")
    B, Hq, N, D = q.shape
    if k.shape[0] != B or k.shape[2] != N or k.shape[3] != D:
        raise ValueError(f"{fn}: k must be [B={B}, Hkv, N={N}, D={D}] (prefill self-attention: as many keys as "
                         f"queries), got {tuple(k.shape)}")
    if k.shape[1] == 0 or Hq % k.shape[1]:
        raise ValueError(f"{fn}: q's {Hq} heads must be a multiple of k's {k.shape[1]}")
    if q.device != k.device:
        raise ValueError(f"{fn}: q and k must be on one device, got {q.device} and {k.device}")
    check_block_size(fn, block_size)
    return B, Hq, k.shape[1], N, D


def check_fraction(fn: str, name: str, value: Any, lo_open: bool = True) -> float:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and (0 < value <= 1 if lo_open
                                                                            else 0 <= value <= 1)
    if not ok:
        raise ValueError(f"{fn}: {name} must be a number in {'(0, 1]' if lo_open else '[0, 1]'}, got {value!r}")
    return float(value)


def check_count(fn: str, name: str, value: Any, minimum: int = 0) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{fn}: {name} must be an int >= {minimum}, got {value!r}")
    return value


def block_sums(x: torch.Tensor, block_size: int) -> torch.Tensor:
    """Sums of consecutive block_size entries of the last dim (the last block may be partial)."""
    n = x.shape[-1]
    nb = cdiv(n, block_size)
    pad = x.new_zeros(*x.shape[:-1], nb * block_size)
    pad[..., :n] = x
    return pad.view(*x.shape[:-1], nb, block_size).sum(-1)


def block_means(x: torch.Tensor, block_size: int, dtype: torch.dtype) -> torch.Tensor:
    """[..., N, D] -> [..., N_blocks, D] in `dtype`: the mean of each block's tokens (the last block's
    over the tokens it has)."""
    n = x.shape[-2]
    nb = cdiv(n, block_size)
    pad = x.new_zeros(*x.shape[:-2], nb * block_size, x.shape[-1], dtype=dtype)
    pad[..., :n, :] = x
    counts = torch.full((nb,), block_size, dtype=dtype, device=x.device)
    counts[-1] = n - (nb - 1) * block_size
    return pad.view(*x.shape[:-2], nb, block_size, x.shape[-1]).sum(-2) / counts[:, None]


def causal_blocks(nb: int, device: torch.device | str | None) -> torch.Tensor:
    """bool [nb, nb]: query block m sees key blocks j <= m (prefill self-attention)."""
    return torch.ones(nb, nb, dtype=torch.bool, device=device).tril()


def descending_rank(scores: torch.Tensor) -> torch.Tensor:
    """Rank of each entry along the last dim in a stable descending order: ties go to the lower index
    (torch.topk gives no order among ties; every policy and its reference use this one)."""
    order = torch.sort(scores, dim=-1, descending=True, stable=True).indices
    return torch.empty_like(order).scatter_(-1, order, torch.arange(scores.shape[-1], device=scores.device)
                                            .expand_as(order))


def cover_count(probs: torch.Tensor, mass: float | torch.Tensor, inclusive: bool = False) -> torch.Tensor:
    """The fewest entries (along the last dim, largest first) whose sum reaches `mass` (a number or a
    tensor broadcasting against probs[..., 0]): #(prefix sums < mass) + 1, at most the length; with
    `inclusive`, #(prefix sums <= mass) + 1 (FlexPrefill's release for its vertical / slash counts: the
    fewest whose sum passes `mass`). Returns int64."""
    srt = torch.sort(probs, dim=-1, descending=True).values
    bound = torch.as_tensor(mass, dtype=probs.dtype, device=probs.device)[..., None]
    below = ((srt.cumsum(-1) <= bound) if inclusive else (srt.cumsum(-1) < bound)).sum(-1)
    return torch.clamp(below + 1, max=probs.shape[-1])
