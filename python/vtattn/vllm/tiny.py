"""Tiny random-weight LLaVA checkpoints written to a directory as a published one is (config.json,
model.safetensors, tokenizer and processor files), all made in code, nothing downloaded: loadable by
vLLM and by transformers. Used by the vLLM test suite (tests/vllm/_models.py adds LLaVA-NeXT and
Qwen2-VL on these pieces), the `vllm` benchmark scenario and docs/vllm.md's "try it".

Weights are sharpened (q/k projections scaled up, a larger LM head) so that attention scores and
greedy logits are far from ties: the equality tests compare two implementations that round
differently. Needs transformers, safetensors, tokenizers, numpy and Pillow (all in vLLM's environment)."""
from __future__ import annotations

import pathlib
from typing import Any

import numpy as np
import torch
import transformers
from PIL import Image
from safetensors.torch import save_file
from tokenizers import Tokenizer, models, pre_tokenizers

VOCAB = 160
SPECIAL = ["<unk>", "<pad>", "</s>", "<image>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>",
           "<|video_pad|>"]
ID = {t: i for i, t in enumerate(SPECIAL)}
WORDS = [f"w{i}" for i in range(VOCAB - len(SPECIAL))]


def tokenizer() -> transformers.PreTrainedTokenizerFast:
    """A word-level tokenizer: the special tokens, then words w0, w1, ... (split on spaces)."""
    vocab = {t: i for i, t in enumerate(SPECIAL + WORDS)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>",
                                                eos_token="</s>")
    fast.add_special_tokens({"additional_special_tokens": SPECIAL[3:]})
    return fast


def llama(**extra: Any) -> dict[str, Any]:
    """The language model's config kwargs; `extra` overrides or adds (head dim 32 by default: a size
    vLLM's CPU attention supports; 2 heads over 1 kv head, GQA)."""
    return dict(dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                     num_key_value_heads=1, vocab_size=VOCAB, max_position_embeddings=1024, rms_norm_eps=1e-5,
                     tie_word_embeddings=False, pad_token_id=ID["<pad>"], eos_token_id=ID["</s>"],
                     bos_token_id=None), **extra)


def sharpen(model: torch.nn.Module) -> torch.nn.Module:
    with torch.no_grad():
        for name, module in model.named_modules():
            leaf = name.rsplit(".", 1)[-1]
            if isinstance(module, torch.nn.Linear) and leaf in ("q_proj", "k_proj", "qkv"):
                module.weight.mul_(4.0)
            if leaf == "lm_head":
                module.weight.mul_(20.0)
    return model


def clip(image_size: int = 112) -> transformers.CLIPVisionConfig:
    return transformers.CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                                         num_attention_heads=2, image_size=image_size, patch_size=14)


def siglip(image_size: int = 112) -> transformers.SiglipVisionConfig:
    return transformers.SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                                           num_attention_heads=2, image_size=image_size, patch_size=14)


LLAVA_NAMES = [("model.vision_tower.", "vision_tower.vision_model."),
               ("model.language_model.", "language_model.model."),
               ("model.multi_modal_projector.", "multi_modal_projector."), ("lm_head.", "language_model.lm_head."),
               ("model.image_newline", "image_newline")]
QWEN_NAMES = [("model.visual.", "visual."), ("model.language_model.", "model.")]
"""transformers 5's in-memory names -> a published LLaVA (llava-hf) / Qwen2-VL checkpoint's: vLLM's LLaVA loads
the tower only as vision_tower.vision_model.*, which transformers 5 no longer writes (it reads both)."""


def _published(name: str, qwen: bool) -> str:
    for old, new in QWEN_NAMES if qwen else LLAVA_NAMES:
        if name.startswith(old):
            return new + name[len(old):]
    return name


def save(model: torch.nn.Module, processor: Any, path: str | pathlib.Path) -> None:
    """model (transformers) and its processor as a published checkpoint in `path`."""
    path = pathlib.Path(path)
    path.mkdir(parents=True, exist_ok=True)
    config: Any = model.config
    qwen = config.model_type.startswith("qwen")
    save_file({_published(k, qwen): v.contiguous() for k, v in model.state_dict().items()},
              str(path / "model.safetensors"), metadata={"format": "pt"})
    config.save_pretrained(path)
    processor.save_pretrained(path)


def llava(path: str | pathlib.Path, tower: str = "clip", seed: int = 0, image_size: int = 112,
          **text: Any) -> None:
    """A LLaVA-1.5 with a CLIP ([CLS], features of layer -2) or SigLIP tower of `image_size` pixels
    (patches of 14) written to `path`; `text` overrides the language model's config (llama())."""
    vision = clip(image_size) if tower == "clip" else siglip(image_size)
    strategy, layer = ("default", -2) if tower == "clip" else ("full", -1)
    config = transformers.LlavaConfig(vision_config=vision, text_config=transformers.LlamaConfig(**llama(**text)),
                                      image_token_index=ID["<image>"], vision_feature_layer=layer,
                                      vision_feature_select_strategy=strategy, projector_hidden_act="gelu")
    config.architectures = ["LlavaForConditionalGeneration"]
    torch.manual_seed(seed)
    model = sharpen(transformers.LlavaForConditionalGeneration(config).eval())
    image_processor = (transformers.CLIPImageProcessor(size={"shortest_edge": image_size},
                                                       crop_size={"height": image_size, "width": image_size})
                       if tower == "clip" else
                       transformers.SiglipImageProcessor(size={"height": image_size, "width": image_size}))
    processor = transformers.LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer(), patch_size=14,
                                            vision_feature_select_strategy=strategy, image_token="<image>",
                                            num_additional_image_tokens=1 if tower == "clip" else 0)
    save(model, processor, path)


def image(seed: int, size: tuple[int, int] = (112, 112)) -> Image.Image:
    """A random RGB image (width, height)."""
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def text(seed: int, n: int = 6) -> str:
    """n random words of the tokenizer's."""
    rng = np.random.default_rng(1000 + seed)
    return " ".join(WORDS[i] for i in rng.integers(0, 60, n))
