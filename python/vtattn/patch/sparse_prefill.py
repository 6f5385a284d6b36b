"""Sparse prefill as a stage: in a prefill, the attention of the policy's decoder layers runs
`vtattn.block_sparse_attention` over the block lists a `vtattn.sparse` policy (FlexPrefill, MoA, HiP,
RegionRouting) builds from that layer's own q and k; decode steps stay dense (or compressed: with a
`KVCompress` stage the layer's cache attends with the sparse prefill and compresses from its LSE).

A call runs block-sparse only when vtattn computes it as plain causal self-attention (no padding, no
window, softcap, sinks or probe; as many keys as queries); anything else goes on to vtattn's dense
attention. RegionRouting gets the prompt's images as token grids: Qwen2-VL's `image_grid_thw` /
`video_grid_thw` (a video: one grid per frame) when they match the runs of image tokens, else a
square run as one square grid and any other run as one row."""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from . import core, hf_attention

Grids = list[list[tuple[int, int, int]]]  # per sample, its images' (start, height, width) token grids


@dataclass(frozen=True)
class SparsePrefillStage(core.Stage):
    """policy: a `vtattn.sparse.SparsePrefill` (FlexPrefill, MoA, HiP, RegionRouting)."""
    policy: Any

    def __post_init__(self) -> None:
        from ..sparse import SparsePrefill
        if not isinstance(self.policy, SparsePrefill):
            raise TypeError(f"sparse_prefill must be a vtattn.sparse policy (FlexPrefill, MoA, HiP, RegionRouting), "
                            f"got {type(self.policy).__name__}")

    def install(self, patch: core.Patch) -> core.Installed:
        return _SparsePrefill(self, patch)


class _SparsePrefill(core.Installed):
    phase = core.LAYERS

    def __init__(self, options: SparsePrefillStage, patch: core.Patch) -> None:
        decoder = core.language_model(patch.model)
        core.check_full_attention(decoder.config)
        self.options, self.policy, self.patch = options, options.policy, patch
        self.layers = {block.self_attn: i for i, block in enumerate(decoder.layers)}
        self._lists: dict[int, torch.Tensor] = {}  # layer -> kv_num_blocks of the last prefill
        patch.route(self.layers)

    @property
    def density(self) -> dict[int, float]:
        """Per sparse layer, the share of causal blocks its lists kept in the last prefill."""
        return {layer: float(num.sum()) / (num.shape[0] * num.shape[1] * num.shape[2] * (num.shape[2] + 1) / 2)
                for layer, num in self._lists.items()}

    def forward(self, call: core.Call, proceed: Callable[[core.Call], Any]) -> Any:
        _, cache = call.cache()
        if cache is None or cache.get_seq_length() == 0:  # a prefill
            ctx = core.current()
            assert ctx is not None  # inside the patched forward
            grids = _grids(call, self.patch.model) if self.policy.name == "region_routing" else None
            hook = lambda *args: self._attend(*args, grids=grids)  # noqa: E731
            for module in self.layers:
                ctx.hook(module, hook)
        return proceed(call)

    def _attend(self, module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: Any,
                scaling: float | None, kwargs: dict[str, Any], *, grids: Grids | None) -> torch.Tensor | None:
        """The hook: block-sparse prefill attention of one layer, or None (the call goes on)."""
        layer, (B, Hq, N, D) = self.layers[module], query.shape
        if key.shape[2] != N or not self.policy.applies(layer, len(self.layers), N):
            return None
        ctx = core.current()
        if (ctx is not None and module in ctx.probes) or kwargs.get("softcap") or kwargs.get("s_aux") is not None \
                or hf_attention._eager_reason(module, query, None, kwargs) is not None:
            return None
        run = hf_attention._kernel_call(module, query, key, value, mask, 0.0, None, kwargs)
        if not isinstance(run, hf_attention._Run) or not run.causal or run.window is not None \
                or run.varlen is not None or run.end != N:
            return None
        scale = D ** -0.5 if scaling is None else float(scaling)
        sparse: Callable[[torch.Tensor, torch.Tensor, torch.Tensor, float], tuple[torch.Tensor, torch.Tensor]] = \
            lambda q, k, v, s: self._sparse(q, k, v, s, layer, grids)  # noqa: E731
        cached = core.claim(key)  # a CompressedCache layer's prefill: it attends with the sparse prefill
        if cached is not None:
            hf_attention.count("cache")
            out: torch.Tensor = cached.attend(query, key, value, hf_attention._cache_mask(mask), scale, prefill=sparse)
        else:
            out, _ = sparse(query, key, value, scale)
        hf_attention.count("sparse prefill")
        return out.transpose(1, 2)

    def _sparse(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, layer: int,
                grids: Grids | None) -> tuple[torch.Tensor, torch.Tensor]:
        num, idx = self.policy.blocks(q, k, layer=layer, scale=scale, regions=grids)
        self._lists[layer] = num
        # The registered op: the policies' lists are valid by construction (the public checks would sync).
        out: tuple[torch.Tensor, torch.Tensor] = torch.ops.vtattn.block_sparse_attention(
            q, k, v, num, idx, self.policy.block_size, True, scale)
        return out


def _grids(call: core.Call, model: torch.nn.Module) -> Grids | None:
    """Per sample, the (start, height, width) token grids of the prompt's images (see the module
    docstring); None without image tokens."""
    if call.images is None:
        return None
    merge = getattr(getattr(model.config, "vision_config", None), "spatial_merge_size", 1) or 1
    queues = [[(int(t), int(h) // merge, int(w) // merge) for t, h, w in g.tolist()]  # images, videos in order
              for name in ("image_grid_thw", "video_grid_thw") if (g := call.kwargs.get(name)) is not None]
    out: Grids = []
    for row in call.images.tolist():
        grids, start = [], None
        for i, img in enumerate(row + [False]):
            if img and start is None:
                start = i
            elif not img and start is not None:
                grids += _run_grids(start, i - start, queues)
                start = None
        out.append(grids)
    return out


def _run_grids(start: int, n: int, queues: list[list[tuple[int, int, int]]]) -> list[tuple[int, int, int]]:
    """Grids of a run of n image tokens from `start`: the next image's or video's (frames, height, width)
    when its size is n (taken off its queue), else one square grid, else one row."""
    for q in queues:
        if q and q[0][0] * q[0][1] * q[0][2] == n:
            t, h, w = q.pop(0)
            return [(start + f * h * w, h, w) for f in range(t)]
    side = math.isqrt(n)
    return [(start, side, side) if side * side == n else (start, 1, n)]
