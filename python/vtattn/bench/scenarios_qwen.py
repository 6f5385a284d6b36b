"""The Qwen2-VL-7B end-to-end scenario's model and inputs (scenarios_llm runs its rows): the real
config with random weights, images of 448 x 448 (32 x 32 patches, 256 tokens after the 2 x 2
merger), patched with `vtattn.patch.qwen2_vl` (vision-side keep, FastV, KV compression). Scaled
down on CPU like the LLaVA scenarios, the head dims kept (128 in the LLM: M-RoPE's sections need
it; 80 in the ViT)."""
from typing import Any

import torch

from .cases import Inputs
from .scenarios import SCALE

QWEN2VL7B: dict[str, Any] = dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                                 num_attention_heads=28, num_key_value_heads=4, vocab_size=152064,
                                 rope_scaling={"type": "mrope", "mrope_section": [16, 24, 24]})
VISION: dict[str, int] = dict(depth=32, embed_dim=1280, num_heads=16, mlp_ratio=4, patch_size=14,
                              spatial_merge_size=2, temporal_patch_size=2, in_channels=3)
SIDE = 448
HEAD_DIM, VISION_HEAD_DIM = 128, 80


def config(transformers: Any, level_scale: str, llm_layers: int | None) -> tuple[Any, int]:
    """Qwen2VLConfig at a scale (SCALE's key; llm_layers: None = all) and its image token id."""
    sc = SCALE[level_scale]
    w = sc["width"]
    text = dict(QWEN2VL7B)
    heads = max(1, text["num_attention_heads"] // w)
    group = text["num_attention_heads"] // text["num_key_value_heads"]
    text.update(num_attention_heads=heads, num_key_value_heads=max(1, heads // group), hidden_size=heads * HEAD_DIM,
                intermediate_size=text["intermediate_size"] // w)
    vision = dict(VISION)
    vheads = max(1, vision["num_heads"] // w)
    vision.update(num_heads=vheads, embed_dim=vheads * VISION_HEAD_DIM, hidden_size=text["hidden_size"])
    if sc["layers"]:
        vision["depth"] = sc["layers"]
    if llm_layers:
        text.update(num_hidden_layers=llm_layers, vocab_size=1024, bos_token_id=1, eos_token_id=2)
    V = text["vocab_size"]
    return transformers.Qwen2VLConfig(text_config=text, vision_config=vision, image_token_id=V - 1,
                                      video_token_id=V - 2, vision_start_token_id=V - 3,
                                      vision_end_token_id=V - 4), V - 1


def grid(level_scale: str) -> int:
    """Patches per image side at a scale: whole 2 x 2 merge groups."""
    return SIDE // 28 // SCALE[level_scale]["side"] * 2


def inputs(config: Any, B: int, images: int, prompt: int, g: int, device: torch.device, dtype: torch.dtype,
           generator: torch.Generator) -> Inputs:

    """One row per sample: <s>, then each image as <vision_start> <image>*(g*g/4) <vision_end>, then
    the prompt's text; pixel patches as the processor flattens them."""
    image_token, start, end = config.image_token_id, config.vision_start_token_id, config.vision_end_token_id
    text = torch.randint(1, end, (B, prompt), device=device, generator=generator)
    span = torch.tensor([start] + [image_token] * (g * g // 4) + [end], device=device)
    ids = torch.cat([text[:, :1], span.repeat(images).expand(B, -1), text[:, 1:]], 1)
    patch = 3 * VISION["temporal_patch_size"] * VISION["patch_size"] ** 2
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids),
            "pixel_values": torch.randn(B * images * g * g, patch, device=device, dtype=dtype, generator=generator),
            "image_grid_thw": torch.tensor([[1, g, g]] * (B * images), device=device),
            "mm_token_type_ids": (ids == image_token).int()}
