"""MoA, Mixture of Sparse Attention (Fu et al., 2024): a static profile gives every (layer, head) a
sliding window with attention sinks whose span grows with the input length, span = alpha + beta * N.
Written from the paper and the authors' release (thu-nics/MoA: moa_config_to_cache_config and the
block-sparse prefill kernel); differences in docs/sparse.md.

Per head, with N tokens (plus `max_new_tokens`, which the authors count in):
  span = min(ceil(max(int(alpha + beta * T), min_span) / block_size) * block_size, T) with
  T = N + max_new_tokens (the release's cache size, split_size = block_size); the first min(span, sink)
  tokens are the sink, the rest the local window. Query block m lists the key blocks holding sink
  tokens and the ceil(local / block_size) blocks ending at m (at least m itself). With the authors' block size 64 and sink 64 this is their
  prefill pattern.
No estimation: the lists depend on N only (0 FLOPs; build once per length).
"""
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ._common import causal_blocks, cdiv, check_block_size, check_count


@dataclass(frozen=True)
class MoAConfig:
    """Per-layer, per-head (alpha, beta) of the span rule; heads are query heads. The authors' JSON
    format: {"alphas": [[...] per layer], "betas": [[...] per layer]}."""
    alphas: Sequence[Sequence[float]]  # stored as tuples of tuples
    betas: Sequence[Sequence[float]]

    def __post_init__(self) -> None:
        alphas = tuple(tuple(float(a) for a in layer) for layer in self.alphas)
        betas = tuple(tuple(float(b) for b in layer) for layer in self.betas)
        if len(alphas) != len(betas) or any(len(a) != len(b) for a, b in zip(alphas, betas)):
            raise ValueError("MoAConfig: alphas and betas must have the same [layers][heads] shape")
        if not alphas or any(not layer for layer in alphas):
            raise ValueError("MoAConfig: needs at least one layer with at least one head")
        if any(b < 0 for layer in betas for b in layer):
            raise ValueError("MoAConfig: betas must be >= 0")
        object.__setattr__(self, "alphas", alphas)
        object.__setattr__(self, "betas", betas)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "MoAConfig":
        if not isinstance(d, dict) or "alphas" not in d or "betas" not in d:
            raise ValueError("MoAConfig.from_dict: needs a dict with 'alphas' and 'betas' ([layers][heads] lists)")
        return cls(d["alphas"], d["betas"])

    @classmethod
    def from_json(cls, path: str | os.PathLike[str]) -> "MoAConfig":
        with open(path) as f:
            return cls.from_dict(json.load(f))

    @classmethod
    def uniform(cls, layers: int, heads: int, alpha: float, beta: float) -> "MoAConfig":
        """Every head the same rule (StreamingLLM-like when beta = 0)."""
        return cls([[alpha] * heads] * layers, [[beta] * heads] * layers)

    def to_dict(self) -> dict[str, list[list[float]]]:
        return {"alphas": [list(a) for a in self.alphas], "betas": [list(b) for b in self.betas]}

    @property
    def num_layers(self) -> int:
        return len(self.alphas)


def head_blocks(alpha: float, beta: float, N: int, block_size: int, sink: int, min_span: int,
                max_new_tokens: int) -> tuple[int, int]:
    """(sink blocks, local blocks) of one head at length N."""
    total = N + max_new_tokens
    span = min(cdiv(max(int(alpha + total * beta), min_span), block_size) * block_size, total)  # the release's order
    sink_tokens = min(span, sink)
    return cdiv(sink_tokens, block_size), max(1, cdiv(span - sink_tokens, block_size))


def moa(config: MoAConfig | dict[str, Any], N: int, *, layer: int = 0, block_size: int = 64, sink: int = 64,
        min_span: int = 128, max_new_tokens: int = 0, device: torch.device | str | None = None
        ) -> tuple[torch.Tensor, torch.Tensor]:
    """MoA block lists of one layer for causal prefill self-attention over N tokens.

    config: a MoAConfig or its dict ({"alphas": ..., "betas": ...}). Returns (kv_num_blocks int32 [1, H, nb],
    kv_indices int32 [1, H, nb, nb]), H the layer's heads, shared by the batch."""
    from ._blocks import from_dense_blocks

    fn = "moa"
    config = MoAConfig.from_dict(config) if isinstance(config, dict) else config
    if not isinstance(config, MoAConfig):
        raise TypeError(f"{fn}: config must be a MoAConfig or its dict, got {type(config).__name__}")
    check_count(fn, "N", N, 1)
    check_block_size(fn, block_size)
    for name, v in (("sink", sink), ("min_span", min_span), ("max_new_tokens", max_new_tokens)):
        check_count(fn, name, v)
    if isinstance(layer, bool) or not isinstance(layer, int) or not -config.num_layers <= layer < config.num_layers:
        raise ValueError(f"{fn}: layer must be an int in [0, {config.num_layers}), got {layer!r}")
    return from_dense_blocks(moa_blocks(config, N, layer, block_size, sink, min_span, max_new_tokens, device))


def moa_blocks(config: MoAConfig, N: int, layer: int, block_size: int, sink: int, min_span: int, max_new_tokens: int,
               device: torch.device | str | None) -> torch.Tensor:
    nb = cdiv(N, block_size)
    counts = torch.tensor([head_blocks(a, b, N, block_size, sink, min_span, max_new_tokens)
                           for a, b in zip(config.alphas[layer], config.betas[layer])], device=device)
    j = torch.arange(nb, device=device)
    sink_part = j[None, None, :] < counts[:, 0, None, None]  # [H, 1, nb]
    local = j[None, None, :] > j[None, :, None] - counts[:, 1, None, None]  # [H, nb, nb]: j > m - local
    return ((sink_part | local) & causal_blocks(nb, device))[None]
