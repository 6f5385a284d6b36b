"""Tiny random-weight transformers models of many families, built in code (no downloads), for the
`attn_implementation="vtattn"` conformance suite. Each family builds a model (its q / k projections
scaled up so attention is far from uniform: a wrong scale, mask or softcap shows) and its inputs,
batch 1 or a padded batch of 2."""
import copy
from dataclasses import dataclass, field

import pytest
import torch

transformers = pytest.importorskip("transformers")
import _vlm  # noqa: E402  (Qwen2-VL builders)

VOCAB, PAD, IMAGE = 128, 0, 100
SHARP = 4.0  # q and k projections scaled by this: logits ~ SHARP^2 larger
QK_NAMES = ("q_proj", "k_proj", "q", "k", "query", "key", "qkv", "query_key_value", "in_proj")


@dataclass
class Family:
    name: str
    classes: tuple  # transformers class names it needs (a missing one skips the family)
    build: object  # () -> model (eval, fp32)
    inputs: object  # (batch: int) -> forward kwargs; batch 2 is padded where the family takes a mask
    ref: str = "sdpa"  # the implementation compared with ("eager" where SDPA is not exact / refused)
    generate: bool = False  # a text decoder: greedy generate, dynamic and static cache
    kernel: bool = False  # every attention call must run vtattn's kernels (no fallback)
    notes: dict = field(default_factory=dict)  # fallback reasons expected, "reason prefix": why

    def available(self):
        missing = [c for c in self.classes if not hasattr(transformers, c)]
        return None if not missing else f"transformers {transformers.__version__} has no {', '.join(missing)}"


def sharpen(model, factor=SHARP):
    with torch.no_grad():
        for name, module in model.named_modules():
            if name.rsplit(".", 1)[-1] in QK_NAMES and isinstance(module, torch.nn.Linear):
                module.weight.mul_(factor)
    return model


def seeded(cls_name, config, seed=0):
    torch.manual_seed(seed)
    model = getattr(transformers, cls_name)._from_config(config, attn_implementation="eager")
    with torch.no_grad():  # zero-initialised matrices (Gemma3's image projection) would hide a tower
        for p in model.parameters():
            if p.dim() >= 2 and not p.any():
                p.normal_(0, p.shape[-1] ** -0.5)
    return sharpen(model.eval())


def with_attention(model, implementation):
    """A copy of `model` (weights included) running `implementation` in every part (older
    transformers keep copies of the config in submodules, e.g. T5's stacks in 5.17)."""
    other = copy.deepcopy(model)
    other.set_attn_implementation(implementation)
    for module in other.modules():
        config = getattr(module, "config", None)
        if isinstance(config, transformers.PreTrainedConfig) and config._attn_implementation != implementation:
            config._attn_implementation = implementation
    return other


# ---- inputs ----------------------------------------------------------------------------------------

def text(batch, length=11, seed=0, side="left", vocab=(1, IMAGE)):
    """input_ids [batch, length] and mask; row 0 of a batch of 2 is 4 tokens shorter (padded on `side`)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(*vocab, (batch, length), generator=g)
    mask = torch.ones_like(ids)
    if batch > 1:
        pad = slice(0, 4) if side == "left" else slice(length - 4, length)
        mask[0, pad] = 0
        ids[0, pad] = PAD
    return dict(input_ids=ids, attention_mask=mask)


def pixels(batch, size=28, seed=1, channels=3):
    return torch.randn(batch, channels, size, size, generator=torch.Generator().manual_seed(seed))


def with_images(batch, span, token=IMAGE, length=8, seed=0, images=1):
    """Left-padded ids with `images` spans of `span` image tokens per row (row 0 of 2: 3 text tokens fewer)."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for b in range(batch):
        n = length - (3 if batch > 1 and b == 0 else 0)
        words = torch.randint(1, IMAGE, (n,), generator=g).tolist()
        rows.append(words[:2] + ([token] * span + words[2:3]) * images + words[3:])
    width = max(map(len, rows))
    ids = torch.tensor([[PAD] * (width - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    return dict(input_ids=ids, attention_mask=mask)


# ---- configs -----------------------------------------------------------------------------------------

LM = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
          num_key_value_heads=2, max_position_embeddings=256, pad_token_id=PAD, bos_token_id=1, eos_token_id=None)


def lm(cls_name, config_name, **extra):
    return lambda: seeded(cls_name, getattr(transformers, config_name)(**{**LM, **extra}))


def gemma2():
    return seeded("Gemma2ForCausalLM", transformers.Gemma2Config(
        **LM, head_dim=8, sliding_window=4, attn_logit_softcapping=1.5, final_logit_softcapping=None,
        query_pre_attn_scalar=8))


def gemma3_text():
    return seeded("Gemma3ForCausalLM", transformers.Gemma3TextConfig(
        **{**LM, "num_hidden_layers": 3}, head_dim=8, sliding_window=4, query_pre_attn_scalar=8,
        layer_types=["sliding_attention", "full_attention", "sliding_attention"]))


def gpt_oss():
    model = seeded("GptOssForCausalLM", transformers.GptOssConfig(
        **LM, head_dim=8, sliding_window=4, num_local_experts=4, num_experts_per_tok=2,
        layer_types=["sliding_attention", "full_attention"]))
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.sinks.normal_(0, 2.0, generator=torch.Generator().manual_seed(3))
    return model


def t5():
    return seeded("T5ForConditionalGeneration", transformers.T5Config(
        vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4, pad_token_id=PAD,
        decoder_start_token_id=PAD, eos_token_id=None, relative_attention_num_buckets=8, dropout_rate=0.0))


def t5_inputs(batch):
    x = text(batch, side="right")
    x["decoder_input_ids"] = text(batch, length=6, seed=1)["input_ids"]
    return x


def bert():
    return seeded("BertModel", transformers.BertConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        attention_probs_dropout_prob=0.0, hidden_dropout_prob=0.0))


VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)


def vit():
    return seeded("ViTModel", transformers.ViTConfig(**VISION, image_size=28, patch_size=7))


def clip():
    return seeded("CLIPModel", transformers.CLIPConfig(
        text_config=dict(**VISION, vocab_size=VOCAB, max_position_embeddings=32, eos_token_id=2),
        vision_config=dict(**VISION, image_size=28, patch_size=7), projection_dim=16))


def clip_inputs(batch):
    return dict(text(batch, side="right"), pixel_values=pixels(batch))


def siglip():
    return seeded("SiglipVisionModel", transformers.SiglipVisionConfig(**VISION, image_size=28, patch_size=7))


def llava(cls_name="LlavaForConditionalGeneration", config_name="LlavaConfig", **extra):
    vision = transformers.CLIPVisionConfig(**VISION, image_size=28, patch_size=7)
    return lambda: seeded(cls_name, getattr(transformers, config_name)(
        vision_config=vision, text_config=transformers.LlamaConfig(**LM), image_token_index=IMAGE,
        vision_feature_layer=-2, vision_feature_select_strategy="default", **extra))


def llava_inputs(batch):
    return dict(with_images(batch, 16), pixel_values=pixels(batch))


def llava_next():
    vision = transformers.CLIPVisionConfig(**VISION, image_size=14, patch_size=7)
    return seeded("LlavaNextForConditionalGeneration", transformers.LlavaNextConfig(
        vision_config=vision, text_config=transformers.MistralConfig(**LM, sliding_window=6),
        image_token_index=IMAGE, image_grid_pinpoints=[[14, 28], [28, 14]], vision_feature_layer=-2,
        vision_feature_select_strategy="default"))


def llava_next_inputs(batch):
    # a 14 x 28 image: the base view (2 x 2 tokens) + two 14 x 14 crops side by side (2 x 4 + a newline row each)
    x = with_images(batch, 4 + 2 * 5)
    x["pixel_values"] = torch.randn(batch, 3, 3, 14, 14, generator=torch.Generator().manual_seed(1))
    x["image_sizes"] = torch.tensor([[14, 28]] * batch)
    return x


def qwen2_vl_inputs(batch):
    x = _vlm.qwen2_vl_inputs([(4, 4), (4, 6)][:batch])
    if batch == 1:
        x.pop("attention_mask")
    return x


def idefics3():
    vision = transformers.Idefics3VisionConfig(**VISION, image_size=28, patch_size=7)
    return seeded("Idefics3ForConditionalGeneration", transformers.Idefics3Config(
        vision_config=vision, text_config=transformers.LlamaConfig(**LM), image_token_id=IMAGE, scale_factor=2))


def idefics3_inputs(batch):
    x = with_images(batch, 4)  # 4 x 4 patches, pixel-shuffled by 2: 4 tokens
    x["pixel_values"] = pixels(batch)[:, None]
    return x


def paligemma():
    vision = transformers.SiglipVisionConfig(**VISION, image_size=28, patch_size=7, projection_dim=32)
    text_config = transformers.GemmaConfig(**LM, head_dim=8)
    return seeded("PaliGemmaForConditionalGeneration", transformers.PaliGemmaConfig(
        vision_config=vision, text_config=text_config, image_token_index=IMAGE, projection_dim=32))


def paligemma_inputs(batch):
    x = with_images(batch, 16)
    x["pixel_values"] = pixels(batch)
    x["token_type_ids"] = torch.zeros_like(x["input_ids"])  # the prefix (image + prompt) attends both ways
    return x


def gemma3_vlm():
    vision = transformers.SiglipVisionConfig(**VISION, image_size=28, patch_size=7)
    text_config = transformers.Gemma3TextConfig(**{**LM, "num_hidden_layers": 2}, head_dim=8, sliding_window=4,
                                                query_pre_attn_scalar=8)
    return seeded("Gemma3ForConditionalGeneration", transformers.Gemma3Config(
        vision_config=vision, text_config=text_config, mm_tokens_per_image=4, image_token_index=IMAGE,
        boi_token_index=101, eoi_token_index=102))


def gemma3_vlm_inputs(batch):
    x = with_images(batch, 4)
    x["pixel_values"] = pixels(batch)
    x["token_type_ids"] = (x["input_ids"] == IMAGE).long()
    return x


def mllama():
    vision = transformers.MllamaVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                             num_global_layers=1, attention_heads=4, image_size=14, patch_size=7,
                                             max_num_tiles=2, vision_output_dim=64, intermediate_layers_indices=[0],
                                             supported_aspect_ratios=[[1, 1], [1, 2]])
    text_config = transformers.MllamaTextConfig(**{**LM, "num_hidden_layers": 3}, cross_attention_layers=[1])
    model = seeded("MllamaForConditionalGeneration", transformers.MllamaConfig(
        vision_config=vision, text_config=text_config, image_token_index=IMAGE))
    with torch.no_grad():  # tanh gates start at 0: the image would not reach the text
        for name, p in model.named_parameters():
            if name.endswith("gate"):
                p.fill_(1.0)
    return model


def mllama_inputs(batch):
    x = with_images(batch, 1)
    g = torch.Generator().manual_seed(1)
    x["pixel_values"] = torch.randn(batch, 1, 2, 3, 14, 14, generator=g)
    x["aspect_ratio_ids"] = torch.full((batch, 1), 2)
    x["aspect_ratio_mask"] = torch.ones(batch, 1, 2, dtype=torch.long)
    x["cross_attention_mask"] = torch.ones(batch, x["input_ids"].shape[1], 1, 2, dtype=torch.long)
    return x


def falcon():
    return seeded("FalconForCausalLM", transformers.FalconConfig(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, alibi=True,
        new_decoder_architecture=False, multi_query=False, bias=True, pad_token_id=PAD, eos_token_id=None))


def _text(batch):
    return text(batch)


FAMILIES = [
    Family("llama", ("LlamaForCausalLM",), lm("LlamaForCausalLM", "LlamaConfig"), _text, generate=True, kernel=True),
    Family("mistral", ("MistralForCausalLM",), lm("MistralForCausalLM", "MistralConfig", sliding_window=4), _text,
           generate=True, kernel=True),
    Family("qwen2", ("Qwen2ForCausalLM",), lm("Qwen2ForCausalLM", "Qwen2Config", use_sliding_window=True,
                                               sliding_window=4, max_window_layers=1), _text, generate=True,
           kernel=True),
    Family("qwen3", ("Qwen3ForCausalLM",), lm("Qwen3ForCausalLM", "Qwen3Config", head_dim=8), _text, generate=True,
           kernel=True),
    Family("phi3", ("Phi3ForCausalLM",), lm("Phi3ForCausalLM", "Phi3Config", sliding_window=5), _text,
           generate=True, kernel=True),
    Family("starcoder2", ("Starcoder2ForCausalLM",), lm("Starcoder2ForCausalLM", "Starcoder2Config",
                                                         sliding_window=4), _text, generate=True, kernel=True),
    Family("gemma2", ("Gemma2ForCausalLM",), gemma2, _text, ref="eager", generate=True, kernel=True),
    Family("gemma3", ("Gemma3ForCausalLM",), gemma3_text, _text, generate=True, kernel=True),
    Family("gpt_oss", ("GptOssForCausalLM",), gpt_oss, _text, ref="eager", generate=True, kernel=True),
    Family("falcon", ("FalconForCausalLM",), falcon, _text, generate=True,
           notes={"sdpa: an explicit mask": "ALiBi comes as an additive bias inside the mask"}),
    Family("t5", ("T5ForConditionalGeneration",), t5, t5_inputs,
           notes={"sdpa: position_bias": "relative position bias (no vtattn kernel adds a bias)"}),
    Family("bert", ("BertModel",), bert, lambda b: text(b, side="right"), kernel=True),
    Family("vit", ("ViTModel",), vit, lambda b: dict(pixel_values=pixels(b)), kernel=True),
    Family("clip", ("CLIPModel",), clip, clip_inputs,
           notes={"sdpa: padding among the queries": "the text tower is causal with right padding"}),
    Family("siglip", ("SiglipVisionModel",), siglip, lambda b: dict(pixel_values=pixels(b)), kernel=True),
    Family("llava", ("LlavaForConditionalGeneration",), llava(), llava_inputs, generate=True, kernel=True),
    Family("llava_next", ("LlavaNextForConditionalGeneration",), llava_next, llava_next_inputs, generate=True,
           kernel=True),
    Family("qwen2_vl", ("Qwen2VLForConditionalGeneration",), lambda: sharpen(_vlm.qwen2_vl()), qwen2_vl_inputs,
           generate=True, kernel=True),
    Family("qwen2_5_vl", ("Qwen2_5_VLForConditionalGeneration",), lambda: sharpen(_vlm.qwen2_5_vl()),
           qwen2_vl_inputs, generate=True, kernel=True),
    Family("idefics3", ("Idefics3ForConditionalGeneration",), idefics3, idefics3_inputs, generate=True,
           kernel=True),
    Family("paligemma", ("PaliGemmaForConditionalGeneration",), paligemma, paligemma_inputs, generate=True,
           notes={"sdpa: an explicit mask": "prefix-LM: image and prompt tokens attend both ways"}),
    Family("gemma3_vlm", ("Gemma3ForConditionalGeneration",), gemma3_vlm, gemma3_vlm_inputs, generate=True,
           notes={"sdpa: an explicit mask": "image tokens attend both ways within their image"}),
    Family("mllama", ("MllamaForConditionalGeneration",), mllama, mllama_inputs, generate=True,
           notes={"sdpa: an explicit mask": "vision tiles and cross-attention carry their own masks"}),
]
