"""`VisionSelect` on Qwen2-VL and Qwen2.5-VL: each image (and each video frame) keeps its top merged
tokens by the attention they receive in the ViT's last full-attention block: summed over the image's
(frame's) rows, mean over heads, summed over the tokens of each spatial merge group (DESIGN's rule
for encoders without [CLS]).

The scores come from that very call of the ViT, routed to vtattn's attention (`key_importance`
from its LSE): no eager attention, no second pass. The other image tokens leave the sequence at
the LLM's input (`drop.Drop` at layer 0): kept tokens keep their M-RoPE positions (gaps where
tokens left), and what `generate` sees (masks, positions) stays in the full sequence's frame."""
from __future__ import annotations

import functools
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from vtattn import pruning

from . import core
from .drop import Drop, Step
from .hf_attention import Probe, probing

if TYPE_CHECKING:
    from .vision import VisionSelect

# (pixels, grid, the config's token id) of each modality the ViT encodes, in the model's order
MODALITIES = (("pixel_values", "image_grid_thw", "image_token_id"),
              ("pixel_values_videos", "video_grid_thw", "video_token_id"))


class AtInput(core.Installed):
    """VisionSelect installed on a Qwen2-VL / Qwen2.5-VL (...ForConditionalGeneration)."""
    phase = core.LAYERS

    def __init__(self, options: VisionSelect, patch: core.Patch) -> None:
        model: Any = patch.model  # a transformers model (Any: transformers is not followed)
        self.options = options
        visual = model.model.visual
        decoder = core.language_model(model)
        core.check_full_attention(decoder.config)
        full = getattr(visual.config, "fullatt_block_indexes", None)  # Qwen2.5-VL: window attention elsewhere
        self.model, self.visual, self.keep, self.windowed = model, visual, options.budget, full is not None
        self.block = visual.blocks[max(full) if full else len(visual.blocks) - 1].attn
        self.unit = visual.spatial_merge_size ** 2
        self.drop = Drop(patch, decoder, 0, "VisionSelect")
        patch.route(block.attn for block in visual.blocks)
        patch.hide("mm_encoder_outputs")
        # generate now hands pixel_values to the prefill (not pre-encoded features), so its batch
        # expansion must repeat whole images; transformers >= 5.23 leaves that to the pre-encoding and
        # would repeat each patch row.
        from transformers import GenerationMixin
        if type(model)._expand_inputs_for_generation is GenerationMixin._expand_inputs_for_generation:
            model._expand_inputs_for_generation = functools.partial(_expand_by_image, model)

    @property
    def kept(self) -> torch.Tensor | None:
        return self.drop.kept

    def uninstall(self) -> None:
        self.drop.remove()
        self.model.__dict__.pop("_expand_inputs_for_generation", None)

    def forward(self, call: core.Call, proceed: Callable[[core.Call], Any]) -> Any:
        kwargs = call.kwargs
        encodes = any(kwargs.get(key) is not None and kwargs[key].numel() > 0
                      for key, _, _ in MODALITIES) and call.images is not None  # (images: computed on first read)
        if not encodes:
            return self.drop.forward(call, proceed, _needs_pixels)
        # The ViT is called per image, per video frame (images first, as the model encodes them).
        parts: list[torch.Tensor] = []
        probe = Probe(rows="all", reduce="mean", parts=parts)
        grids = {key: kwargs.get(grid) if kwargs.get(key) is not None else None for key, grid, _ in MODALITIES}
        input_ids = call.input_ids
        with probing({self.block: probe}):
            return self.drop.forward(call, proceed, lambda step: self._chosen(
                torch.cat([p[0] for p in parts]), grids, input_ids, step.images))

    def _chosen(self, scores: torch.Tensor, grids: dict[str, torch.Tensor | None], input_ids: torch.Tensor | None,
                images: torch.Tensor | None) -> torch.Tensor:
        """scores [P]: the block's patches in its order (images', then videos'; Qwen2.5-VL: window
        order) -> kept tokens [B, N] bool, top-k per image and per video frame."""
        assert input_ids is not None and images is not None  # a prefill with image tokens (`forward`)
        chosen, done = torch.zeros_like(images), 0
        for key, _, token in MODALITIES:
            grid = grids[key]
            if grid is None:
                continue
            n = int(grid.prod(-1).sum())
            units = self._units(scores[done:done + n], grid)
            done += n
            frames = [h * w // self.unit for t, h, w in grid.tolist() for _ in range(t)]  # segments
            where = input_ids == getattr(self.model.config, token)
            if sum(frames) != int(where.sum()):
                raise ValueError(f"{key}'s grid gives {sum(frames)} tokens, input_ids holds {int(where.sum())}")
            budgets = torch.tensor([[pruning.budget(self.keep, f, max(frames)) for f in frames]])
            chosen[where] = core.select(units[None], budgets, frames).mask[0]  # budgets on the host
        return chosen

    def _units(self, scores: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
        """Patch scores [P] -> merge-group scores in the merger's output order."""
        units = scores.view(-1, self.unit).sum(-1)  # a merge group's patches are consecutive
        if self.windowed:  # units in window order -> the merger's output order
            from transformers.vision_utils import get_vision_window_index
            c = self.visual.config
            order, _ = get_vision_window_index(grid, spatial_merge_size=c.spatial_merge_size,
                                               window_size=c.window_size, patch_size=c.patch_size)
            units = torch.empty_like(units).scatter_(0, order.to(units.device), units)
        return units


def _needs_pixels(step: Step) -> torch.Tensor:
    raise NotImplementedError("vtattn.patch.qwen2_vl(keep=...) scores the images in the ViT: pass pixel_values "
                              "with the prompt's image tokens (not pre-encoded features)")


def _expand_by_image(model: torch.nn.Module, expand_size: int = 1, is_encoder_decoder: bool = False,
                     input_ids: torch.Tensor | None = None, **kwargs: Any) -> tuple[Any, dict[str, Any]]:
    """generate's batch expansion (beams, num_return_sequences) with each sample's images and
    videos, their patch rows and grid rows, repeated whole after the sample's own."""
    from transformers import GenerationMixin
    visual = {key: kwargs.pop(key, None) for pair in MODALITIES for key in pair[:2]}
    expanded_ids, kwargs = GenerationMixin._expand_inputs_for_generation(model, expand_size, is_encoder_decoder,
                                                                        input_ids, **kwargs)
    kwargs.update(visual)
    if expand_size == 1 or input_ids is None:
        return expanded_ids, kwargs
    for key, grid_key, token in MODALITIES:
        pixels, grid = visual[key], visual[grid_key]
        if pixels is None or grid is None:
            continue
        mine = input_ids == getattr(model.config, token)
        per_sample = (mine & ~F.pad(mine[:, :-1], (1, 0))).sum(1).tolist()  # runs of its tokens
        rows = grid.prod(-1).tolist()
        patches, grids, first, row = [], [], 0, 0
        for n in per_sample:
            r = sum(rows[first:first + n])
            patches.append(pixels[row:row + r].repeat(expand_size, 1))
            grids.append(grid[first:first + n].repeat(expand_size, 1))
            first, row = first + n, row + r
        kwargs.update({key: torch.cat(patches), grid_key: torch.cat(grids)})
    return expanded_ids, kwargs
