"""`vtattn.patch.kv`: KV-cache compression on models beyond LLaVA, a tiny random Qwen2-VL (M-RoPE,
image tokens by id) and a text-only Llama, against the unpatched model and LOOK-M's rule on eager
attentions; bad arguments and unpatching."""
import pytest
import torch

import vtattn
from vtattn import kv
from _vlm import QWEN_IMAGE, lookm_reference, qwen2_vl, qwen2_vl_inputs, text_config

transformers = pytest.importorskip("transformers")
from vtattn.kv.cache import CompressedCache  # noqa: E402  (needs transformers)

GRIDS = [(4, 4), (4, 8)]  # 4 and 8 image tokens: a padded batch
GENERATE = dict(max_new_tokens=6, min_new_tokens=6, do_sample=False, return_dict_in_generate=True)


def _alone(x, b):
    """Sample b of qwen2_vl_inputs(GRIDS) unpadded, with its own image."""
    real = x["attention_mask"][b].bool()
    first = sum(h * w for h, w in GRIDS[:b])
    h, w = GRIDS[b]
    return dict(input_ids=x["input_ids"][b:b + 1, real], pixel_values=x["pixel_values"][first:first + h * w],
                image_grid_thw=x["image_grid_thw"][b:b + 1], mm_token_type_ids=x["mm_token_type_ids"][b:b + 1, real])


@pytest.mark.parametrize("policy", [kv.LookM(budget=1.0, recent=0.1, merge="pivotal"), kv.H2O(1.0, 0)])
def test_qwen2vl_budget_one_gives_the_unpatched_tokens_and_unpatch_restores(policy):
    model = qwen2_vl()
    x = qwen2_vl_inputs(GRIDS)
    with torch.no_grad():
        expected = model.generate(**x, **GENERATE).sequences
        vtattn.patch.kv(model, policy)
        got = model.generate(**x, **GENERATE)
    assert torch.equal(got.sequences, expected)
    cache = got.past_key_values
    assert isinstance(cache, CompressedCache) and torch.equal(cache.modality, x["input_ids"] == QWEN_IMAGE)
    assert model.model.language_model.config._attn_implementation == "vtattn"
    vtattn.patch.kv(model, policy)  # a second patch replaces the first
    vtattn.patch.unpatch(model)
    assert model.model.language_model.config._attn_implementation == "sdpa" and "forward" not in model.__dict__


def test_qwen2vl_lookm_kept_sets_match_eager_rule():
    model = qwen2_vl()
    x = qwen2_vl_inputs(GRIDS)
    with torch.no_grad():
        lm = model.model.language_model
        lm.config._attn_implementation = "eager"
        eager = model(**x, output_attentions=True)
        lm.config._attn_implementation = "sdpa"
        vtattn.patch.kv(model, kv.LookM(budget=0.4, recent=0.1))
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
    model = vtattn.patch.kv(qwen2_vl(), policy)
    x = qwen2_vl_inputs(GRIDS)
    with torch.no_grad():
        both = model.generate(**x, **GENERATE)
        for b in range(2):
            alone = model.generate(**_alone(x, b), **GENERATE)
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
        vtattn.patch.kv(model, kv.StreamingLLM(sinks=4, window=30))  # keeps everything: the same tokens
        assert torch.equal(model.generate(input_ids=ids, attention_mask=mask, **options), expected)
        vtattn.patch.kv(model, kv.SnapKV(0.5, window=3))
        both = model.generate(input_ids=ids, attention_mask=mask, **options)
        for b in range(2):
            alone = model.generate(input_ids=ids[b:b + 1, mask[b].bool()], **options)
            assert torch.equal(alone[0, -5:], both[b, -5:]), b
        vtattn.patch.kv(model, kv.LookM(0.5, 0.1))  # no image token id in a text model's config
        with pytest.raises(ValueError, match="LookM needs modality"):
            model.generate(input_ids=ids, attention_mask=mask, **options)


def test_patch_kv_bad_arguments():
    with pytest.raises(TypeError, match="get_decoder"):
        vtattn.patch.kv(torch.nn.Linear(2, 2), kv.H2O(0.5, 0))
    model = qwen2_vl()
    with pytest.raises(TypeError, match="policy"):
        vtattn.patch.kv(model, "snapkv")
    with pytest.raises(TypeError, match="image_token_id"):
        vtattn.patch.kv(model, kv.H2O(0.5, 0), image_token_id="<image>")
    assert "forward" not in model.__dict__  # nothing installed by a refused patch
    windowed = transformers.LlamaForCausalLM(text_config())
    windowed.config.sliding_window = 16
    with pytest.raises(NotImplementedError, match="sliding_window=16"):
        vtattn.patch.kv(windowed, kv.H2O(0.5, 0))
    sliding = transformers.Qwen2Config(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                       num_key_value_heads=2, vocab_size=128, use_sliding_window=True,
                                       max_window_layers=1)
    with pytest.raises(NotImplementedError, match="sliding_attention"):
        vtattn.patch.kv(transformers.Qwen2ForCausalLM(sliding), kv.H2O(0.5, 0))


def test_patch_kv_image_token_id_overrides_the_config():
    model = qwen2_vl()
    x = qwen2_vl_inputs(GRIDS[:1])
    vtattn.patch.kv(model, kv.LookM(budget=0.5, recent=0.1), image_token_id=[7, QWEN_IMAGE])
    with torch.no_grad():
        cache = model(**x).past_key_values
    assert torch.equal(cache.modality, (x["input_ids"] == 7) | (x["input_ids"] == QWEN_IMAGE))
