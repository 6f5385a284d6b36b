"""vtattn's pruned LLaVA-1.5 (CLIP / SigLIP tower) and LLaVA-NeXT for vLLM: the rules of
`vtattn.patch.llava` (docs/selection.md), before the projector.

- LLaVA-1.5: each image keeps `budget(keep, n)` of its n features.
- LLaVA-NeXT: each view (the base image, each crop) keeps `budget(keep, n)` of the n tokens that
  survive unpadding (HiRED: the image's total budget split over the views by layer-0 [CLS] mass);
  the kept tokens keep the packed layout (base view, then the crop grid row by row). Every grid row
  keeps its newline token: vLLM fixes the number of placeholders before the encoder runs, so a row
  that keeps no token still keeps its newline, where the transformers drop-in drops it (the two
  agree whenever every row keeps a token)."""
from __future__ import annotations

from typing import Any, cast

import torch
from transformers import CLIPVisionConfig
from transformers.models.llava_next.modeling_llava_next import get_anyres_image_grid_shape, unpad_image
from vllm.config import VllmConfig
from vllm.model_executor.models.llava import (LlavaDummyInputsBuilder, LlavaForConditionalGeneration,
                                              LlavaMultiModalProcessor, LlavaProcessingInfo)
from vllm.model_executor.models.llava_next import (LlavaNextForConditionalGeneration, LlavaNextMultiModalProcessor,
                                                   LlavaNextProcessingInfo)
from vllm.multimodal import MULTIMODAL_REGISTRY

import vtattn
from vtattn import pruning

from . import KEY, check_settings
from .encoder import EncoderAttention, Probe, layers
from .hashing import SettingsHash


class Rule:
    """The pruning rule of a LLaVA config: method, budgets, probes (all from the config alone, so the
    processor and the model agree on the counts)."""

    def __init__(self, config: Any) -> None:
        s = check_settings(getattr(config, KEY))
        vision = config.vision_config
        if not isinstance(config.vision_feature_layer, int):
            raise NotImplementedError("vtattn pruning needs a single vision_feature_layer (not a list)")
        self.keep, self.merge, self.alpha = s["keep"], s["merge"], s["alpha"]
        self.has_cls = isinstance(vision, CLIPVisionConfig)
        self.strategy = config.vision_feature_select_strategy
        if self.strategy not in ("default", "full"):
            raise ValueError(f"vision_feature_select_strategy must be 'default' or 'full', got {self.strategy!r}")
        if self.strategy == "default" and not self.has_cls:
            raise ValueError("the features drop a [CLS] token (strategy 'default') but the tower has none")
        self.drop = int(self.strategy == "default")
        self.method = pruning.resolve_method(s["method"], has_cls=self.has_cls)
        if self.method == "rows" and self.has_cls and not self.drop:
            raise ValueError("method 'rows' keeps grid rows: the features must not include the [CLS] token")
        num_layers = vision.num_hidden_layers
        self.feature = pruning.feature_layer(config.vision_feature_layer, num_layers)
        self.ensemble = (pruning.ensemble_layers(s["ensemble_layers"], num_layers, self.feature)
                         if self.method == "cls_ensemble" else None)
        self.plan = pruning.probes(self.method, has_cls=self.has_cls, feature=self.feature, ensemble=self.ensemble)
        self.grid = vision.image_size // vision.patch_size
        self.full = self.grid ** 2 + (1 - self.drop if self.has_cls else 0)  # features of one view

    def view_budgets(self, view_tokens: list[int], early_base: torch.Tensor | None = None,
                     crop_grid: tuple[int, int] | None = None) -> list[int]:
        """Tokens each view keeps (HiRED: needs the base view's layer-0 row to split its total)."""
        if self.method != "hired":
            return [pruning.budget(self.keep, n, self.full) for n in view_tokens]
        if early_base is None:  # the processor: only the total is known, and it is all it needs
            return [pruning.budget(self.keep, sum(view_tokens))]
        mass: torch.Tensor | list[float] = pruning.region_mass(early_base, self.grid, *crop_grid) if crop_grid else []
        return pruning.hired_budgets(self.keep, self.alpha, view_tokens, mass).tolist()


class Selector:
    """A variant's tower on vtattn attention, with the probes of its rule."""

    def __init__(self, rule: Rule, tower: torch.nn.Module) -> None:
        self.rule, self.tower = rule, tower
        self.attn = layers(tower)
        for module in tower.modules():  # the layer owning an attention knows whether TP splits its heads
            if getattr(module, "attn", None) in self.attn:
                cast(EncoderAttention, module.attn).enable(getattr(module, "tp_size", 1))
        if max(rule.plan) >= len(self.attn):
            raise ValueError(f"the tower runs {len(self.attn)} layers; the rule probes layer {max(rule.plan)}")

    def encode(self, pixel_values: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """features [V, Nf, C] of the feature layer, importance [V, Nf], HiRED's layer-0 row (or
        None) and the merge keys [V, Nf, H*D] (or None)."""
        r = self.rule
        for layer, (rows, reduce) in r.plan.items():
            self.attn[layer].probe = Probe(rows, reduce)
        feature_probe = None
        if r.merge:
            feature_probe = self.attn[r.feature].probe = self.attn[r.feature].probe or Probe(rows=None)
            feature_probe.keys = True
        try:
            features = self.tower(pixel_values, feature_select_strategy=r.strategy)
            probes = cast(dict[int, Probe], {layer: self.attn[layer].probe for layer in r.plan})
            keys = feature_probe.key_states if feature_probe is not None else None
        finally:
            for a in self.attn:
                a.probe = None
        scores = cast(dict[int, torch.Tensor], {layer: p.scores for layer, p in probes.items()})  # set by the tower
        cut = slice(r.drop, None)
        imp = pruning.importance(r.method, scores, has_cls=r.has_cls, feature=r.feature, ensemble=r.ensemble)[:, cut]
        early = scores[0][:, cut] if r.method == "hired" else None
        return features, imp, early, None if keys is None else keys[:, cut]

    def ranking(self, imp: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """The scores the top-k runs on: FoPru's row lift for "rows" (imp [V, g*g], counts [V])."""
        return pruning.rows_first(imp, self.rule.grid, counts) if self.rule.method == "rows" else imp

    def keep(self, x: torch.Tensor, scores: torch.Tensor, counts: torch.Tensor, keys: torch.Tensor | None,
             segments: list[int] | None = None) -> tuple[torch.Tensor, vtattn.Selection]:
        """Top-k of scores [B, N] per (row, segment) `counts` ([B] or [B, S]), then the kept rows of
        x (merged when configured)."""
        uniform = counts.dim() == 1 and bool((counts == counts[0]).all())  # counts live on the host
        sel = vtattn.select_tokens(scores, keep_tokens=int(counts[0]) if uniform else counts.to(x.device),
                                   segments=segments)
        if self.rule.merge:
            return vtattn.merge_tokens(x, sel, keys=cast(torch.Tensor, keys), mode=self.rule.merge), sel
        return vtattn.gather_tokens(x, sel), sel


def check_count(got: int, want: int, what: str) -> None:
    if got != want:  # vLLM would silently truncate (or fail on) a count that differs from the placeholders
        raise RuntimeError(f"vtattn: {what} produced {got} embeddings for {want} placeholder tokens")


# ---- LLaVA-1.5 ------------------------------------------------------------------------------

class PrunedLlavaInfo(LlavaProcessingInfo):
    def get_num_image_tokens(self, *, image_width: int, image_height: int) -> int:
        n = super().get_num_image_tokens(image_width=image_width, image_height=image_height)
        return sum(Rule(self.get_hf_config()).view_budgets([n]))


class PrunedLlavaProcessor(SettingsHash, LlavaMultiModalProcessor):
    pass


@MULTIMODAL_REGISTRY.register_processor(PrunedLlavaProcessor, info=PrunedLlavaInfo,
                                        dummy_inputs=LlavaDummyInputsBuilder)
class VtattnLlavaForConditionalGeneration(LlavaForConditionalGeneration):
    """vLLM's LLaVA-1.5 with vtattn's visual-token pruning before the projector."""

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "") -> None:
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        if self.config.vision_config.model_type == "pixtral":
            raise NotImplementedError("vtattn pruning supports LLaVA with a CLIP or SigLIP tower, not Pixtral")
        self.rule = Rule(self.config)
        self.selector = Selector(self.rule, self.vision_tower)

    def _process_image_pixels(self, inputs: Any) -> torch.Tensor:
        pixel_values = inputs["pixel_values"]
        if not isinstance(pixel_values, torch.Tensor):
            pixel_values = torch.stack(list(pixel_values))
        x, imp, early, keys = self.selector.encode(pixel_values)
        (k,) = self.rule.view_budgets([x.shape[1]])
        counts = torch.full((len(x),), k)
        kept, _ = self.selector.keep(x, self.selector.ranking(imp, counts), counts, keys)
        check_count(kept.shape[1], k, "an image")
        return kept  # the base class projects it


# ---- LLaVA-NeXT -----------------------------------------------------------------------------

def anyres_layout(image_size: Any, config: Any, grid: int) -> dict[str, Any]:
    """Where each token of one LLaVA-NeXT image goes in vLLM's (and transformers') packed sequence:
    the base view's g*g tokens, then the crop grid unpadded to the image's aspect ratio, read row by
    row, each row followed by a newline token. Views are the base then the crops (row-major). Returns
    valid [V, g*g] (the token survives unpadding), slot [V, g*g] (its index in the sequence),
    newline [R] (the newline slots), length (of the sequence) and crop_grid (nh, nw)."""
    nh, nw = get_anyres_image_grid_shape(tuple(int(s) for s in image_size), config.image_grid_pinpoints,
                                         config.vision_config.image_size)
    n, width = grid * grid, nw * grid
    combined = unpad_image(torch.arange(nh * grid * width).view(1, nh * grid, width), tuple(image_size))[0]
    R, C = combined.shape
    r, c = combined // width, combined % width
    view, local = 1 + (r // grid) * nw + c // grid, (r % grid) * grid + c % grid
    valid = torch.zeros(1 + nh * nw, n, dtype=torch.bool)
    slot = torch.zeros(1 + nh * nw, n, dtype=torch.long)
    valid[0], slot[0] = True, torch.arange(n)
    valid[view, local] = True
    slot[view, local] = n + torch.arange(R)[:, None] * (C + 1) + torch.arange(C)
    newline = n + torch.arange(R) * (C + 1) + C
    return dict(valid=valid, slot=slot, newline=newline, length=n + R * (C + 1), crop_grid=(nh, nw))


class PrunedLlavaNextInfo(LlavaNextProcessingInfo):
    def get_num_image_tokens(self, *, image_width: int, image_height: int) -> int:
        config = self.get_hf_config()
        rule = Rule(config)
        layout = anyres_layout((image_height, image_width), config, rule.grid)
        return sum(rule.view_budgets(layout["valid"].sum(1).tolist())) + len(layout["newline"])


class PrunedLlavaNextProcessor(SettingsHash, LlavaNextMultiModalProcessor):
    pass


@MULTIMODAL_REGISTRY.register_processor(PrunedLlavaNextProcessor, info=PrunedLlavaNextInfo,
                                        dummy_inputs=LlavaDummyInputsBuilder)
class VtattnLlavaNextForConditionalGeneration(LlavaNextForConditionalGeneration):
    """vLLM's LLaVA-NeXT with vtattn's per-view (HiRED: per-image) pruning before the projector."""

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "") -> None:
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        self.rule = Rule(self.config)
        if self.rule.full != self.rule.grid ** 2:
            raise ValueError("LLaVA-NeXT packs square grids of patch tokens: the features must leave out any [CLS] "
                             "token (strategy 'default' for CLIP, 'full' for SigLIP)")
        self.selector = Selector(self.rule, self.vision_tower)

    def _process_image_input(self, image_input: Any) -> Any:
        if image_input["type"] == "image_embeds":
            return super()._process_image_input(image_input)
        rule, config = self.rule, self.config
        sizes = image_input["image_sizes"].tolist()
        layouts = [anyres_layout(s, config, rule.grid) for s in sizes]
        pixel_values = image_input["pixel_values"]
        views = [len(lay["valid"]) for lay in layouts]  # patches past them pad a batched tensor
        x, imp, early, keys = self.selector.encode(torch.cat([p[:v] for p, v in zip(pixel_values, views)]))
        parts = [t.split(views) if t is not None else [None] * len(views)  # type: ignore[no-untyped-call]
                 for t in (x, imp, early, keys)]
        kept, slots = [], []
        for lay, xi, si, ei, ki in zip(layouts, *parts):
            valid = lay["valid"].to(x.device)
            tokens = valid.sum(1)
            counts = torch.tensor(rule.view_budgets(tokens.tolist(), None if ei is None else ei[0], lay["crop_grid"]))
            scores = self.selector.ranking(si.masked_fill(~valid, -1.0), counts.to(x.device))
            flat = valid.flatten().nonzero().squeeze(1)
            used = tokens > 0  # a crop can lie entirely in the unpadded margin
            features, sel = self.selector.keep(
                xi.flatten(0, 1)[flat][None], scores.flatten()[flat][None],
                counts[used.cpu()][None], None if ki is None else ki.flatten(0, 1)[flat][None],
                segments=tokens[used].tolist())
            kept.append(features[0])
            slots.append(torch.cat([lay["slot"].to(x.device).flatten()[flat[sel.indices[0]]],
                                    lay["newline"].to(x.device)]))
            check_count(len(slots[-1]), int(counts.sum()) + len(lay["newline"]), "an image")
        projected = self.multi_modal_projector(torch.cat(kept)).split([len(k) for k in kept])
        newline = self.image_newline
        return [torch.cat([p, newline.to(p.dtype).expand(len(s) - len(p), -1)])[s.argsort()]
                for p, s in zip(projected, slots)]
