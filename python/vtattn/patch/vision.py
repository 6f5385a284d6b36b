"""`VisionSelect`: vision-side visual-token pruning, by exact attention scores recorded while the
vision tower runs on vtattn's attention (`key_importance` from the same call's LSE at the probed
layers; never eager attention, never `output_attentions`).

Where the tokens leave depends on the model:
- a bare CLIP / SigLIP tower (`vision_tower`): its forward returns the kept features;
- LLaVA / LLaVA-NeXT: before the projector. A prefill (a call with pixel_values) keeps the
  selected tokens of each view, builds the shortened sequence's embeddings, attention mask and
  positions (`Shrink`) and runs the rest of the forward on them; decode steps that continue that
  cache get their mask and positions translated from the caller's (original-length) frame to the
  shortened one, so `generate` works unchanged;
- Qwen2-VL / Qwen2.5-VL: at the LLM's input (`vision_qwen`)."""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch

import vtattn
from vtattn import pruning

from . import core
from .filled import Filled
from .hf_attention import Probe, probing

HIRED_SPLITS = ("vtattn", "release")  # HiRED's budget split over LLaVA-NeXT's views (docs/selection.md)


@dataclass(frozen=True)
class VisionSelect(core.Stage):
    """Vision-side pruning's options, and its stage. keep: the ratio in (0, 1] of each view's tokens
    kept (1.0 keeps all and runs the tower on vtattn attention), or keep_tokens: a count per view
    (HiRED: per image); method: see `vtattn.pruning` ("auto": "cls" with a [CLS] token, else
    "mean_received"); ensemble_layers: VTC-CLS's layers; merge: None, "mean" or "weighted" (pruned
    tokens folded into their most similar kept token); alpha: HiRED's share for the base view;
    hired_split: how HiRED splits an image's budget over LLaVA-NeXT's views, "vtattn" (attention mass
    over 2-D regions, largest remainders over unpadded tokens) or "release" (the authors' code).
    feature_layer / drop_cls: which hidden states are the features and whether they leave out
    [CLS] (None: the model's own, LLaVA's vision_feature_layer / strategy; a bare tower: -1 and
    "when it has one")."""
    keep: float | None = None
    keep_tokens: int | None = None
    method: str = "auto"
    ensemble_layers: Any = None
    merge: str | None = None
    alpha: float = 0.5
    hired_split: str = "vtattn"
    feature_layer: int | None = None
    drop_cls: bool | None = None

    def __post_init__(self) -> None:
        keep = pruning.resolve_keep(self.keep, self.keep_tokens, default=1.0, stacklevel=4)
        object.__setattr__(self, "keep", keep if isinstance(keep, float) else None)  # frozen: normalised once
        object.__setattr__(self, "keep_tokens", keep if isinstance(keep, int) else None)
        if self.method not in pruning.METHODS:
            raise ValueError(f"unknown method {self.method!r}; choose one of {', '.join(map(repr, pruning.METHODS))}")
        pruning.check_merge(self.merge)
        if self.hired_split not in HIRED_SPLITS:
            raise ValueError(f"hired_split must be one of {', '.join(map(repr, HIRED_SPLITS))}, "
                             f"got {self.hired_split!r}")

    @property
    def budget(self) -> float | int:
        """The ratio, or the count."""
        if self.keep is not None:
            return self.keep
        assert self.keep_tokens is not None  # __post_init__ sets one of the two
        return self.keep_tokens

    def install(self, patch: core.Patch) -> core.Installed:
        if patch.family == "tower":
            return _Tower(self, patch)
        if patch.family == "llava":
            return _Llava(self, patch)
        if patch.family == "qwen2_vl":
            from .vision_qwen import AtInput
            return AtInput(self, patch)
        raise TypeError(f"VisionSelect supports LLaVA, LLaVA-NeXT, Qwen2-VL, Qwen2.5-VL and bare CLIP / SigLIP towers, "
                        f"not a vtattn.patch.{patch.family} model")

    def selector(self, tower: torch.nn.Module, feature_layer: int, drop_cls: bool) -> Selector:
        return Selector(tower, keep=self.budget, method=self.method, feature_layer=feature_layer, drop_cls=drop_cls,
                        ensemble_layers=self.ensemble_layers, merge=self.merge, alpha=self.alpha,
                        hired_split=self.hired_split)


class Selector:
    """One tower's selection policy, checked once: which layers to probe, how to score, budgets.

    feature_layer: the hidden-states index of the features (LLaVA's vision_feature_layer).
    drop_cls: the features leave out the [CLS] token (LLaVA's "default" strategy)."""

    def __init__(self, tower: torch.nn.Module, *, keep: float | int, method: str, feature_layer: int,
                 drop_cls: bool, ensemble_layers: Any = None, merge: str | None = None, alpha: float = 0.5,
                 hired_split: str = "vtattn") -> None:
        pruning.check_keep(keep)
        pruning.check_merge(merge)
        if not all(hasattr(tower, name) for name in ("embeddings", "encoder", "config")):
            raise TypeError(f"expected a CLIPVisionModel / SiglipVisionModel-like tower, "
                            f"got {type(tower).__name__}")
        self.tower, self.keep, self.merge, self.alpha, self.hired_split = tower, keep, merge, alpha, hired_split
        self.encoder: Callable[..., Any] = tower  # what encode calls: a patched tower's own unpatched forward
        found: Any = tower  # a transformers tower (Module's stubs: every attribute a Tensor or Module)
        self.layers = found.encoder.layers
        self.attn = [layer.self_attn for layer in self.layers]
        self.has_cls = hasattr(found.embeddings, "class_embedding")
        self.grid: int = found.config.image_size // found.config.patch_size
        if drop_cls and not self.has_cls:
            raise ValueError("the features drop a [CLS] token (strategy 'default') but the tower has none")
        self.drop = int(drop_cls)
        self.method = pruning.resolve_method(method, has_cls=self.has_cls)
        if self.method == "rows" and self.has_cls and not drop_cls:
            raise ValueError("method 'rows' keeps grid rows: the features must not include the [CLS] token")
        self.feature = pruning.feature_layer(feature_layer, len(self.attn))
        self.ensemble = (pruning.ensemble_layers(ensemble_layers, len(self.attn), self.feature)
                         if self.method == "cls_ensemble" else None)
        if self.method == "hired" and not 0.0 <= alpha <= 1.0:
            raise ValueError(f"alpha must be in [0, 1], got {alpha}")
        self.plan = pruning.probes(self.method, has_cls=self.has_cls, feature=self.feature, ensemble=self.ensemble)

    def encode(self, pixel_values: torch.Tensor, **tower_kwargs: Any
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """Run the tower (routed to vtattn's attention by the patch). Returns features [V, Nf, C] of
        the feature layer, their importance [V, Nf] (fp32), HiRED's layer-0 [CLS] row [V, Nf] (else
        None) and, when merging, the feature layer's attention keys head-concatenated [V, Nf, H*D]
        (else None)."""
        probes = {self.attn[layer]: Probe(rows, reduce) for layer, (rows, reduce) in self.plan.items()}
        if self.merge:
            probes.setdefault(self.attn[self.feature], Probe(rows=None)).keys = True
        # The feature layer's output is hidden_states[feature_layer]; a hook keeps just that one
        # instead of every layer's hidden states.
        out = []
        hook = self.layers[self.feature].register_forward_hook(
            lambda module, args, output: out.append(output[0] if isinstance(output, tuple) else output))
        try:
            with probing(probes):
                self.encoder(pixel_values, return_dict=True, **tower_kwargs)
        finally:
            hook.remove()
        scores: dict[int, torch.Tensor] = {}
        for layer in self.plan:
            recorded = probes[self.attn[layer]].scores
            assert recorded is not None  # every probed layer records its scores (rows are never None)
            scores[layer] = recorded
        cut = slice(self.drop, None)
        features = out[0][:, cut]
        imp = pruning.importance(self.method, scores, has_cls=self.has_cls, feature=self.feature,
                                 ensemble=self.ensemble)[:, cut]
        early = scores[0][:, cut] if self.method == "hired" else None
        keys = probes[self.attn[self.feature]].key_states if self.merge else None
        assert keys is not None or not self.merge  # probed with keys=True when merging
        keys = None if keys is None else keys[:, cut]
        return features, imp, early, keys

    def counts(self, view_tokens: list[int], early_base: torch.Tensor | None = None,
               crop_grid: tuple[int, int] | None = None, scores: torch.Tensor | None = None,
               valid: torch.Tensor | None = None) -> torch.Tensor:
        """Per-view budgets of one image. view_tokens: tokens each view really has; for HiRED,
        early_base is the base view's layer-0 [CLS] row over its grid and crop_grid (nh, nw); for the
        release's split, scores / valid [V, g*g] are each view's importance and unpadded tokens."""
        full = self.grid ** 2 if self.drop or not self.has_cls else self.grid ** 2 + 1
        if self.method != "hired":
            return torch.tensor([pruning.budget(self.keep, n, full) for n in view_tokens])
        if self.hired_split == "release" and crop_grid:
            assert early_base is not None  # the base view's [CLS] row splits an image over its crops
            budgets = pruning.hired_budgets_release(self.keep, self.alpha, len(view_tokens), early_base)
            if scores is None or valid is None:
                return budgets
            # The release ranks a crop's padding too and unpadding drops what it picked there: what it
            # keeps is the unpadded tokens among a view's top-b over all its tokens (ties to the lower index).
            ranked = torch.sort(-scores.float(), dim=1, stable=True).indices.cpu()
            return torch.stack([valid[v].cpu()[ranked[v, :int(b)]].sum() for v, b in enumerate(budgets.tolist())])
        mass: torch.Tensor | list[float] = []
        if crop_grid:
            assert early_base is not None  # as above
            mass = pruning.region_mass(early_base, self.grid, *crop_grid)
        return pruning.hired_budgets(self.keep, self.alpha, view_tokens, mass)

    def ranking(self, imp: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """The scores the top-k runs on: FoPru's row lift for "rows", else the importance."""
        return pruning.rows_first(imp, self.grid, counts) if self.method == "rows" else imp

    def keep_tokens(self, x: torch.Tensor, scores: torch.Tensor, counts: torch.Tensor,
                    keys: torch.Tensor | None = None, segments: list[int] | None = None
                    ) -> tuple[torch.Tensor, vtattn.Selection]:
        """Top-k of `scores` [B, N] with per-(row, segment) `counts` ([B] or [B, S] int64), then
        the kept rows of x [B, N, C] (merged when configured). Returns ([B, K, C], Selection)."""
        B = scores.shape[0]
        budgets = counts.expand(B) if counts.dim() == 1 and counts.numel() == 1 else counts
        sel = core.select(scores, budgets, segments)  # counts live on the host: no device sync
        if self.merge:
            assert keys is not None  # encode's, when merging
            if core.needs_grad(x):  # merge_tokens has no gradient; its reference has
                from ..reference.merge_tokens import merge_tokens
                return merge_tokens(x, keys, sel.indices, sel.mask, self.merge == "weighted"), sel
            return core.op("merge_tokens")(x, keys, sel.indices, sel.mask, self.merge == "weighted"), sel
        return core.op("gather_tokens")(x, sel.indices, None, 0), sel


class SelectedFeatures(NamedTuple):
    features: torch.Tensor  # [B, K, C] kept (or merged) tokens of the feature layer, original order
    selection: vtattn.Selection  # indices [B, K] into the feature tokens, mask, counts


class _Tower(core.Installed):
    """A bare tower: `tower(pixel_values)` returns SelectedFeatures of its feature layer."""
    phase = core.INPUT

    def __init__(self, options: VisionSelect, patch: core.Patch) -> None:
        tower, self.options = patch.model, options
        drop_cls = options.drop_cls
        if drop_cls is None:
            drop_cls = hasattr(getattr(tower, "embeddings", None), "class_embedding")
        feature = -1 if options.feature_layer is None else options.feature_layer
        self.selector = options.selector(tower, feature, drop_cls)
        self.selector.encoder = patch.original
        patch.route(self.selector.attn)

    def forward(self, call: core.Call, proceed: Callable[[core.Call], Any]) -> SelectedFeatures:
        s = self.selector
        x, imp, _, keys = s.encode(**call.kwargs)
        counts = s.counts([x.shape[1]]).expand(len(x))  # one view per image: one budget
        return SelectedFeatures(*s.keep_tokens(x, s.ranking(imp, counts), counts, keys))


class _Llava(core.Installed):
    """LLaVA / LLaVA-NeXT: the kept tokens of each view go to the projector."""
    phase = core.INPUT
    options: VisionSelect

    def __init__(self, options: VisionSelect, patch: core.Patch) -> None:
        from transformers import LlavaModel, LlavaNextModel
        model: Any = patch.model  # a transformers model (Module's stubs: every attribute a Tensor or Module)
        self.base = model if isinstance(model, (LlavaModel, LlavaNextModel)) else model.model
        self.anyres = isinstance(self.base, LlavaNextModel)
        self.options = options
        self.selectors: dict[tuple[int, str], Selector] = {}
        # cache object -> the Shrink of the prefill that filled it; gone with the cache or its reset().
        self.continuations = Filled()
        config = self.base.config
        selector = self.selector(config.vision_feature_layer, config.vision_feature_select_strategy)  # check now
        patch.route(selector.attn)

    def selector(self, layer: int, strategy: str) -> Selector:
        if strategy not in ("default", "full"):
            raise ValueError(f"vision_feature_select_strategy must be 'default' or 'full', got {strategy!r}")
        if self.options.feature_layer is not None:
            layer = self.options.feature_layer
        if (layer, strategy) not in self.selectors:
            drop_cls = strategy == "default" if self.options.drop_cls is None else self.options.drop_cls
            self.selectors[layer, strategy] = self.options.selector(self.base.vision_tower, layer, drop_cls)
        return self.selectors[layer, strategy]

    def forward(self, call: core.Call, proceed: Callable[[core.Call], Any]) -> Any:
        kwargs = call.kwargs
        pixel_values = kwargs.get("pixel_values")
        if pixel_values is not None and pixel_values.numel():
            return self._prefill(call, proceed)
        _, cache = call.cache()
        shrink = self.continuations.get(cache)  # None: not a pruned prefill's cache, or reset since
        if shrink is not None:
            shrink.continue_call(call, cache)
        return proceed(call)

    def _prefill(self, call: core.Call, proceed: Callable[[core.Call], Any]) -> Any:
        kwargs, input_ids = call.kwargs, call.input_ids
        if input_ids is None:
            raise NotImplementedError("visual-token pruning finds the image spans in input_ids: pass "
                                      "input_ids, not inputs_embeds, with pixel_values")
        _, cache = call.cache()
        if cache is not None and cache.get_seq_length() > 0:
            raise NotImplementedError("visual-token pruning needs the images in the first forward of a cache")
        config = self.base.config
        layer = kwargs.pop("vision_feature_layer", None)
        strategy = kwargs.pop("vision_feature_select_strategy", None)
        selector = self.selector(config.vision_feature_layer if layer is None else layer,
                                 config.vision_feature_select_strategy if strategy is None else strategy)
        encode = self._anyres_features if self.anyres else self._features
        features, spans, kept = encode(selector, kwargs.pop("pixel_values"), kwargs.pop("image_sizes", None))
        shrink = Shrink(input_ids, config.image_token_id, spans, kept)
        shrink.shorten(call, self.base.get_input_embeddings()(input_ids), features)
        out = proceed(call)
        for filled in (cache, core.output_cache(out)):
            if filled is not None:
                if shrink.identity:  # (keep=1.0) the caller's frame is the model's: decode steps run as they come
                    self.continuations.pop(filled)
                else:
                    self.continuations[filled] = shrink
        return out

    def _features(self, selector: Selector, pixel_values: torch.Tensor, image_sizes: Any
                  ) -> tuple[torch.Tensor, list[int], list[int]]:
        """LLaVA: one view per image, every image the same budget (one batched selection)."""
        if image_sizes is not None:
            raise NotImplementedError("image_sizes (variable-resolution towers) are not supported for Llava")
        x, imp, _, keys = selector.encode(pixel_values)
        counts = selector.counts([x.shape[1]]).expand(len(x))
        kept, _ = selector.keep_tokens(x, selector.ranking(imp, counts), counts, keys)
        n, k = kept.shape[:2]
        return self.base.multi_modal_projector(kept).flatten(0, 1), [x.shape[1]] * n, [k] * n

    def _anyres_features(self, selector: Selector, pixel_values: torch.Tensor, image_sizes: torch.Tensor
                         ) -> tuple[torch.Tensor, list[int], list[int]]:
        """LLaVA-NeXT: per image, the base view and its crops each keep their budget among the
        tokens that survive unpadding; the kept tokens keep the packed layout (base view, then the
        crop grid row by row), and a grid row keeps its newline token while it keeps any token."""
        from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches
        config = self.base.config
        views = [image_size_to_num_patches(s, config.image_grid_pinpoints, config.vision_config.image_size)
                 for s in image_sizes]
        if pixel_values.dim() == 5:
            pixel_values = torch.cat([p[:v] for p, v in zip(pixel_values, views)])
        x, imp, early, keys = selector.encode(pixel_values)
        if x.shape[1] != selector.grid ** 2:
            raise ValueError("LLaVA-NeXT packs square grids of patch tokens: the features must leave out "
                             "any [CLS] token (strategy 'default' for CLIP, 'full' for SigLIP)")
        kept, slots, spans = [], [], []
        parts = [t.split(views) if t is not None else [None] * len(views)  # type: ignore[no-untyped-call]
                 for t in (x, imp, early, keys)]
        for size, xi, si, ei, ki in zip(image_sizes, *parts):
            valid, slot, row, newline, span, crop_grid = _anyres_layout(size, config, selector.grid, x.device)
            tokens = valid.sum(1)
            counts = selector.counts(tokens.tolist(), None if ei is None else ei[0], crop_grid, si, valid)
            scores = selector.ranking(si.masked_fill(~valid, -1.0), counts)
            flat = valid.flatten().nonzero().squeeze(1)
            used = tokens > 0  # a crop can lie entirely in the unpadded margin
            features, sel = selector.keep_tokens(
                xi.flatten(0, 1)[flat][None], scores.flatten()[flat][None], counts.to(x.device)[used][None],
                None if ki is None else ki.flatten(0, 1)[flat][None], segments=tokens[used].tolist())
            index = flat[sel.indices[0]]
            rows = row.flatten()[index].unique()
            kept.append(features[0])
            slots.append(torch.cat([slot.flatten()[index], newline[rows[rows >= 0]]]))
            spans.append(span)
        projected = self.base.multi_modal_projector(torch.cat(kept)).split([len(k) for k in kept])
        newline = self.base.image_newline
        out = [torch.cat([p, newline.to(p.dtype).expand(len(s) - len(p), -1)])[s.argsort()]
               for p, s in zip(projected, slots)]
        return torch.cat(out), spans, [len(o) for o in out]


# ---- the shortened sequence (tensors in, tensors out) --------------------------------------------

class Shrink:
    """How a batch of sequences [B, L] maps to its pruned form [B, W].

    Image i's span of spans[i] placeholder tokens (counted in (batch, sequence) order, as a
    processor expands them) keeps its first kept[i] slots, every other token stays, and rows are
    re-aligned by left padding to the longest (W). A kept token's position is its original position
    minus the tokens removed before it in its row: kept tokens take consecutive positions."""

    def __init__(self, input_ids: torch.Tensor, image_token_id: int, spans: list[int], kept: list[int]) -> None:
        B, L = input_ids.shape
        device = input_ids.device
        self.identity = list(spans) == list(kept)  # nothing removed: decode steps need no translation
        span = torch.as_tensor(spans, dtype=torch.long, device=device)
        kept_t = torch.as_tensor(kept, dtype=torch.long, device=device)
        is_image = input_ids == image_token_id
        found, expected = int(is_image.sum()), int(span.sum())
        if found != expected:
            raise ValueError(f"input_ids hold {found} image tokens but the images need {expected} "
                             "(the <image> spans must be expanded as the processor does)")
        ordinal = is_image.flatten().cumsum(0).view(B, L) - 1
        ends = span.cumsum(0)
        image = torch.searchsorted(ends, ordinal.clamp(min=0), right=True).clamp(max=len(span) - 1)
        keep = ~is_image | (ordinal - (ends - span)[image] < kept_t[image])
        removed = (~keep).long().cumsum(1)
        length = keep.sum(1)
        self.length, self.width = L, int(length.max())
        self.pad = self.width - length
        self.removed = removed[:, -1]
        dest = torch.where(keep, self.pad[:, None] + keep.long().cumsum(1) - 1, self.width)
        src = torch.zeros(B, self.width + 1, dtype=torch.long, device=device)
        self.src = src.scatter_(1, dest, torch.arange(L, device=device).expand(B, L))[:, :self.width]
        self.real = torch.arange(self.width, device=device) >= self.pad[:, None]
        self.shift = removed.gather(1, self.src)
        self.image = is_image.gather(1, self.src) & self.real
        self.mask: torch.Tensor | None = None
        self.next: torch.Tensor | None = None  # (set by positions)
        self.static: torch.Tensor | None = None

    def _take(self, x: torch.Tensor, fill: float) -> torch.Tensor:
        index = self.src if x.dim() == 2 else self.src[..., None].expand(-1, -1, x.shape[-1])
        real = self.real if x.dim() == 2 else self.real[..., None]
        return x.gather(1, index).masked_fill(~real, fill)

    def embeds(self, token_embeds: torch.Tensor, image_features: torch.Tensor) -> torch.Tensor:
        """[B, W, C]: the kept tokens' embeddings, the image slots filled with image_features
        ([T, C], images in order, each image's tokens in its own order)."""
        out = self._take(token_embeds, 0.0)
        return out.masked_scatter(self.image[..., None], image_features.to(out.device, out.dtype))

    def attention_mask(self, mask: torch.Tensor | None) -> torch.Tensor:
        """The shortened 2-D mask (alignment padding masked); kept for the decode steps."""
        if mask is None:
            mask = torch.ones(self.src.shape[0], self.length, dtype=torch.long, device=self.src.device)
        if mask.dim() != 2:
            raise NotImplementedError("visual-token pruning needs a 2-D attention mask (or none)")
        self.mask = self._take(mask, 0)
        return self.mask

    def positions(self, position_ids: torch.Tensor | None) -> torch.Tensor:
        """Shortened position ids; None stands for 0..L-1, what the language model would use."""
        if position_ids is None:
            position_ids = torch.arange(self.length, device=self.src.device)
        position_ids = position_ids.expand(self.src.shape[0], -1)
        self.next = position_ids[:, -1] + 1  # [B] the caller's position of the first token after the prompt
        return (self._take(position_ids, 0) - self.shift).masked_fill(~self.real, 0)

    def labels(self, labels: torch.Tensor | None) -> torch.Tensor | None:
        return None if labels is None else self._take(labels, -100)

    def shorten(self, call: core.Call, token_embeds: torch.Tensor, image_features: torch.Tensor) -> None:
        """The prefill `call` in the shortened frame: its embeddings (see embeds), mask, positions and
        labels in call.kwargs, no input_ids, the image slots as call.images."""
        kwargs = call.kwargs
        mask = static = kwargs.get("attention_mask")
        if core.is_static_mask(mask):  # generate's for a static cache, full frame: rebuilt shortened
            mask = core.prompt_padding(mask, self.length)
        kwargs.update(inputs_embeds=self.embeds(token_embeds, image_features), attention_mask=self.attention_mask(mask),
                      position_ids=self.positions(kwargs.get("position_ids")))
        if core.is_static_mask(static):  # the decode steps' mask, made here: a compiled step then allocates
            self.static_mask(core.full_attention_mask(static).shape[-1])  # nothing it keeps (CUDA graphs)
        if "labels" in kwargs:
            kwargs["labels"] = self.labels(kwargs["labels"])
        call.input_ids, call.images = None, self.image

    def continue_call(self, call: core.Call, cache: Any) -> None:
        """A decode step on the `cache` the shortened prefill filled: the caller's mask and positions
        (original frame) in the shortened frame, in call.kwargs."""
        kwargs = call.kwargs
        past, new, mask = cache.get_seq_length(), call.new_tokens(), kwargs.get("attention_mask")
        if new > 1 and kwargs.get("position_ids") is not None:
            self.check_continues(kwargs["position_ids"], int(past))
        if core.is_static_mask(mask):  # a static cache: its lengths (device counts, not read) are the shortened frame's
            kwargs["attention_mask"] = self.static_mask(core.full_attention_mask(mask).shape[-1])
            kwargs["position_ids"] = self.continue_positions(kwargs.get("position_ids"), past, new)
        elif past >= self.width:  # (a host count) shorter: cropped into the prompt, or emptied without reset()
            kwargs["attention_mask"] = self.continue_mask(mask, past, new)
            kwargs["position_ids"] = self.continue_positions(kwargs.get("position_ids"), past, new)

    def check_continues(self, position_ids: torch.Tensor, past: int) -> None:
        """A call of several tokens (assisted decoding's candidates) continues the caller's positions
        from the `past` tokens the cache holds (shortened). generate restarted on this cache (a second
        chat turn) counts the cache's length, the shortened frame's, so it would feed again tokens the
        cache holds: refused. One host read, in such calls only (a decode step's token is one)."""
        assert self.next is not None  # the prefill's (positions)
        expected = self.next + (past - self.width)
        if bool((position_ids[:, 0] != expected).any()):
            raise NotImplementedError(
                "these tokens do not continue the cache, whose prefill vtattn shortened (the pruned image "
                "tokens are not in it): generate restarted from a filled cache (a second chat turn) slices "
                "input_ids by the cache's shorter length and would feed tokens the cache already holds. "
                "Start each turn on a new cache with the whole conversation and its pixel_values")

    def continue_mask(self, mask: torch.Tensor | None, past: int, new: int) -> torch.Tensor:
        """The decode-step mask for a cache of `past` shortened tokens and `new` tokens: the
        shortened prefill mask, then the caller's mask past its original length."""
        assert self.mask is not None  # the prefill's (attention_mask)
        grown = past + new - self.width
        if mask is None:
            tail = self.mask.new_ones(self.mask.shape[0], grown)
        elif mask.dim() == 2 and mask.shape[1] == self.length + grown:
            tail = mask[:, self.length:].to(self.mask.dtype)
        else:
            raise ValueError(f"the attention mask (shape {tuple(mask.shape)}) does not continue the pruned "
                             f"prefill: expected 2-D with {self.length + grown} columns")
        return torch.cat([self.mask, tail], dim=1)

    def static_mask(self, width: int) -> torch.Tensor:
        """A static cache's decode-step mask, [B, width] (its capacity): the shortened prefill mask
        then every later slot (causality hides those not written yet). A view of the same tensor every
        step, made at the prefill as wide as generate's prefill mask (a CompressedCache the KV stage
        made of the StaticCache has a narrower capacity: the pruned tokens take none)."""
        if self.static is None or self.static.shape[1] < width:
            assert self.mask is not None  # the prefill's (attention_mask)
            self.static = torch.cat([self.mask, self.mask.new_ones(self.mask.shape[0], width - self.width)], 1)
        return self.static[:, :width]

    def continue_positions(self, position_ids: torch.Tensor | None, past: int, new: int) -> torch.Tensor:
        """Decode-step positions: the caller's minus the tokens pruned from the row; None stands
        for the language model's own (cache length onwards), counted without the alignment padding."""
        if position_ids is None:
            return past + torch.arange(new, device=self.src.device) - self.pad[:, None]
        return position_ids - self.removed[:, None]


def _anyres_layout(image_size: Any, config: Any, grid: int, device: torch.device) -> tuple[Any, ...]:
    """Where each token of one LLaVA-NeXT image goes in transformers' packed sequence. Views are
    the base image then the crops (row-major), each a grid x grid token grid. Returns
    valid [V, g*g] (the token survives unpadding), slot [V, g*g] (its index in the packed sequence),
    row [V, g*g] (its row in the unpadded crop grid; -1 in the base view), the newline slots [R],
    the packed length and the crop grid (nh, nw)."""
    from transformers.models.llava_next.modeling_llava_next import get_anyres_image_grid_shape, unpad_image
    nh, nw = get_anyres_image_grid_shape(image_size, config.image_grid_pinpoints,
                                         config.vision_config.image_size)
    n, width = grid * grid, nw * grid
    combined = unpad_image(torch.arange(nh * grid * width).view(1, nh * grid, width), image_size)[0]
    R, C = combined.shape
    r, c = combined // width, combined % width
    view, local = 1 + (r // grid) * nw + c // grid, (r % grid) * grid + c % grid
    valid = torch.zeros(1 + nh * nw, n, dtype=torch.bool)
    slot = torch.zeros(1 + nh * nw, n, dtype=torch.long)
    row = torch.full((1 + nh * nw, n), -1, dtype=torch.long)
    valid[0], slot[0] = True, torch.arange(n)
    valid[view, local] = True
    slot[view, local] = n + torch.arange(R)[:, None] * (C + 1) + torch.arange(C)
    row[view, local] = torch.arange(R)[:, None].expand(R, C)
    newline = n + torch.arange(R) * (C + 1) + C
    return valid.to(device), slot.to(device), row.to(device), newline.to(device), n + R * (C + 1), (nh, nw)
