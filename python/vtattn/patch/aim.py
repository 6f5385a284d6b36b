"""AIM (Zhong et al. 2024; release LaVi-Lab/AIM): token merging before the LLM, then progressive
pruning inside it by PageRank importance (the rules: `vtattn.reference.aim`; docs/selection.md, "AIM").

Two parts, installed together by `AIM.install`:
- the merge. LLaVA (INPUT phase): each image's feature tokens are merged by ToMe's bipartite matching
  on the keys of the vision layer that reads them (the release's image rule) or on the projected
  features (its video rule), then the `<image>` spans shrink to the merged count (`vision.Shrink`:
  kept tokens take consecutive positions, as the release's). Qwen2-VL: each image's and video
  frame's LLM-input tokens merge on themselves in a pre-hook of decoder layer 0; the survivors
  (each one of the input tokens) take the merged values and keep their own M-RoPE positions, the
  others leave through a `drop.Drop` exit at layer 0;
- the pruning (any family, LAYERS phase): after decoder layer l the visual tokens of a sample are cut
  to int(n * retention[l]); each cut is one `drop.Drop` exit at layer l + 1, chosen by PageRank over
  layer l's attention among the tokens still there. The importance needs each head's whole
  attention graph for five power iterations: it runs as one `vtattn.attention` call (the LSE of the
  tempered logits) and one `vtattn.key_importance` call per iteration, the iteration's weights
  folded into the LSE (never an N x N tensor)."""
from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

import vtattn
from vtattn.reference.aim import ORDERS, WEIGHTS, aim_keep, aim_merge, aim_retention

from . import core
from .filled import Filled
from .drop import Drop, Step
from .vision import Shrink

METRICS = ("keys", "features")


@dataclass(frozen=True)
class AIM(core.Stage):
    """AIM's options, and its stage.

    merge: the merge rounds before the LLM (LLaVA; Qwen2-VL at its input, with metric "features" and
    order "original"), each a share of a view's (image's, frame's) original n tokens to
    remove (float: int(n * f)) or a count (int); () merges nothing. Default: the release's LLaVA-1.5
    rounds (0.5, 0.0625): 576 -> 288 -> 252. metric: "keys" (the keys of the vision layer after the
    feature layer, merged along: the release's image rule; before the projector) or "features" (the
    projected features: its video rule; after the projector). weights: "mean" (the release) or
    "size" (ToMe's size-weighted mean). order: "release" (unmerged tokens by similarity, then the
    merged ones) or "original" (the survivors' original order).

    Pruning: retention[l] is the share of a sample's visual tokens kept after decoder layer l (one per
    layer, non-increasing, in [0, 1]); None: the release's schedule from `start` and `step` (1 before
    layer `start`, then down by `step` per layer; LLaVA-1.5-7B: 13 and 0.125). tau: the PageRank
    graph's softmax temperature; iterations: its power iterations."""
    merge: tuple[float | int, ...] = (0.5, 0.0625)
    metric: str = "keys"
    weights: str = "mean"
    order: str = "release"
    start: int = 13
    step: float = 0.125
    retention: tuple[float, ...] | None = None
    tau: float = 0.1
    iterations: int = 5

    def __post_init__(self) -> None:
        merge = tuple(self.merge)
        for f in merge:
            count = isinstance(f, int) and not isinstance(f, bool)
            if not ((count and f >= 0) or (isinstance(f, float) and 0 <= f <= 1)):
                raise ValueError(f"AIM merge rounds must be shares in [0, 1] or counts >= 0, got {f!r}")
        object.__setattr__(self, "merge", merge)
        for name, value, allowed in (("metric", self.metric, METRICS), ("weights", self.weights, WEIGHTS),
                                     ("order", self.order, ORDERS)):
            if value not in allowed:
                raise ValueError(f"AIM {name} must be one of {allowed}, got {value!r}")
        if isinstance(self.start, bool) or not isinstance(self.start, int) or self.start < 0:
            raise ValueError(f"AIM start must be an int >= 0, got {self.start!r}")
        if not 0 <= self.step <= 1:
            raise ValueError(f"AIM step must be in [0, 1], got {self.step!r}")
        if self.retention is not None:
            rates = tuple(float(r) for r in self.retention)
            if any(not 0 <= r <= 1 for r in rates) or any(b > a for a, b in zip(rates, rates[1:])):
                raise ValueError(f"AIM retention must be non-increasing shares in [0, 1], got {self.retention!r}")
            object.__setattr__(self, "retention", rates)
        if not self.tau > 0:
            raise ValueError(f"AIM tau must be > 0, got {self.tau!r}")
        if isinstance(self.iterations, bool) or not isinstance(self.iterations, int) or self.iterations < 1:
            raise ValueError(f"AIM iterations must be an int >= 1, got {self.iterations!r}")

    def schedule(self, layers: int) -> tuple[float, ...]:
        """The retention after each of `layers` decoder layers."""
        if self.retention is None:
            return aim_retention(layers, self.start, self.step)
        if len(self.retention) != layers:
            raise ValueError(f"AIM retention has {len(self.retention)} entries for {layers} decoder layers")
        return self.retention

    @property
    def merges(self) -> bool:
        return any(f > 0 for f in self.merge)

    def install(self, patch: core.Patch) -> core.Installed | tuple[core.Installed, core.Installed]:
        if patch.family not in ("llava", "qwen2_vl", "llm"):
            raise TypeError(f"AIM supports LLaVA, LLaVA-NeXT, Qwen2-VL and text LMs with image tokens, not a "
                            f"vtattn.patch.{patch.family} model")
        if self.merges and patch.family == "llm":
            raise ValueError("AIM's merge needs the images' frames (LLaVA, Qwen2-VL): pass merge=() for the cuts alone")
        if self.merges and patch.family == "qwen2_vl" and (self.metric, self.order) != ("features", "original"):
            raise ValueError("AIM's merge on Qwen2-VL runs on the LLM input's visual tokens, each survivor at its own "
                             "M-RoPE position: pass metric='features' and order='original'")
        prune = _Prune(self, patch)
        if not self.merges or patch.family == "qwen2_vl":
            return prune
        try:
            return _Merge(self, patch), prune  # the patch sorts its stages by phase
        except BaseException:
            prune.uninstall()
            raise


# ---- the merge before LLaVA's LLM --------------------------------------------------------------------

class _Merge(core.Installed):
    phase = core.INPUT
    options: AIM

    def __init__(self, options: AIM, patch: core.Patch) -> None:
        from transformers import LlavaModel, LlavaNextModel
        model: Any = patch.model  # a transformers model (Any: transformers is not followed)
        self.base = model if isinstance(model, (LlavaModel, LlavaNextModel)) else model.model
        if isinstance(self.base, LlavaNextModel):
            raise NotImplementedError("AIM's merge is defined for one view per image (LLaVA-1.5); LLaVA-NeXT packs "
                                      "its views' grids with row newlines: pass merge=() to prune only")
        self.options, self.patch = options, patch
        self.tower = self.base.vision_tower
        self.continuations = Filled()  # cache -> its merged prefill's Shrink, until the cache's reset()
        self._feature(self.base.config.vision_feature_layer)  # check now

    def _feature(self, layer: Any) -> int:
        """The hidden-states index of the features (0 = embeddings); with metric "keys" the vision
        layer of that index reads them."""
        if not isinstance(layer, int):
            raise NotImplementedError(f"AIM's merge needs one vision feature layer, got {layer!r}")
        layers = len(_encoder(self.tower).layers)
        index = layer if layer >= 0 else layers + 1 + layer
        if not 0 <= index <= layers:
            raise ValueError(f"vision_feature_layer {layer} is out of range for a {layers}-layer tower")
        if self.options.metric == "keys" and index == layers:
            raise ValueError("AIM metric='keys' takes the keys of the vision layer after the feature layer; the "
                             "features are the last layer's: pass metric='features'")
        return index

    def forward(self, call: core.Call, proceed: Callable[[core.Call], Any]) -> Any:
        pixel_values = call.kwargs.get("pixel_values")
        if pixel_values is not None and pixel_values.numel():
            return self._prefill(call, proceed)
        _, cache = call.cache()
        shrink = self.continuations.get(cache) if cache is not None else None
        if shrink is not None:
            shrink.continue_call(call, cache)  # the merged prefill's frame, as VisionSelect's
        return proceed(call)

    def _prefill(self, call: core.Call, proceed: Callable[[core.Call], Any]) -> Any:
        kwargs, input_ids = call.kwargs, call.input_ids
        if input_ids is None:
            raise NotImplementedError("AIM's merge finds the image spans in input_ids: pass input_ids, not "
                                      "inputs_embeds, with pixel_values")
        _, cache = call.cache()
        if cache is not None and cache.get_seq_length() > 0:
            raise NotImplementedError("AIM's merge needs the images in the first forward of a cache")
        if kwargs.get("image_sizes") is not None:
            raise NotImplementedError("image_sizes (variable-resolution towers) are not supported for Llava")
        config = self.base.config
        layer = kwargs.pop("vision_feature_layer", None)
        strategy = kwargs.pop("vision_feature_select_strategy", None)
        strategy = config.vision_feature_select_strategy if strategy is None else strategy
        index = self._feature(config.vision_feature_layer if layer is None else layer)
        if any(s.phase == core.INPUT and s is not self for s in self.patch.stages):
            raise NotImplementedError("AIM's merge shortens the image spans itself: not with VisionSelect")
        features, n = self.merged(kwargs.pop("pixel_values"), index, strategy == "default")
        V, K = features.shape[:2]
        shrink = Shrink(input_ids, config.image_token_id, [n] * V, [K] * V)
        shrink.shorten(call, self.base.get_input_embeddings()(input_ids), features.flatten(0, 1))
        out = proceed(call)
        for filled in (cache, core.output_cache(out)):
            if filled is not None:
                self.continuations[filled] = shrink
        return out

    def merged(self, pixel_values: torch.Tensor, index: int, drop_cls: bool) -> tuple[torch.Tensor, int]:
        """The projected, merged features [V, K, C] of V images (hidden-states index `index`) and
        the tokens n each image had before merging."""
        o = self.options
        states = self.tower(pixel_values, output_hidden_states=True, return_dict=True).hidden_states
        x = states[index]
        cut = slice(int(drop_cls), None)
        if o.metric == "features":
            x = self.base.multi_modal_projector(x[:, cut])
            return aim_merge(x, x.detach(), o.merge, weights=o.weights, order=o.order)[0], x.shape[1]
        reader = _encoder(self.tower).layers[index]
        keys = reader.self_attn.k_proj(reader.layer_norm1(x))  # what the release hooks: k_proj's output
        merged = aim_merge(x[:, cut], keys[:, cut].detach(), o.merge, weights=o.weights, order=o.order)[0]
        return self.base.multi_modal_projector(merged), x.shape[1] - cut.start


def _encoder(tower: Any) -> Any:
    return tower.encoder if hasattr(tower, "encoder") else tower.vision_model.encoder


# ---- the pruning inside the LLM ----------------------------------------------------------------------

class _Prune(core.Installed):
    phase = core.LAYERS
    options: AIM

    def __init__(self, options: AIM, patch: core.Patch) -> None:
        core.require_image_ids(patch, "AIM's pruning")
        decoder = core.language_model(patch.model)
        rates = options.schedule(len(decoder.layers))
        self.options = options
        self.cuts: list[tuple[int, float]] = []  # (exit layer K, retention after layer K - 1)
        for l, rate in enumerate(rates[:-1]):  # a cut after the last layer changes nothing
            if rate < (self.cuts[-1][1] if self.cuts else 1.0):
                self.cuts.append((l + 1, rate))
        self.at_input = options.merges and patch.family == "qwen2_vl"  # the merge: an exit at layer 0
        if self.at_input:
            self.cuts.insert(0, (0, 1.0))
        self.drops: dict[int, Drop] = {}
        if self.cuts:
            core.check_full_attention(decoder.config)
        self.hook = None
        try:
            for K, _ in self.cuts:
                self.drops[K] = Drop(patch, decoder, K, "AIM")
        except BaseException:  # (the patch uninstalls only the stages it holds: not this one yet)
            self.uninstall()
            raise
        if self.at_input:
            model: Any = patch.model
            config = model.config
            self.kinds = [(getattr(config, token), grid) for token, grid in
                          (("image_token_id", "image_grid_thw"), ("video_token_id", "video_grid_thw"))]
            self.unit = model.model.visual.spatial_merge_size ** 2
            patch.hide("mm_encoder_outputs")  # generate then hands the prefill the grids (and pixels), not encodings
            # before the drop's own pre-hook on layer 0: the merged rows are what it gathers
            self.hook = decoder.layers[0].register_forward_pre_hook(self._merge, with_kwargs=True, prepend=True)
        self.scorers = {K: self.drops[K].attn[K - 1] for K, rate in self.cuts if 0 < rate < 1}
        patch.route(self.scorers.values())

    @property
    def kept(self) -> torch.Tensor | None:
        return self.drops[self.cuts[-1][0]].kept if self.cuts else None

    def forward(self, call: core.Call, proceed: Callable[[core.Call], Any]) -> Any:
        if not self.cuts:
            return proceed(call)
        first = self.drops[self.cuts[0][0]]

        def scored(call: core.Call) -> Any:
            step = first.step()  # None: a text-only prompt, run unpatched
            if step is not None and step.images is not None:
                ctx = core.current()
                assert ctx is not None  # inside the patched forward
                ctx.state[self] = {"call": call}
                for K, module in self.scorers.items():
                    # first: a pruned layer's own attention hook returns its output
                    ctx.hook(module, functools.partial(self._score, K), first=True)
            return proceed(call)

        run = scored
        for K, rate in reversed(self.cuts):
            run = functools.partial(self.drops[K].forward, proceed=run, choose=functools.partial(self._choose, K, rate))
        return run(call)

    def uninstall(self) -> None:
        if self.hook is not None:
            self.hook.remove()
        for drop in self.drops.values():
            drop.remove()

    def _merge(self, layer: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        """Layer 0's first pre-hook in a Qwen2-VL prefill: each image's and each video frame's tokens
        (in the LLM input) are merged (`aim_merge` on themselves, survivors in their original order);
        the survivors' rows take the merged values and the others leave at layer 0 (the drop), so
        each survivor keeps its own M-RoPE position."""
        step = self.drops[0].step()
        if step is None or step.images is None:
            return None
        ctx = core.current()
        assert ctx is not None  # inside the patched forward
        o, state = self.options, ctx.state[self]
        call = state["call"]
        h = args[0] if args else kwargs["hidden_states"]
        h, survivors = h.clone(), torch.zeros_like(step.images)
        for token, grid in self.kinds:
            grids = call.kwargs.get(grid)
            if grids is None or call.input_ids is None:
                continue
            where = call.input_ids == token
            frames = [int(h_ * w) // self.unit for t, h_, w in grids.tolist() for _ in range(int(t))]
            rows = h[where]
            if sum(frames) != len(rows):
                raise ValueError(f"input_ids hold {len(rows)} tokens of id {token} but {grid} needs {sum(frames)}")
            merged, kept, start = rows.clone(), torch.zeros(len(rows), dtype=torch.bool, device=h.device), 0
            starts = []
            for n in frames:
                starts.append(start)
                start += n
            for n in sorted(set(frames)):  # frames of one size merge together
                at = torch.tensor([s for s, f in zip(starts, frames) if f == n], device=h.device)
                idx = at[:, None] + torch.arange(n, device=h.device)
                x = rows[idx]
                values, index, _ = aim_merge(x, x.detach(), o.merge, weights=o.weights, order="original")
                place = idx.gather(1, index)
                merged[place.flatten()] = values.flatten(0, 1)
                kept[place.flatten()] = True
            h[where] = merged
            survivors[where] = kept
        state["merged"] = survivors
        if args:
            return (h,) + tuple(args[1:]), kwargs
        return args, {**kwargs, "hidden_states": h}

    def _score(self, K: int, module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
               mask: Any, scaling: float | None, kwargs: dict[str, Any]) -> None:
        """Layer K-1's attention hook in a prefill: each sample's PageRank importance over the tokens
        this layer holds, in the full input frame ([B, N] fp32; tokens not here: -1). The call then
        goes on as usual."""
        drop = self.drops[K]
        step, ctx = drop.step(), core.current()
        assert step is not None and step.images is not None and step.real is not None and ctx is not None  # prefill
        B, N = step.images.shape
        group = drop.exits.group.get(module)
        if group is None:  # before the first exit: the whole (left-padded) sequence
            index, real = None, step.real
        else:  # the group's slots: kept tokens right-aligned in their original order
            record = step.records[group]
            index, real = record.index, record.real
        S = real.shape[1]
        scale = query.shape[-1] ** -0.5 if scaling is None else float(scaling)
        query, key = query.detach(), key[:, :, :S].detach()  # a StaticCache's keys: its capacity, the prompt first
        slots = torch.full((B, S), -1.0, dtype=torch.float32, device=query.device)
        pads = (~real).sum(1).tolist()
        groups = [(slice(None), pads[0])] if len(set(pads)) == 1 else [(slice(b, b + 1), p) for b, p in enumerate(pads)]
        for rows, pad in groups:
            slots[rows, pad:] = pagerank(query[rows, :, pad:], key[rows, :, pad:], scale, self.options.tau,
                                         self.options.iterations)
        if index is None:
            scores = slots
        else:
            scores = torch.full((B, N + 1), -1.0, dtype=torch.float32, device=query.device)
            scores = scores.scatter_(1, index.masked_fill(~real, N), slots)[:, :N]
        ctx.state[self][K] = scores
        return None

    def _choose(self, K: int, rate: float, step: Step) -> torch.Tensor:
        """AIM's rule at exit K: each sample keeps int(n * rate) of its n visual tokens, the most
        important of those still present (ties to the lower index)."""
        ctx = core.current()
        assert step.images is not None and ctx is not None  # a prefill with images, inside the patched forward
        images, state = step.images, ctx.state[self]  # {"call", "merged": [B, N] (at input), K: scores [B, N]}
        if K == 0 and self.at_input:
            merged: torch.Tensor = state["merged"]
            return merged
        if rate == 0:
            return torch.zeros_like(images)
        visual = images & state["merged"] if self.at_input else images  # after the merge
        counts = torch.tensor([aim_keep(n, rate) for n in visual.sum(1).tolist()], device=images.device)
        chosen = torch.zeros_like(images)
        if bool(counts.any()):
            scores = state[K].masked_fill(~images, -2.0)  # present images, then the rest
            chosen = (vtattn.select_tokens(scores, keep_tokens=counts.clamp(min=1)).mask & images
                      & (counts > 0)[:, None])
        return chosen


def pagerank(q: torch.Tensor, k: torch.Tensor, scale: float, tau: float, iterations: int) -> torch.Tensor:
    """`vtattn.reference.aim.aim_importance` on vtattn's kernels, fp32 [B, N]: the LSE of the
    tempered logits from one `attention` call, then per iteration one `key_importance` call over all
    rows whose LSE carries the row's weight (sum_i w_i P_ij = sum_i exp(s_ij - (lse_i - log w_i)); a
    zero weight is an LSE of -inf, a row that adds nothing)."""
    N = q.shape[2]
    s = scale / tau
    _, lse = vtattn.attention(q, k, k, causal=True, scale=s, return_lse=True)
    d = torch.full_like(lse, 1.0 / N)
    for _ in range(iterations):
        shifted = torch.where(d > 0, lse - d.log(), float("-inf"))
        d = vtattn.key_importance(q, k, rows="all", lse=shifted, scale=s, causal=True)
    return d.pow(2).mean(1).sqrt()
