"""`vtattn.patch.llm`: FastV and KV-cache compression on models beyond LLaVA, a tiny random Qwen2-VL
(M-RoPE, image tokens by id) and a text-only Llama, against the unpatched model and FastV's and
LOOK-M's rules on eager attentions; bad arguments and unpatching."""
import pytest
import torch

import vtattn
from vtattn import kv
from vtattn.patch.core import routed
from _vlm import (QWEN_IMAGE, lookm_reference, qwen2_5_vl, qwen2_vl, qwen2_vl_alone, qwen2_vl_inputs, text_config,
                  topk)

transformers = pytest.importorskip("transformers")
from vtattn.kv.cache import CompressedCache  # noqa: E402  (needs transformers)

GRIDS = [(4, 4), (4, 8)]  # 4 and 8 image tokens: a padded batch
GENERATE = dict(max_new_tokens=6, min_new_tokens=6, do_sample=False, return_dict_in_generate=True)


@pytest.mark.parametrize("num_beams", [1, 2])
@pytest.mark.parametrize("policy", [kv.LookM(budget=1.0, recent=0.1, merge="pivotal"), kv.H2O(1.0, 0)])
def test_qwen2vl_budget_one_gives_the_unpatched_tokens_and_unpatch_restores(policy, num_beams):
    model = qwen2_vl()
    x = qwen2_vl_inputs(GRIDS)
    with torch.no_grad():
        expected = model.generate(**x, **GENERATE, num_beams=num_beams).sequences
        vtattn.patch.llm(model, kv=policy)
        got = model.generate(**x, **GENERATE, num_beams=num_beams)
    assert torch.equal(got.sequences, expected)
    cache = got.past_key_values
    images = (x["input_ids"] == QWEN_IMAGE).repeat_interleave(num_beams, 0)  # generate expands for beams
    assert isinstance(cache, CompressedCache) and torch.equal(cache.modality, images)
    layers = model.model.language_model.layers  # their attention routed to vtattn's, the model's config untouched
    assert all(routed(layer.self_attn) for layer in layers)
    assert model.model.language_model.config._attn_implementation == "sdpa"
    vtattn.patch.llm(model, kv=policy)  # a second patch replaces the first
    vtattn.patch.unpatch(model)
    assert not any(routed(layer.self_attn) for layer in layers) and "forward" not in model.__dict__
    assert all(layer.self_attn.config is model.config.text_config for layer in layers)


def test_qwen2vl_lookm_kept_sets_match_eager_rule():
    model = qwen2_vl()
    x = qwen2_vl_inputs(GRIDS)
    with torch.no_grad():
        lm = model.model.language_model
        lm.config._attn_implementation = "eager"
        eager = model(**x, output_attentions=True)
        lm.config._attn_implementation = "sdpa"
        vtattn.patch.llm(model, kv=kv.LookM(budget=0.4, recent=0.1))
        out = model(**x)
    cache = out.past_key_values
    for layer, attn in enumerate(eager.attentions):
        ref = lookm_reference(attn.double(), x["input_ids"] == QWEN_IMAGE, x["attention_mask"].bool(), 0.4, 0.1)
        got = cache.kept_positions(layer)
        for b in range(2):
            for h in range(2):
                p = got[b, h][got[b, h] >= 0].tolist()
                assert len(p) == len(ref[b][h]) and len(set(p) ^ set(ref[b][h])) <= 2, (layer, b, h)


@pytest.mark.parametrize("policy", [kv.LookM(budget=0.3, recent=0.1, merge="avg"),
                                    kv.DecodeH2O(kv.SnapKV(0.5, window=2), every=2, recent=2)],
                         ids=["lookm", "decode-h2o"])
def test_qwen2vl_generate_batch_equals_each_sample_alone(policy):
    model = vtattn.patch.llm(qwen2_vl(), kv=policy)
    x = qwen2_vl_inputs(GRIDS)
    with torch.no_grad():
        both = model.generate(**x, **GENERATE)
        for b in range(2):
            alone = model.generate(**qwen2_vl_alone(x, GRIDS, b), **GENERATE)
            assert torch.equal(alone.sequences[0, -6:], both.sequences[b, -6:]), b
    L = x["input_ids"].shape[1]
    assert both.past_key_values.get_seq_length() == L + 5  # positions continue from the uncompressed length
    real = x["attention_mask"].sum(1)[:, None]
    for layer in range(2):  # every head holds fewer than its sample's tokens: compressed
        assert ((both.past_key_values.kept_positions(layer) >= 0).sum(-1) < real + 5).all()


def test_text_only_llama_with_snapkv_and_without_modality():
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(text_config()).eval()
    ids = torch.randint(1, 100, (2, 23), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[1, :7] = 0  # left padding
    options = dict(max_new_tokens=5, min_new_tokens=5, do_sample=False)
    with torch.no_grad():
        expected = model.generate(input_ids=ids, attention_mask=mask, **options)
        vtattn.patch.llm(model, kv=kv.StreamingLLM(sinks=4, window=30))  # keeps everything: the same tokens
        assert torch.equal(model.generate(input_ids=ids, attention_mask=mask, **options), expected)
        vtattn.patch.llm(model, kv=kv.SnapKV(0.5, window=3))
        both = model.generate(input_ids=ids, attention_mask=mask, **options)
        for b in range(2):
            alone = model.generate(input_ids=ids[b:b + 1, mask[b].bool()], **options)
            assert torch.equal(alone[0, -5:], both[b, -5:]), b
        vtattn.patch.llm(model, kv=kv.LookM(0.5, 0.1))  # no image token id in a text model's config
        with pytest.raises(ValueError, match="LookM needs modality"):
            model.generate(input_ids=ids, attention_mask=mask, **options)


def test_patch_llm_bad_arguments():
    with pytest.raises(ValueError, match="kv= .* and/or fastv="):
        vtattn.patch.llm(qwen2_vl())
    with pytest.raises(TypeError, match="fastv must be a vtattn.patch.FastV"):
        vtattn.patch.llm(qwen2_vl(), fastv=0.5)
    with pytest.raises(ValueError, match="image_token_id"):  # FastV on a text model
        vtattn.patch.llm(transformers.LlamaForCausalLM(text_config()), fastv=vtattn.patch.FastV(layer=1))
    with pytest.raises(TypeError, match="get_decoder"):
        vtattn.patch.llm(torch.nn.Linear(2, 2), kv=kv.H2O(0.5, 0))
    model = qwen2_vl()
    with pytest.raises(TypeError, match="policy"):
        vtattn.patch.llm(model, kv="snapkv")
    with pytest.raises(TypeError, match="image_token_id"):
        vtattn.patch.llm(model, kv=kv.H2O(0.5, 0), image_token_id="<image>")
    assert "forward" not in model.__dict__  # nothing installed by a refused patch
    windowed = transformers.LlamaForCausalLM(text_config())
    windowed.config.sliding_window = 16
    with pytest.raises(NotImplementedError, match="sliding_window=16"):
        vtattn.patch.llm(windowed, kv=kv.H2O(0.5, 0))
    sliding = transformers.Qwen2Config(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                       num_key_value_heads=2, vocab_size=128, use_sliding_window=True,
                                       max_window_layers=1)
    with pytest.raises(NotImplementedError, match="sliding_attention"):
        vtattn.patch.llm(transformers.Qwen2ForCausalLM(sliding), kv=kv.H2O(0.5, 0))


def test_patch_llm_image_token_id_overrides_the_config():
    model = qwen2_vl()
    x = qwen2_vl_inputs(GRIDS[:1])
    vtattn.patch.llm(model, kv=kv.LookM(budget=0.5, recent=0.1), image_token_id=[7, QWEN_IMAGE])
    with torch.no_grad():
        cache = model(**x).past_key_values
    assert torch.equal(cache.modality, (x["input_ids"] == 7) | (x["input_ids"] == QWEN_IMAGE))


# ---- FastV (layer K = 1 of the tiny Qwen2-VL's 2) ------------------------------------------------

def _fastv_reference(model, x, keep):
    """FastV's rule on the unpatched model's eager attentions: layer K-1's last prompt row, head
    mean, the top round(keep * n) of each sample's n image tokens. Returns kept tokens [B, N]."""
    lm = model.model.language_model
    lm.config._attn_implementation = "eager"
    try:
        with torch.no_grad():
            attentions = model(**x, output_attentions=True).attentions
    finally:
        lm.config._attn_implementation = "sdpa"
    scores = attentions[0][:, :, -1].mean(1)
    ids = x["input_ids"]
    kept = x["attention_mask"].bool() & (ids != QWEN_IMAGE)
    for b in range(len(ids)):
        image = (ids[b] == QWEN_IMAGE).nonzero()[:, 0]
        kept[b, image[topk(scores[b, image], max(1, round(keep * len(image))))]] = True
    return kept


def test_qwen2vl_fastv_follows_the_eager_rule_and_keep_all_is_the_unpatched_model():
    model = qwen2_vl()
    x = qwen2_vl_inputs(GRIDS)
    expected = _fastv_reference(model, x, 0.5)
    with torch.no_grad():
        unpatched = model.generate(**x, **GENERATE).sequences
        vtattn.patch.llm(model, fastv=vtattn.patch.FastV(layer=1, keep=0.5))
        model(**x)
        assert torch.equal(model._vtattn_patch.kept, expected)
        vtattn.patch.llm(model, fastv=vtattn.patch.FastV(layer=1, keep=1.0))
        assert torch.equal(model.generate(**x, **GENERATE).sequences, unpatched)
    vtattn.patch.unpatch(model)
    layers = model.model.language_model.layers
    assert layers[1]._forward_pre_hooks == {}  # FastV's hook and its attention routing are gone
    assert all(layer.self_attn.config is model.config.text_config for layer in layers)


@pytest.mark.parametrize("policy", [None, kv.LookM(budget=0.5, recent=0.1)], ids=["fastv", "fastv+kv"])
def test_qwen2vl_fastv_generate_batch_equals_each_sample_alone(policy):
    model = vtattn.patch.llm(qwen2_vl(), fastv=vtattn.patch.FastV(layer=1, keep=0.5), kv=policy)
    x = qwen2_vl_inputs(GRIDS)
    with torch.no_grad():
        both = model.generate(**x, **GENERATE)
        kept = model._vtattn_patch.kept
        for b in range(2):
            alone = model.generate(**qwen2_vl_alone(x, GRIDS, b), **GENERATE)
            assert torch.equal(alone.sequences[0, -6:], both.sequences[b, -6:]), b
    assert (kept & (x["input_ids"] == QWEN_IMAGE)).sum(1).tolist() == [2, 4]  # half of 4 and of 8
    if policy is not None:  # the pruned layer compressed FastV's tokens: a subset of them, per head
        pos = both.past_key_values.kept_positions(1)
        for b in range(2):
            held = set(pos[b][pos[b] >= 0].tolist()) - set(range(x["input_ids"].shape[1], 10**6))
            assert held < set(kept[b].nonzero()[:, 0].tolist())



def test_qwen25vl_fastv_and_kv():
    """Qwen2.5-VL (window-attention ViT, the same M-RoPE LLM): keep / budget 1.0 generate the
    unpatched tokens; FastV with KV compression generates, batched, what each sample does alone."""
    model = qwen2_5_vl()
    x = qwen2_vl_inputs(GRIDS)
    with torch.no_grad():
        expected = model.generate(**x, **GENERATE).sequences
        vtattn.patch.llm(model, fastv=vtattn.patch.FastV(layer=1, keep=1.0), kv=kv.LookM(budget=1.0, recent=0.1))
        assert torch.equal(model.generate(**x, **GENERATE).sequences, expected)
        vtattn.patch.llm(model, fastv=vtattn.patch.FastV(layer=1, keep=0.5), kv=kv.LookM(budget=0.4, recent=0.1))
        both = model.generate(**x, **GENERATE).sequences
        for b in range(2):
            alone = model.generate(**qwen2_vl_alone(x, GRIDS, b), **GENERATE).sequences
            assert torch.equal(alone[0, -6:], both[b, -6:]), b

@pytest.mark.gpu
def test_qwen2vl_on_cuda_fp16():
    """On CUDA (LLM head dim 64, GQA; ViT head dim 80): the ViT on attn_implementation="vtattn" and
    KV budget 1.0 keep the unpatched logits; FastV with decode-time eviction generates past the
    cache's headroom, the pruned layer holding less."""
    model = qwen2_vl(hidden=256, vision_width=320).to("cuda", torch.float16)  # ViT head dim 80
    x = {k: v.cuda() for k, v in qwen2_vl_inputs([(8, 8), (8, 12)]).items()}  # 16 and 24 image tokens
    x["pixel_values"] = x["pixel_values"].half()
    with torch.no_grad():
        before = model(**x).logits[:, -1].float()
        vtattn.patch.register_hf_attention()
        model.config.vision_config._attn_implementation = "vtattn"  # the ViT on vtattn's kernels
        torch.testing.assert_close(model(**x).logits[:, -1].float(), before, atol=5e-2, rtol=5e-2)
        model.config.vision_config._attn_implementation = "sdpa"
        vtattn.patch.llm(model, kv=kv.LookM(budget=1.0, recent=0.1))
        torch.testing.assert_close(model(**x).logits[:, -1].float(), before, atol=5e-2, rtol=5e-2)
        vtattn.patch.llm(model, fastv=vtattn.patch.FastV(layer=1, keep=0.5),
                         kv=kv.DecodeH2O(kv.LookM(budget=0.6, recent=0.1), every=4, recent=4))
        out = model.generate(**x, max_new_tokens=40, min_new_tokens=40, do_sample=False, return_dict_in_generate=True)
    assert out.sequences.shape == (2, x["input_ids"].shape[1] + 40)
    held = [int((out.past_key_values.kept_positions(i) >= 0).sum()) for i in range(2)]
    assert held[1] < held[0]
    for layer in out.past_key_values.layers:  # 39 decode tokens: back at the prefill's length + 3
        assert ((layer.pages.positions() >= 0).sum(-1).cpu() <= layer.base.clamp(min=4) + 3).all()


def test_qwen2vl_with_attn_implementation_vtattn_matches_sdpa():
    """attn_implementation="vtattn" on every sub-config: the ViT (one call per image, unmasked) and
    the unpadded causal LLM run vtattn.attention; the logits match SDPA's."""
    vtattn.patch.register_hf_attention()
    model = qwen2_vl()
    x = qwen2_vl_inputs(GRIDS[1:])
    configs = [m.config for m in model.modules() if hasattr(m, "config")]
    with torch.no_grad():
        expected = model(**x).logits
        for c in configs:
            c._attn_implementation = "vtattn"
        got = model(**x).logits
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
