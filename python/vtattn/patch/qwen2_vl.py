"""Visual-token pruning for transformers' Qwen2-VL and Qwen2.5-VL: `vtattn.patch.qwen2_vl(model,
keep=0.25)`, alone or with KV compression (`kv=`).

Each image (and each video frame) keeps its top `keep` merged tokens by the attention they receive
in the ViT's last full-attention block: summed over the image's (frame's) rows, mean over heads,
summed over the tokens of each spatial merge group (DESIGN's rule for encoders without [CLS]).
The scores come from that very call of the ViT, run on vtattn attention (`key_importance` from
its LSE): no eager attention, no second pass. The other image tokens leave the sequence at the
LLM's input with FastV's mechanics (`fastv.Runner` at layer 0): kept tokens keep their M-RoPE
positions (gaps where tokens left), and what `generate` sees (masks, positions) stays in the full
sequence's frame."""
import contextlib
import functools

import torch
import torch.nn.functional as F

import vtattn
from vtattn import selection as policy

from .llm import install, llm
from .hf_attention import Probe, probing
from .vision import vtattn_attention


def qwen2_vl(model, *, keep=None, keep_tokens=None, kv=None, fastv=None, image_token_id=None):
    """Patch a Qwen2VLForConditionalGeneration / Qwen2_5_VLForConditionalGeneration in place and
    return it. keep: a ratio in (0, 1] (each image and video frame keeps max(1, round(keep * n)) of
    its n tokens) or keep_tokens: a count per image / frame (at most the largest one's); kv: as
    `vtattn.patch.llm`; fastv: a `vtattn.patch.FastV` instead of keep (one pruning stage). Nothing
    to do (no keep below 1.0, kv or fastv): ValueError. `vtattn.patch.unpatch` restores it."""
    from transformers import Qwen2_5_VLForConditionalGeneration, Qwen2VLForConditionalGeneration
    if not isinstance(model, (Qwen2VLForConditionalGeneration, Qwen2_5_VLForConditionalGeneration)):
        raise TypeError(f"vtattn.patch.qwen2_vl supports transformers' Qwen2-VL and Qwen2.5-VL "
                        f"(...ForConditionalGeneration), got {type(model).__name__}")
    keep = policy.resolve_keep(keep, keep_tokens, default=1.0)
    if keep == 1.0 and not isinstance(keep, int):
        if kv is None and fastv is None:
            raise ValueError("vtattn.patch.qwen2_vl: nothing to do: pass keep < 1.0 (or keep_tokens=), kv= and/or "
                             "fastv=")
        return llm(model, kv=kv, fastv=fastv, image_token_id=image_token_id)
    if fastv is not None:
        raise NotImplementedError("keep= and fastv= are two pruning stages; vtattn.patch.qwen2_vl runs one: "
                                  "pass keep (vision-side) or fastv")
    return install(model, kv, _AtInput, image_token_id, vision=ViTScores(model, keep))


class _AtInput:
    """`fastv.Runner`'s options for a selection at the LLM's input; its `choose` comes with each
    prefill that brings pixel_values (FastV's own rule, `budget`, never applies)."""
    layer = 0

    @staticmethod
    def budget(n):
        raise NotImplementedError("vtattn.patch.qwen2_vl(keep=...) scores the images in the ViT: pass pixel_values "
                                  "with the prompt's image tokens (not pre-encoded features)")


class ViTScores:
    """The kept image tokens of a prefill, scored in the ViT's last full-attention block."""

    def __init__(self, model, keep):
        visual = model.model.visual
        full = getattr(visual.config, "fullatt_block_indexes", None)  # Qwen2.5-VL: window attention elsewhere
        self.model, self.visual, self.keep, self.windowed = model, visual, keep, full is not None
        self.block = visual.blocks[max(full) if full else len(visual.blocks) - 1].attn
        self.unit = visual.spatial_merge_size ** 2

    def attach(self):
        """With the patch on: generate hands pixel_values to the prefill (not pre-encoded features,
        `_install.hide_parameter`), so its batch expansion must repeat whole images; transformers
        >= 5.23 leaves that to the pre-encoding and would repeat each patch row."""
        from transformers import GenerationMixin
        if type(self.model)._expand_inputs_for_generation is GenerationMixin._expand_inputs_for_generation:
            self.model._expand_inputs_for_generation = functools.partial(_expand_by_image, self.model)

    def detach(self):
        self.model.__dict__.pop("_expand_inputs_for_generation", None)

    @staticmethod
    def prefill(images, kwargs):
        """Whether this call encodes images or videos (vision-side pruning applies)."""
        return images is not None and any(kwargs.get(key) is not None and kwargs[key].numel() > 0
                                          for key, _, _ in MODALITIES)

    @contextlib.contextmanager
    def scoring(self, input_ids, images, kwargs):
        """Around the model's forward: the ViT on vtattn attention with a probe on the scored block
        (called per image, per video frame: images first, as the model encodes them); yields the
        function FastV's layer-0 hook calls for the kept image and video tokens [B, N]."""
        probe = Probe(rows="all", reduce="mean", parts=[])
        grids = {key: kwargs.get(grid) if kwargs.get(key) is not None else None for key, grid, _ in MODALITIES}
        with vtattn_attention(self.visual), probing({self.block: probe}):
            yield lambda: self._chosen(torch.cat([p[0] for p in probe.parts]), grids, input_ids, images)

    def _chosen(self, scores, grids, input_ids, images):
        """scores [P]: the block's patches in its order (images', then videos'; Qwen2.5-VL: window
        order) -> kept tokens [B, N] bool, top-k per image and per video frame."""
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
            budgets = torch.tensor([[policy.budget(self.keep, f, max(frames)) for f in frames]])
            chosen[where] = vtattn.select_tokens(units[None], keep_tokens=budgets.to(units.device),
                                                 segments=frames).mask[0]
        return chosen

    def _units(self, scores, grid):
        """Patch scores [P] -> merge-group scores in the merger's output order."""
        units = scores.view(-1, self.unit).sum(-1)  # a merge group's patches are consecutive
        if self.windowed:  # units in window order -> the merger's output order
            from transformers.vision_utils import get_vision_window_index
            c = self.visual.config
            order, _ = get_vision_window_index(grid, spatial_merge_size=c.spatial_merge_size,
                                               window_size=c.window_size, patch_size=c.patch_size)
            units = torch.empty_like(units).scatter_(0, order.to(units.device), units)
        return units


# (pixels, grid, the config's token id) of each modality the ViT encodes, in the model's order
MODALITIES = (("pixel_values", "image_grid_thw", "image_token_id"),
              ("pixel_values_videos", "video_grid_thw", "video_token_id"))


def _expand_by_image(model, expand_size=1, is_encoder_decoder=False, input_ids=None, **kwargs):
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
