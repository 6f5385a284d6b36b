"""The vLLM suite's tiny random-weight models: LLaVA-1.5 (CLIP, SigLIP), the random images and
prompts come from vtattn.vllm.tiny (the benchmark's `vllm` scenario writes the same checkpoints);
LLaVA-NeXT, Qwen2-VL and Qwen2.5-VL are written here on its pieces."""
from __future__ import annotations

import pathlib

import torch
import transformers

from vtattn.vllm.tiny import ID, clip, image, llama, llava, save, sharpen, text, tokenizer

__all__ = ["image", "llava", "llava_next", "qwen2_vl", "qwen2_5_vl", "text"]

PINPOINTS = [[56, 112], [112, 56], [112, 112], [56, 168]]


def llava_next(path, seed: int = 0) -> None:
    vision = clip(image_size=56)
    config = transformers.LlavaNextConfig(vision_config=vision, text_config=transformers.LlamaConfig(**llama()),
                                          image_token_index=ID["<image>"], image_grid_pinpoints=PINPOINTS,
                                          vision_feature_layer=-2, vision_feature_select_strategy="default",
                                          projector_hidden_act="gelu")
    config.architectures = ["LlavaNextForConditionalGeneration"]
    torch.manual_seed(seed)
    model = sharpen(transformers.LlavaNextForConditionalGeneration(config).eval())
    with torch.no_grad():
        model.model.image_newline.normal_()
    image_processor = transformers.LlavaNextImageProcessor(size={"shortest_edge": 56},
                                                           crop_size={"height": 56, "width": 56},
                                                           image_grid_pinpoints=PINPOINTS)
    processor = transformers.LlavaNextProcessor(image_processor=image_processor, tokenizer=tokenizer(),
                                                patch_size=14, vision_feature_select_strategy="default",
                                                image_token="<image>", num_additional_image_tokens=1)
    save(model, processor, path)


def qwen2_vl(path, seed: int = 0) -> None:
    text = dict(llama(), rope_scaling={"type": "mrope", "mrope_section": [4, 6, 6]}, rope_theta=10000.0)
    text.pop("bos_token_id")
    vision = dict(depth=2, embed_dim=32, hidden_size=64, num_heads=2, mlp_ratio=2, patch_size=14,
                  spatial_merge_size=2, temporal_patch_size=2, in_channels=3)
    config = transformers.Qwen2VLConfig(text_config=text, vision_config=vision, image_token_id=ID["<|image_pad|>"],
                                        video_token_id=ID["<|video_pad|>"],
                                        vision_start_token_id=ID["<|vision_start|>"],
                                        vision_end_token_id=ID["<|vision_end|>"])
    config.architectures = ["Qwen2VLForConditionalGeneration"]
    torch.manual_seed(seed)
    model = sharpen(transformers.Qwen2VLForConditionalGeneration(config).eval())
    image_processor = transformers.Qwen2VLImageProcessor(min_pixels=56 * 56, max_pixels=112 * 112, patch_size=14,
                                                         merge_size=2, temporal_patch_size=2)
    # No Qwen2VLProcessor: transformers 5 builds it with a torchvision video processor (torchvision is
    # not in the vLLM environment, see scripts/vllm_env.sh); its image processor and tokenizer suffice.
    save(model, image_processor, path)
    tokenizer().save_pretrained(pathlib.Path(path))


def qwen2_5_vl(path, seed: int = 0) -> None:
    """Window attention in block 0 (windows of 2x2 merge units), full attention in block 1 (the probed one)."""
    text = dict(llama(), rope_scaling={"type": "mrope", "mrope_section": [4, 6, 6]}, rope_theta=10000.0)
    text.pop("bos_token_id")
    vision = dict(depth=2, hidden_size=32, out_hidden_size=64, intermediate_size=64, num_heads=2, patch_size=14,
                  spatial_merge_size=2, temporal_patch_size=2, in_channels=3, window_size=56,
                  fullatt_block_indexes=[1], tokens_per_second=2)
    config = transformers.Qwen2_5_VLConfig(text_config=text, vision_config=vision, image_token_id=ID["<|image_pad|>"],
                                           video_token_id=ID["<|video_pad|>"],
                                           vision_start_token_id=ID["<|vision_start|>"],
                                           vision_end_token_id=ID["<|vision_end|>"])
    config.architectures = ["Qwen2_5_VLForConditionalGeneration"]
    torch.manual_seed(seed)
    model = sharpen(transformers.Qwen2_5_VLForConditionalGeneration(config).eval())
    image_processor = transformers.Qwen2VLImageProcessor(min_pixels=56 * 56, max_pixels=168 * 168, patch_size=14,
                                                         merge_size=2, temporal_patch_size=2)
    save(model, image_processor, path)
    tokenizer().save_pretrained(pathlib.Path(path))
