"""`vtattn.patch.qwen2_vl`: vision-side pruning of Qwen2-VL / Qwen2.5-VL image tokens by the
attention they receive in the ViT's last full-attention block. The kept tokens against that rule
on eager ViT attentions, the logits against the unpatched LLM run by hand on the kept tokens
(their M-RoPE positions kept), generate with padding, KV compression on top, bad arguments."""
import sys

import pytest
import torch

import vtattn
from vtattn import kv
from _vlm import (QWEN_END, QWEN_IMAGE, QWEN_START, QWEN_VIDEO, qwen2_5_vl, qwen2_vl, qwen2_vl_alone, qwen2_vl_inputs,
                  topk)

transformers = pytest.importorskip("transformers")

GRIDS = [(4, 4), (4, 8)]  # 4 and 8 image tokens
BUILDERS = {"qwen2-vl": qwen2_vl, "qwen2.5-vl": qwen2_5_vl}
GENERATE = dict(max_new_tokens=5, min_new_tokens=5, do_sample=False)


def _eager_vit_weights(model, x):
    """Eager attention probabilities of the ViT block vtattn scores, one [H, n, n] per call (per
    image; Qwen2.5-VL: patches in window order), via a recording attention function."""
    visual = model.model.visual
    full = getattr(visual.config, "fullatt_block_indexes", None)
    target = visual.blocks[max(full) if full else -1].attn
    eager = sys.modules[type(target).__module__].eager_attention_forward
    weights = []

    def recording(module, *args, **kwargs):
        out, w = eager(module, *args, **kwargs)
        if module is target:
            weights.append(w[0].double())
        return out, w

    transformers.AttentionInterface.register("vtattn_test_recording", recording)
    previous, visual.config._attn_implementation = visual.config._attn_implementation, "vtattn_test_recording"
    try:
        with torch.no_grad():
            model(**x)
    finally:
        visual.config._attn_implementation = previous
    return weights


def _reference_kept(model, x, keep):
    """The rule: the attention each patch receives (summed over rows, mean over heads), summed per
    2x2 merge group, in the merger's order; top max(1, round(keep * n)) per image and per video
    frame (the ViT attends within one image / one frame)."""
    weights = iter(_eager_vit_weights(model, x))  # one call per image, then per video frame
    ids, visual = x["input_ids"], model.model.visual
    kept = x["attention_mask"].bool() & ~((ids == QWEN_IMAGE) | (ids == QWEN_VIDEO))
    for grid_key, token in (("image_grid_thw", QWEN_IMAGE), ("video_grid_thw", QWEN_VIDEO)):
        if grid_key not in x:
            continue
        grid = x[grid_key]
        calls = [next(weights) for t, _, _ in grid.tolist() for _ in range(t)]
        units = torch.cat([w.sum(1).mean(0).view(-1, 4).sum(-1) for w in calls])
        if getattr(visual.config, "fullatt_block_indexes", None):  # undo the window order as the merger does
            from transformers.vision_utils import get_vision_window_index
            c = visual.config
            order, _ = get_vision_window_index(grid, spatial_merge_size=2, window_size=c.window_size,
                                               patch_size=c.patch_size)
            units = units[torch.argsort(order)]
        frames = [h * w // 4 for t, h, w in grid.tolist() for _ in range(t)]
        where = (ids == token).nonzero()  # [n, 2] (row, position), in the order the model fills them
        for part, seg in zip(units.split(frames), where.split(frames)):
            pick = seg[topk(part, max(1, round(keep * len(part))))]
            kept[pick[:, 0], pick[:, 1]] = True
    return kept


def _manual_logits(model, x, kept):
    """Last-token logits [C] of one unpadded sample through the unpatched model, its tokens not in
    kept [N] removed at the LLM's input, the kept ones at their own M-RoPE positions."""
    base = model.model
    with torch.no_grad():
        features = torch.cat(list(base.get_image_features(x["pixel_values"], x["image_grid_thw"]).pooler_output))
        ids = x["input_ids"]
        embeds = base.get_input_embeddings()(ids).masked_scatter((ids == QWEN_IMAGE)[..., None], features)
        positions, _ = base.get_rope_index(ids, x["mm_token_type_ids"], image_grid_thw=x["image_grid_thw"])
        out = base.language_model(inputs_embeds=embeds[:, kept], position_ids=positions[:, :, kept])
        return model.lm_head(out.last_hidden_state)[0, -1]


@pytest.mark.parametrize("family", BUILDERS)
def test_kept_tokens_follow_the_vit_rule_and_logits_the_manual_pipeline(family):
    model = BUILDERS[family]()
    x = qwen2_vl_inputs(GRIDS)
    expected = _reference_kept(model, x, 0.5)
    vtattn.patch.qwen2_vl(model, keep=0.5)
    with torch.no_grad():
        out = model(**x)
    kept = model._vtattn_patch.kept
    assert torch.equal(kept, expected)
    for b in range(2):
        alone = qwen2_vl_alone(x, GRIDS, b)
        with torch.no_grad():
            got = model(**alone).logits[0, -1]
        real = x["attention_mask"][b].bool()
        torch.testing.assert_close(got, _manual_logits(model, alone, kept[b, real]), atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(out.logits[b, -1], got, atol=1e-4, rtol=1e-4)  # batched = alone


def _video_inputs():
    """One prompt with an image (4 tokens) and a 2-frame video (2 x 4 tokens), then text."""
    g = torch.Generator().manual_seed(4)
    text = torch.randint(1, 100, (5,), generator=g).tolist()
    ids = torch.tensor([text[:2] + [QWEN_START] + [QWEN_IMAGE] * 4 + [QWEN_END] + [QWEN_START] + [QWEN_VIDEO] * 8
                        + [QWEN_END] + text[2:]])
    patch = 3 * 2 * 14 * 14
    return dict(input_ids=ids, attention_mask=torch.ones_like(ids),
                pixel_values=torch.randn(16, patch, generator=g), image_grid_thw=torch.tensor([[1, 4, 4]]),
                pixel_values_videos=torch.randn(32, patch, generator=g), video_grid_thw=torch.tensor([[2, 4, 4]]),
                mm_token_type_ids=(ids == QWEN_IMAGE).int() + 2 * (ids == QWEN_VIDEO).int())


@pytest.mark.parametrize("family", BUILDERS)
def test_videos_keep_their_top_tokens_per_frame(family):
    model = BUILDERS[family]()
    x = _video_inputs()
    expected = _reference_kept(model, x, 0.4)
    with torch.no_grad():
        unpatched = model.generate(**x, **GENERATE, num_beams=2)
        vtattn.patch.qwen2_vl(model, keep=0.4)
        model(**x)
        assert torch.equal(model._vtattn_patch.kept, expected)
        # round(0.4 * 4) = 2 of the image and of each frame (the whole video's 8 would keep 3)
        assert int(expected.sum()) == x["input_ids"].shape[1] - 2 - 2 - 2
        vtattn.patch.qwen2_vl(model, keep_tokens=4)  # every token of the image and of each frame
        assert torch.equal(model.generate(**x, **GENERATE, num_beams=2), unpatched)


@pytest.mark.parametrize("num_beams", [1, 2])
@pytest.mark.parametrize("family", BUILDERS)
def test_keep_every_token_is_the_unpatched_model(family, num_beams):
    model = BUILDERS[family]()
    x = qwen2_vl_inputs(GRIDS)
    with torch.no_grad():
        expected = model.generate(**x, **GENERATE, num_beams=num_beams)
        vtattn.patch.qwen2_vl(model, keep_tokens=8)  # every image keeps all of its (<= 8) tokens
        assert torch.equal(model.generate(**x, **GENERATE, num_beams=num_beams), expected)
        real = x["attention_mask"].bool().repeat_interleave(num_beams, 0)  # generate expands for beams
        assert bool(model._vtattn_patch.kept[real].all())
    vtattn.patch.unpatch(model)
    assert model.model.visual.config._attn_implementation == "sdpa" and "forward" not in model.__dict__


def test_generate_expansion_repeats_whole_images_per_sample():
    """Beams / num_return_sequences: each sample's images (patch rows, grid rows) repeat after the
    sample's own, also for a sample with two images (the patch keeps pixel_values for the prefill)."""
    model = vtattn.patch.qwen2_vl(qwen2_vl(), keep=0.5)
    one, two = qwen2_vl_inputs([(4, 4)], seed=1), qwen2_vl_inputs([(4, 8)], seed=2)
    ids = torch.cat([one["input_ids"], two["input_ids"]], 1)  # row 0: two images
    pad = torch.zeros(1, ids.shape[1] - one["input_ids"].shape[1], dtype=ids.dtype)
    ids = torch.cat([ids, torch.cat([pad, one["input_ids"]], 1)])  # row 1: one, left-padded
    pixels = torch.cat([one["pixel_values"], two["pixel_values"], one["pixel_values"] + 1])
    grid = torch.tensor([[1, 4, 4], [1, 4, 8], [1, 4, 4]])
    _, out = model._expand_inputs_for_generation(expand_size=2, input_ids=ids, pixel_values=pixels,
                                                 image_grid_thw=grid, attention_mask=(ids > 0).long())
    row0 = pixels[:48]
    assert torch.equal(out["pixel_values"], torch.cat([row0, row0, pixels[48:], pixels[48:]]))
    assert torch.equal(out["image_grid_thw"], grid[[0, 1, 0, 1, 2, 2]])
    assert out["attention_mask"].shape[0] == 4


@pytest.mark.parametrize("policy", [None, kv.DecodeH2O(kv.LookM(budget=0.5, recent=0.1), every=2, recent=2)],
                         ids=["keep", "keep+kv"])
def test_generate_batch_equals_each_sample_alone(policy):
    model = vtattn.patch.qwen2_vl(qwen2_vl(), keep=0.5, kv=policy)
    x = qwen2_vl_inputs(GRIDS)
    with torch.no_grad():
        both = model.generate(**x, **GENERATE, return_dict_in_generate=True)
        kept = model._vtattn_patch.kept  # the batch's (the runs alone replace it)
        for b in range(2):
            alone = model.generate(**qwen2_vl_alone(x, GRIDS, b), **GENERATE)
            assert torch.equal(alone[0, -5:], both.sequences[b, -5:]), b
    if policy is not None:  # every layer holds a subset of the kept tokens: compressed
        for layer in range(2):
            pos = both.past_key_values.kept_positions(layer)
            for b in range(2):
                prompt = {p for p in pos[b][pos[b] >= 0].tolist() if p < kept.shape[1]}
                assert prompt < set(kept[b].nonzero()[:, 0].tolist())


def test_text_only_prompt_and_bad_arguments():
    model = vtattn.patch.qwen2_vl(qwen2_vl(), keep=0.5)
    ids = torch.randint(1, 100, (1, 9), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected = model.generate(input_ids=ids, **GENERATE)  # no image: nothing to prune
        vtattn.patch.unpatch(model)
        assert torch.equal(model.generate(input_ids=ids, **GENERATE), expected)
    with pytest.raises(TypeError, match="Qwen2-VL"):
        vtattn.patch.qwen2_vl(transformers.LlamaForCausalLM(transformers.LlamaConfig(
            hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4)), keep=0.5)
    with pytest.raises(ValueError, match="keep"):
        vtattn.patch.qwen2_vl(model, keep=1.5)
    with pytest.raises(ValueError, match="nothing to do"):
        vtattn.patch.qwen2_vl(model)
    with pytest.raises(NotImplementedError, match="two pruning stages"):
        vtattn.patch.qwen2_vl(model, keep=0.5, fastv=vtattn.patch.FastV(layer=1))
    vtattn.patch.qwen2_vl(model, keep=0.5)
    x = qwen2_vl_inputs(GRIDS)
    with pytest.raises(NotImplementedError, match="pass pixel_values"), torch.no_grad():
        model(input_ids=x["input_ids"], attention_mask=x["attention_mask"])  # image tokens, no images


@pytest.mark.gpu
def test_qwen2vl_keep_on_cuda_fp16():
    """On CUDA (LLM head dim 64, ViT head dim 80): keeping every token matches the unpatched
    logits; keep=0.25 with KV compression generates, each layer holding under the kept tokens."""
    model = qwen2_vl(hidden=256, vision_width=320).to("cuda", torch.float16)
    x = {k: v.cuda() for k, v in qwen2_vl_inputs([(8, 8), (8, 12)]).items()}
    x["pixel_values"] = x["pixel_values"].half()
    with torch.no_grad():
        before = model(**x).logits[:, -1].float()
        vtattn.patch.qwen2_vl(model, keep_tokens=24)
        torch.testing.assert_close(model(**x).logits[:, -1].float(), before, atol=5e-2, rtol=5e-2)
        vtattn.patch.qwen2_vl(model, keep=0.25, kv=kv.LookM(budget=0.5, recent=0.1))
        out = model.generate(**x, max_new_tokens=20, do_sample=False, return_dict_in_generate=True)
    assert out.sequences.shape == (2, x["input_ids"].shape[1] + 20)
    kept = int(model._vtattn_patch.kept.sum())
    held = int((out.past_key_values.kept_positions(0) >= 0).sum())
    assert held < 2 * (kept + 2 * 19)  # 2 kv heads, 19 decoded tokens per sample: LOOK-M evicted more
