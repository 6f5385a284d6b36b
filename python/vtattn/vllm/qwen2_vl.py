"""vtattn's pruned Qwen2-VL and Qwen2.5-VL for vLLM: the rule of `vtattn.patch.qwen2_vl`
(docs/selection.md). Each image and each video frame keeps its top `budget(keep, n)` of its n merged
tokens, scored by the attention they receive in the ViT's last full-attention block (summed over
the image's / frame's rows, mean over heads, summed over each 2x2 merge group), recorded from that
very ViT call with `vtattn.key_importance`.

Positions: the kept tokens keep their M-RoPE positions and the text after an image keeps the
position it has in the unpruned prompt (as the transformers drop-in does). vLLM recomputes M-RoPE
positions after the encoder only on its multimodal-pruning path (`SupportsMultiModalPruning`,
turned on by `video_pruning_rate > 0`, which the plugin sets for these variants): each item's
embeddings carry 4 extra channels (t, h, w of every kept token, then the position span of the
whole item), which `recompute_mrope_positions` strips."""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from functools import partial
from typing import Any, cast

import numpy as np
import torch
from transformers.vision_utils import get_vision_window_index
from vllm.config import VllmConfig
from vllm.model_executor.models.interfaces import SupportsMultiModalPruning
from vllm.model_executor.models.qwen2_5_vl import (Qwen2_5_VLDummyInputsBuilder, Qwen2_5_VLForConditionalGeneration,
                                                   Qwen2_5_VLMultiModalProcessor, Qwen2_5_VLProcessingInfo)
from vllm.model_executor.models.qwen2_vl import (Qwen2VLDummyInputsBuilder, Qwen2VLForConditionalGeneration,
                                                 Qwen2VLMultiModalProcessor, Qwen2VLProcessingInfo)
from vllm.multimodal import MULTIMODAL_REGISTRY
from vllm.multimodal.processing import PromptReplacement
from vllm.multimodal.video_prune.evs import recompute_mrope_positions

import vtattn
from vtattn import pruning

from . import KEY, check_settings
from .encoder import Probe, layers
from .hashing import SettingsHash
from .llava import check_count

TOKEN = {"image": "image_token_id", "video": "video_token_id"}


class Rule:
    """Budgets and the probed block of a Qwen2(.5)-VL config (the processor and the model agree)."""

    def __init__(self, config: Any) -> None:
        s = check_settings(getattr(config, KEY))
        if pruning.resolve_method(s["method"], has_cls=False) != "mean_received":
            raise ValueError(f"Qwen2-VL / Qwen2.5-VL score tokens by the attention they receive: method 'auto' or "
                             f"'mean_received', got {s['method']!r}")
        if s["merge"] is not None:
            raise NotImplementedError("merge= applies to LLaVA; Qwen2-VL / Qwen2.5-VL keep tokens (no merge)")
        vision = config.vision_config
        full = getattr(vision, "fullatt_block_indexes", None)  # Qwen2.5-VL: window attention elsewhere
        self.keep, self.vision = s["keep"], vision
        self.windowed = bool(full)
        self.block = max(full) if full else vision.depth - 1
        self.merge = vision.spatial_merge_size
        self.unit = self.merge ** 2

    def frames(self, grid: Sequence[int]) -> list[int]:
        """Kept tokens of each frame of an item with patch grid (t, h, w) (a count keeps at most a frame)."""
        t, h, w = (int(x) for x in grid)
        n = h * w // self.unit
        return [pruning.budget(self.keep, n) if isinstance(self.keep, float) else min(self.keep, n)] * t


def media_positions(t: int, h: int, w: int, t_factor: float) -> np.ndarray:
    """M-RoPE positions [3, t*h*w] of a media item's merged tokens (llm grid t, h, w), from 0 (vLLM's
    and transformers' rule; video time scaled by t_factor)."""
    grid = np.indices((t, h, w)).reshape(3, -1)
    if t_factor != 1.0:
        grid[0] = (grid[0] * t_factor).astype(np.int64)
    return grid


class PrunedCounts:
    """Mixin for the multimodal processor: each item's placeholder run is its pruned token count."""

    def _get_prompt_updates(self, mm_items: Any, hf_processor_mm_kwargs: Mapping[str, Any],
                            out_mm_kwargs: Any) -> Sequence[PromptReplacement]:
        config = self.info.get_hf_config()  # type: ignore[attr-defined]
        rule = Rule(config)

        def replacement(item_idx: int, modality: str) -> list[int]:
            grid = out_mm_kwargs[modality][item_idx][f"{modality}_grid_thw"].data.tolist()
            return [getattr(config, TOKEN[modality])] * sum(rule.frames(grid))

        return [PromptReplacement(modality=m, target=[getattr(config, TOKEN[m])],
                                  replacement=partial(replacement, modality=m)) for m in ("image", "video")]


class Pruned:
    """The pruning of both variants (mixed in before vLLM's model class; SupportsMultiModalPruning,
    a Protocol, goes after it: first in the MRO its __init__ would skip nn.Module's)."""

    def _vtattn_setup(self, vllm_config: VllmConfig) -> None:
        if vllm_config.model_config.multimodal_config.mm_encoder_tp_mode == "data":
            raise NotImplementedError("vtattn's Qwen variants score images in the ViT on every rank: use the default "
                                      "mm_encoder_tp_mode='weights' (scores are all-reduced across ranks)")
        self.rule = Rule(self.config)  # type: ignore[attr-defined]
        visual = self.visual  # type: ignore[attr-defined]
        self.vtattn_attn = layers(visual)
        for module in visual.modules():
            if getattr(module, "attn", None) in self.vtattn_attn:
                module.attn.enable(getattr(module, "tp_size", 1))

    def embed_multimodal(self, **kwargs: object) -> tuple[torch.Tensor, ...]:
        inputs = self._parse_and_validate_multimodal_inputs(**kwargs)  # type: ignore[attr-defined]
        out: tuple[torch.Tensor, ...] = ()
        for key, item in inputs.items():  # "image(s)" / "video(s)", in the prompt's order
            out += self._pruned(item, "image" if key.startswith("image") else "video")
        return out

    def _pruned(self, item: Any, modality: str) -> tuple[torch.Tensor, ...]:
        """Each item's kept embeddings [k, C + 4] (the last 4 channels: positions, see the module)."""
        if item["type"] != "pixel_values" and not (modality == "video" and item["type"] == "pixel_values_videos"):
            raise NotImplementedError("vtattn pruning scores images in the ViT: pass images / videos, not "
                                      "pre-computed embeddings")
        rule, grid = self.rule, item[f"{modality}_grid_thw"]
        probe = self.vtattn_attn[rule.block].probe = Probe(rows="all", reduce="mean")
        try:
            encode = self._process_image_input if modality == "image" else self._process_video_input  # type: ignore[attr-defined]
            embeds = encode(item)
        finally:
            self.vtattn_attn[rule.block].probe = None
        units = cast(torch.Tensor, probe.scores).view(-1, rule.unit).sum(-1)  # a merge group's patches are consecutive
        if rule.windowed:  # the block's (window) order -> the merger's output order
            v = rule.vision
            order, _ = get_vision_window_index(grid, spatial_merge_size=v.spatial_merge_size,
                                               window_size=v.window_size, patch_size=v.patch_size)
            units = torch.empty_like(units).scatter_(0, order.to(units.device), units)
        seconds = item.get("second_per_grid_ts") if modality == "video" else None
        tps = getattr(rule.vision, "tokens_per_second", 1.0)
        kept, done = [], 0
        for i, (emb, (t, h, w)) in enumerate(zip(embeds, grid.tolist())):
            frames = [h * w // rule.unit] * t
            scores, done = units[done:done + len(emb)], done + len(emb)
            budgets = torch.tensor([rule.frames((t, h, w))], device=emb.device)
            sel = vtattn.select_tokens(scores[None], keep_tokens=budgets, segments=frames)
            t_factor = 1.0 if seconds is None else float(seconds[i]) * tps
            pos = torch.from_numpy(media_positions(t, h // rule.merge, w // rule.merge, t_factor)).to(emb.device)
            span = pos.max() + 1  # where the text after the item starts, from the item's start
            pos = torch.cat([pos[:, sel.indices[0]], span.expand(1, sel.indices.shape[1])]).T
            out = torch.cat([vtattn.gather_tokens(emb[None], sel)[0], pos.to(emb.dtype)], dim=1)
            check_count(len(out), int(budgets.sum()), f"a{'n image' if modality == 'image' else ' video'}")
            kept.append(out)
        return tuple(kept)

    def get_mrope_input_positions(self, input_tokens: list[int], mm_features: list[Any]) -> tuple[torch.Tensor, int]:
        """The prompt's positions with the pruned placeholder counts: text keeps its unpruned
        positions; the media tokens' are placeholders until `recompute_mrope_positions` sets the
        kept tokens' after the encoder."""
        parts, st, at = [], 0, 0
        for offset, t, h, w, t_factor in self.iter_mm_grid_thw(mm_features):  # type: ignore[attr-defined]
            text = offset - st
            parts.append(np.broadcast_to(np.arange(text), (3, text)) + at)
            grid = media_positions(t, h, w, t_factor)
            k = sum(self.rule.frames((t, h * self.rule.merge, w * self.rule.merge)))
            parts.append(grid[:, :k] + at + text)
            at, st = at + text + int(grid.max()) + 1, offset + k
        tail = len(input_tokens) - st
        parts.append(np.broadcast_to(np.arange(tail), (3, tail)) + at)
        positions = np.concatenate(parts, axis=1)
        return torch.from_numpy(positions), int(max(at, positions.max() + 1)) - len(input_tokens)

    def recompute_mrope_positions(self, input_ids: list[int] | torch.Tensor,
                                  multimodal_embeddings: Sequence[torch.Tensor], mrope_positions: torch.LongTensor,
                                  num_computed_tokens: int) -> tuple[Sequence[torch.Tensor], torch.Tensor, int]:
        c = self.config  # type: ignore[attr-defined]
        device = multimodal_embeddings[0].device if len(multimodal_embeddings) else mrope_positions.device
        ids = (input_ids.to(device, torch.long) if isinstance(input_ids, torch.Tensor)
               else torch.tensor(input_ids, dtype=torch.long, device=device))
        positions, delta = recompute_mrope_positions(
            ids, [m[:, -4:].T.long() for m in multimodal_embeddings], mrope_positions, num_computed_tokens,
            c.vision_start_token_id, c.image_token_id, c.video_token_id)
        return [m[:, :-4] for m in multimodal_embeddings], positions, delta


class PrunedQwen2VLProcessor(SettingsHash, PrunedCounts, Qwen2VLMultiModalProcessor):
    pass


@MULTIMODAL_REGISTRY.register_processor(PrunedQwen2VLProcessor, info=Qwen2VLProcessingInfo,
                                        dummy_inputs=Qwen2VLDummyInputsBuilder)
class VtattnQwen2VLForConditionalGeneration(Pruned, Qwen2VLForConditionalGeneration, SupportsMultiModalPruning):
    """vLLM's Qwen2-VL with vtattn's per-image / per-frame pruning of the merged tokens."""

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "") -> None:
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        self._vtattn_setup(vllm_config)


class PrunedQwen2_5_VLProcessor(SettingsHash, PrunedCounts, Qwen2_5_VLMultiModalProcessor):
    pass


@MULTIMODAL_REGISTRY.register_processor(PrunedQwen2_5_VLProcessor, info=Qwen2_5_VLProcessingInfo,
                                        dummy_inputs=Qwen2_5_VLDummyInputsBuilder)
class VtattnQwen2_5_VLForConditionalGeneration(Pruned, Qwen2_5_VLForConditionalGeneration):
    """vLLM's Qwen2.5-VL with vtattn's per-image / per-frame pruning of the merged tokens."""

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "") -> None:
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        self._vtattn_setup(vllm_config)


__all__ = ["VtattnQwen2VLForConditionalGeneration", "VtattnQwen2_5_VLForConditionalGeneration"]
