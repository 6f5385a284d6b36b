"""Tiny random-weight vision-language models built in code, eager-attention references of the
selection rules, and the manual pruning pipeline the patched models are compared with."""
import contextlib

import pytest
import torch

transformers = pytest.importorskip("transformers")

IMAGE = 100  # image token id
PAD = 0
VOCAB = 128


def text_config():
    return transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                    num_attention_heads=4, num_key_value_heads=2, vocab_size=VOCAB,
                                    max_position_embeddings=1024, pad_token_id=PAD)


def clip_config(image_size=84, layers=4, hidden=32, heads=4):
    return transformers.CLIPVisionConfig(hidden_size=hidden, intermediate_size=2 * hidden,
                                         num_hidden_layers=layers, num_attention_heads=heads,
                                         image_size=image_size, patch_size=14)


def siglip_config(image_size=84):
    return transformers.SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                                           num_attention_heads=4, image_size=image_size, patch_size=14)


def _seeded(cls, config, seed):
    torch.manual_seed(seed)
    return cls(config).eval()


def llava(vision=None, strategy="default", layer=-2, seed=0, layers=None, hidden=None):
    """layers / hidden: the LLM's depth and width (intermediate 2 x hidden) instead of text_config's."""
    text = text_config()
    if layers is not None:
        text.num_hidden_layers = layers
    if hidden is not None:
        text.hidden_size, text.intermediate_size = hidden, 2 * hidden
    config = transformers.LlavaConfig(vision_config=vision or clip_config(), text_config=text,
                                      image_token_index=IMAGE, vision_feature_layer=layer,
                                      vision_feature_select_strategy=strategy)
    return _seeded(transformers.LlavaForConditionalGeneration, config, seed)


def llava_inputs():
    """Left-padded inputs of a llava(): rows of 1 and 2 images, and each row alone (unpadded, its images)."""
    ids, mask = prompts([[36], [36, 36]])
    pixels = torch.randn(3, 3, 84, 84, generator=torch.Generator().manual_seed(1))
    batch = dict(input_ids=ids, attention_mask=mask, pixel_values=pixels)
    alone = [dict(input_ids=ids[b:b + 1, mask[b].bool()], pixel_values=pixels[images])
             for b, images in enumerate([slice(0, 1), slice(1, 3)])]
    return batch, alone


PINPOINTS = [[42, 84], [84, 42], [84, 84], [42, 126]]


def llava_next(vision=None, seed=0):
    config = transformers.LlavaNextConfig(vision_config=vision or clip_config(image_size=42),
                                          text_config=text_config(),
                                          image_token_index=IMAGE, image_grid_pinpoints=PINPOINTS,
                                          vision_feature_layer=-2, vision_feature_select_strategy="default")
    return _seeded(transformers.LlavaNextForConditionalGeneration, config, seed)


def llava_next_inputs(model):
    """Left-padded inputs of `model` (a llava_next()): two images of sizes 50x90 and 84x30, one per row."""
    from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches
    sizes = torch.tensor([[50, 90], [84, 30]])
    views = [image_size_to_num_patches(s, PINPOINTS, 42) for s in sizes]
    pixels = torch.randn(2, max(views), 3, 42, 42, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        spans = [len(p) for p in model.model.get_image_features(pixels, sizes).pooler_output]
    ids, mask = prompts([[spans[0]], [spans[1]]])
    return dict(input_ids=ids, attention_mask=mask, pixel_values=pixels, image_sizes=sizes)


def llava_next_alone(x, b):
    """Sample b of llava_next_inputs() = x, unpadded, with its own image."""
    real = x["attention_mask"][b].bool()
    return dict(input_ids=x["input_ids"][b:b + 1, real], pixel_values=x["pixel_values"][b:b + 1],
                image_sizes=x["image_sizes"][b:b + 1])


def prompts(spans, *, seed=0, lengths=None):
    """Left-padded input_ids [B, L] + attention mask: row b holds its images (spans[b] = their
    token counts, in order) between random text tokens, as a processor expands <image>."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for b, row_spans in enumerate(spans):
        ids = torch.randint(1, IMAGE, (3 + b,), generator=g).tolist()
        for n in row_spans:
            ids += [IMAGE] * n + torch.randint(1, IMAGE, (2,), generator=g).tolist()
        rows.append(ids)
    width = max(map(len, rows))
    input_ids = torch.tensor([[PAD] * (width - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    return input_ids, mask


@contextlib.contextmanager
def eager(tower):
    previous = tower.config._attn_implementation
    tower.config._attn_implementation = "eager"
    try:
        yield
    finally:
        tower.config._attn_implementation = previous


def eager_attentions(tower, pixel_values):
    """The unpatched tower's attentions [V, H, N, N] per layer and hidden states, eager."""
    with eager(tower), torch.no_grad():
        out = tower(pixel_values, output_attentions=True, output_hidden_states=True, return_dict=True)
    return out.attentions, out.hidden_states


def topk(scores, k):
    """Indices of the k largest, ties to the lower index, ascending."""
    return torch.sort(torch.sort(-scores, stable=True).indices[:k]).values


def reference_scores(method, attentions, feature, drop=1, layers=None):
    """The published rules, from eager attention probabilities: [V, Nf]."""
    L = len(attentions)
    if method == "cls":
        return attentions[feature][:, :, 0, drop:].mean(1)
    if method == "cls_ensemble":
        layers = range(2 * L // 3, feature + 1) if layers is None else layers
        return sum(attentions[l][:, :, 0, drop:].mean(1) for l in layers)
    if method == "hired":
        return attentions[feature][:, :, 0, drop:].sum(1)
    if method == "mean_received":
        return attentions[feature].mean(1).mean(1)[:, drop:]
    raise ValueError(method)


# ---- the manual pipeline: features -> kept -> projector -> LLM on the shortened sequence ---------

def shortened(model, input_ids, mask, spans, image_features, return_labels=False):
    """Embeddings [B, W, C], mask [B, W] and alignment padding [B] of the sequence with image i's
    span of spans[i] placeholders replaced by image_features[i] ([K_i, C]), rows left-padded to
    the longest; with return_labels also labels [B, W] (text tokens, -100 elsewhere)."""
    embed = model.get_input_embeddings()
    rows, masks, labels, i = [], [], [], 0
    for ids, m in zip(input_ids.tolist(), mask.tolist()):
        parts, row_mask, row_labels, j = [], [], [], 0
        while j < len(ids):
            if ids[j] == IMAGE:
                parts.append(image_features[i])
                row_mask += [1] * len(image_features[i])
                row_labels += [-100] * len(image_features[i])
                j, i = j + spans[i], i + 1
            else:
                parts.append(embed(torch.tensor([ids[j]])))
                row_mask.append(m[j])
                row_labels.append(ids[j] if m[j] else -100)
                j += 1
        rows.append(torch.cat(parts))
        masks.append(row_mask)
        labels.append(row_labels)
    width = max(len(r) for r in rows)
    embeds = torch.stack([torch.cat([r.new_zeros(width - len(r), r.shape[1]), r]) for r in rows])
    pad = torch.tensor([width - len(r) for r in rows])
    out = embeds, torch.tensor([[0] * (width - len(m)) + m for m in masks]), pad
    return out + (torch.tensor([[-100] * (width - len(x)) + x for x in labels]),) if return_labels else out


def positions(mask):
    """What generate uses: consecutive positions over the unmasked tokens."""
    return (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)


def manual_logits(model, input_ids, mask, spans, image_features, implicit=False):
    """Logits of the shortened sequence; positions as generate makes them or, implicit, the
    language model's own 0, 1, ... counted from each row's first token (padding included)."""
    embeds, short, pad = shortened(model, input_ids, mask, spans, image_features)
    pos = torch.arange(short.shape[1]) - pad[:, None] if implicit else positions(short)
    with torch.no_grad():
        logits = type(model).forward(model, inputs_embeds=embeds, attention_mask=short,
                                     position_ids=pos.clamp(min=0)).logits
    return logits, short


def lookm_reference(attn, image, valid, budget, recent, kv_heads=2):
    """LOOK-M's rule on eager attentions [B, Hq, L, L] of one layer: per sample, on its real
    tokens; kept original positions per [b][kv head]."""
    B, Hq, L, _ = attn.shape
    out = []
    for b in range(B):
        r = valid[b].nonzero()[:, 0]
        n = len(r)
        s = attn[b][:, r][:, :, r].sum(1).view(kv_heads, Hq // kv_heads, n).mean(1)
        window = torch.arange(n) >= n - int(recent * n)
        text = ~image[b, r]
        free = max(int(budget * n) - int((text & ~window).sum()), 0)
        heads = []
        for h in range(kv_heads):
            cand = [j for j in range(n) if not (window[j] or text[j])]
            top = sorted(cand, key=lambda j: (-float(s[h, j]), j))[:free]
            heads.append(sorted([int(r[j]) for j in range(n) if window[j] or text[j]] + [int(r[j]) for j in top]))
        out.append(heads)
    return out


# Qwen2-VL: token ids inside VOCAB + 32 (text tokens stay below IMAGE).
QWEN_IMAGE, QWEN_VIDEO, QWEN_START, QWEN_END = 151, 152, 153, 154


def qwen2_vl(seed=0, hidden=32, vision_width=32):
    """A tiny random Qwen2-VL (M-RoPE LLM with 4 heads of hidden / 4 dims, 2 kv heads; 2-layer
    ViT with 4 heads of vision_width / 4 dims, its 2x2 merger projecting to hidden)."""
    d = hidden // 4
    text = dict(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, vocab_size=VOCAB + 32, pad_token_id=PAD, bos_token_id=1, eos_token_id=None,
                rope_scaling={"type": "mrope", "mrope_section": [d // 4, d // 8, d // 8]})
    vision = dict(depth=2, embed_dim=vision_width, hidden_size=hidden, num_heads=4, mlp_ratio=2, patch_size=14,
                  spatial_merge_size=2, temporal_patch_size=2, in_channels=3)
    config = transformers.Qwen2VLConfig(text_config=text, vision_config=vision, image_token_id=QWEN_IMAGE,
                                        video_token_id=QWEN_VIDEO, vision_start_token_id=QWEN_START,
                                        vision_end_token_id=QWEN_END)
    return _seeded(transformers.Qwen2VLForConditionalGeneration, config, seed)


def qwen2_5_vl(seed=0):
    """A tiny random Qwen2.5-VL: the Qwen2-VL LLM; a ViT with window attention (56-pixel windows:
    2 x 2 merge groups) in block 0 and full attention in block 1."""
    text = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, vocab_size=VOCAB + 32, pad_token_id=PAD, bos_token_id=1, eos_token_id=None,
                rope_scaling={"type": "mrope", "mrope_section": [2, 1, 1]})
    vision = dict(depth=2, hidden_size=32, out_hidden_size=32, intermediate_size=64, num_heads=4, patch_size=14,
                  spatial_merge_size=2, temporal_patch_size=2, in_channels=3, window_size=56,
                  fullatt_block_indexes=[1])
    config = transformers.Qwen2_5_VLConfig(text_config=text, vision_config=vision, image_token_id=QWEN_IMAGE,
                                           video_token_id=QWEN_VIDEO, vision_start_token_id=QWEN_START,
                                           vision_end_token_id=QWEN_END)
    return _seeded(transformers.Qwen2_5_VLForConditionalGeneration, config, seed)


def qwen2_vl_inputs(grids, seed=0):
    """Left-padded Qwen2-VL inputs: row b holds one image of patch grid grids[b] = (h, w) (even;
    h * w / 4 tokens after the merger) between random text tokens."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for b, (h, w) in enumerate(grids):
        text = torch.randint(1, IMAGE, (3 + 2 * b + 3,), generator=g).tolist()
        rows.append(text[:3 + 2 * b] + [QWEN_START] + [QWEN_IMAGE] * (h * w // 4) + [QWEN_END] + text[3 + 2 * b:])
    width = max(map(len, rows))
    input_ids = torch.tensor([[PAD] * (width - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    pixels = torch.randn(sum(h * w for h, w in grids), 3 * 2 * 14 * 14, generator=g)
    return dict(input_ids=input_ids, attention_mask=mask, pixel_values=pixels,
                image_grid_thw=torch.tensor([[1, h, w] for h, w in grids]),
                mm_token_type_ids=(input_ids == QWEN_IMAGE).int())  # as the processor gives: M-RoPE


def qwen2_vl_alone(x, grids, b):
    """Sample b of qwen2_vl_inputs(grids) = x, unpadded, with its own image."""
    real = x["attention_mask"][b].bool()
    first = sum(h * w for h, w in grids[:b])
    h, w = grids[b]
    return dict(input_ids=x["input_ids"][b:b + 1, real], pixel_values=x["pixel_values"][first:first + h * w],
                image_grid_thw=x["image_grid_thw"][b:b + 1], mm_token_type_ids=x["mm_token_type_ids"][b:b + 1, real])


def capture(model, inputs):
    """Layer 0's input of `model`'s forward: hidden states [1, N, D] and RoPE tables (cos, sin)."""
    lm, got = model.model.language_model, {}

    def hook(module, args, kwargs):
        got["h"] = args[0] if args else kwargs["hidden_states"]
        got["rope"] = kwargs["position_embeddings"]

    handle = lm.layers[0].register_forward_pre_hook(hook, with_kwargs=True)
    try:
        with torch.no_grad():
            model(**inputs)
    finally:
        handle.remove()
    return got["h"], got["rope"]
