"""Policy objects for sparse prefill in a model (patch.llm(model, sparse_prefill=...)): each wraps one
block-list builder with its settings, says which decoder layers it runs in, and builds one layer's lists
from that layer's (post-RoPE) q and k. Prompts shorter than `min_tokens` stay dense (building lists
costs more than it saves there)."""
from collections.abc import Sequence
from typing import Any, cast

import torch

from ._blocks import BlockList
from ._common import cdiv, check_block_size, check_count, check_fraction
from .flexprefill import flexprefill, flexprefill_flops
from .hip import hip, hip_flops
from .moa import MoAConfig, moa
from .region_routing import Regions, region_routing, region_routing_flops


class SparsePrefill:
    """Base: block_size, the layers it runs in (None: all), min_tokens (shorter prompts stay dense).
    Subclasses define blocks(q, k, *, layer, scale, regions) -> (kv_num_blocks, kv_indices) for
    block_sparse_attention(..., block_size=self.block_size, causal=True), and flops(B, Hq, Hkv, N, D)."""

    name = "sparse"

    def __init__(self, block_size: int = 128, layers: Sequence[int] | None = None, min_tokens: int = 1024):
        self.block_size = check_block_size(type(self).__name__, block_size)
        if layers is not None:
            layers = tuple(layers)
            for i in layers:
                check_count(type(self).__name__, "layers entries", i)
        self.layers = layers
        self.min_tokens = check_count(type(self).__name__, "min_tokens", min_tokens)

    def applies(self, layer: int, num_layers: int, N: int) -> bool:
        """Whether decoder layer `layer` of `num_layers` runs block-sparse on a prompt of N tokens."""
        if N < max(self.min_tokens, 1) or N <= self.block_size:
            return False
        return self.layers is None or layer in self.layers or layer - num_layers in self.layers

    def blocks(self, q: torch.Tensor, k: torch.Tensor, *, layer: int, scale: float,
               regions: Regions | None = None) -> BlockList:
        raise NotImplementedError

    def flops(self, B: int, Hq: int, Hkv: int, N: int, D: int) -> int:
        return 0

    def __repr__(self) -> str:
        keys = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if not k.startswith("_"))
        return f"{type(self).__name__}({keys})"


class FlexPrefill(SparsePrefill):
    """vtattn.sparse.flexprefill in every chosen layer (per input, per head)."""

    name = "flexprefill"

    def __init__(self, gamma: float = 0.9, tau: float = 0.1, *, block_size: int = 128, min_budget: int | None = None,
                 max_budget: int | None = None, layers: Sequence[int] | None = None, min_tokens: int = 1024):
        super().__init__(block_size, layers, min_tokens)
        self.gamma = check_fraction("FlexPrefill", "gamma", gamma)
        self.tau = check_fraction("FlexPrefill", "tau", tau, lo_open=False)
        self.min_budget, self.max_budget = min_budget, max_budget

    def blocks(self, q: torch.Tensor, k: torch.Tensor, *, layer: int, scale: float,
               regions: Regions | None = None) -> BlockList:
        return flexprefill(q, k, gamma=self.gamma, tau=self.tau, block_size=self.block_size,
                           min_budget=self.min_budget, max_budget=self.max_budget, scale=scale)

    def flops(self, B: int, Hq: int, Hkv: int, N: int, D: int) -> int:
        return flexprefill_flops(B, Hq, Hkv, N, D, self.block_size)


class MoA(SparsePrefill):
    """vtattn.sparse.moa: the profile's (alpha, beta) of decoder layer i for layer i (its heads are the
    model's query heads). No estimation: the lists of a length are built once and cached."""

    name = "moa"

    def __init__(self, config: MoAConfig | dict[str, Any] | str, *, block_size: int = 64, sink: int = 64,
                 min_span: int = 128, max_new_tokens: int = 0, layers: Sequence[int] | None = None,
                 min_tokens: int = 1024) -> None:
        super().__init__(block_size, layers, min_tokens)
        if isinstance(config, str):
            config = MoAConfig.from_json(config)
        self.config = MoAConfig.from_dict(config) if isinstance(config, dict) else config
        if not isinstance(self.config, MoAConfig):
            raise TypeError(f"MoA: config must be a MoAConfig, its dict or a JSON path, got {type(config).__name__}")
        self.sink, self.min_span, self.max_new_tokens = sink, min_span, max_new_tokens
        self._cache: dict[tuple[int, int, torch.device], BlockList] = {}

    def applies(self, layer: int, num_layers: int, N: int) -> bool:
        return layer < self.config.num_layers and super().applies(layer, num_layers, N)

    def blocks(self, q: torch.Tensor, k: torch.Tensor, *, layer: int, scale: float,
               regions: Regions | None = None) -> BlockList:
        key = (layer, q.shape[2], q.device)
        if key not in self._cache:
            heads = len(self.config.alphas[layer])
            if heads != q.shape[1]:
                raise ValueError(f"MoA: the config has {heads} heads in layer {layer}, the model {q.shape[1]}")
            self._cache[key] = moa(self.config, q.shape[2], layer=layer, block_size=self.block_size, sink=self.sink,
                                   min_span=self.min_span, max_new_tokens=self.max_new_tokens, device=q.device)
        return self._cache[key]


class HiP(SparsePrefill):
    """vtattn.sparse.hip in every chosen layer."""

    name = "hip"

    def __init__(self, k_blocks: int = 8, *, block_size: int = 128, rep_tokens: int = 4, sink_blocks: int = 1,
                 window_blocks: int = 1, layers: Sequence[int] | None = None, min_tokens: int = 1024):
        super().__init__(block_size, layers, min_tokens)
        self.k_blocks = check_count("HiP", "k_blocks", k_blocks, 1)
        self.rep_tokens = check_count("HiP", "rep_tokens", rep_tokens, 1)
        self.sink_blocks = check_count("HiP", "sink_blocks", sink_blocks)
        self.window_blocks = check_count("HiP", "window_blocks", window_blocks)

    def blocks(self, q: torch.Tensor, k: torch.Tensor, *, layer: int, scale: float,
               regions: Regions | None = None) -> BlockList:
        return hip(q, k, k_blocks=self.k_blocks, block_size=self.block_size, rep_tokens=self.rep_tokens,
                   sink_blocks=self.sink_blocks, window_blocks=self.window_blocks)

    def flops(self, B: int, Hq: int, Hkv: int, N: int, D: int) -> int:
        return hip_flops(B, Hq, N, D, self.k_blocks, self.block_size, self.rep_tokens, self.sink_blocks,
                         self.window_blocks)


class RegionRouting(SparsePrefill):
    """vtattn.sparse.region_routing over the prompt's images (the drop-in passes their token grids);
    a prompt without images runs dense."""

    name = "region_routing"

    def __init__(self, top_k: int = 4, *, region_shape: tuple[int, int] = (4, 4), block_size: int = 128,
                 per_head: bool = False, layers: Sequence[int] | None = None, min_tokens: int = 1024):
        super().__init__(block_size, layers, min_tokens)
        self.top_k = check_count("RegionRouting", "top_k", top_k)
        self.region_shape, self.per_head = tuple(region_shape), bool(per_head)

    def blocks(self, q: torch.Tensor, k: torch.Tensor, *, layer: int, scale: float,
               regions: Regions | None = None) -> BlockList:
        return region_routing(q, k, regions or [], top_k=self.top_k,
                              region_shape=cast(tuple[int, int], self.region_shape),
                              block_size=self.block_size, per_head=self.per_head)

    def flops(self, B: int, Hq: int, Hkv: int, N: int, D: int, regions: int | None = None) -> int:
        if regions is None:  # an upper bound: one region per region_shape tokens
            regions = cdiv(N, self.region_shape[0] * self.region_shape[1])
        return region_routing_flops(B, Hq, Hkv, N, D, regions, self.block_size)
