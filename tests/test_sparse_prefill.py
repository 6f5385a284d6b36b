"""The sparse-prefill drop-in (`patch.llm / qwen2_vl / llava / auto(..., sparse_prefill=policy)`): prefill
attention of the policy's layers runs block-sparse (counted), decode stays dense or compressed, a policy
that keeps every block gives the unpatched model, each policy runs a tiny long-video Qwen2-VL end to end."""
import pytest
import torch

import vtattn
from vtattn import kv, sparse
from vtattn.patch import hf_attention
from vtattn.patch.core import output_cache, routed
from _vlm import IMAGE, QWEN_END, QWEN_START, QWEN_VIDEO, llava, prompts, qwen2_vl, text_config

transformers = pytest.importorskip("transformers")

BS = 16
GENERATE = dict(max_new_tokens=4, min_new_tokens=4, do_sample=False)


def llama(seed=0):
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(text_config()).eval()


def prompt(N=200, seed=0):
    return torch.randint(1, IMAGE, (1, N), generator=torch.Generator().manual_seed(seed))


def keep_all(heads=4, layers=2):
    """Each policy set to list every causal block."""
    return {"flexprefill": sparse.FlexPrefill(1.0, 0.5, block_size=BS, min_tokens=0),
            "moa": sparse.MoA(sparse.MoAConfig.uniform(layers, heads, 1e6, 0.0), block_size=BS, sink=BS,
                              min_span=BS, min_tokens=0),
            "hip": sparse.HiP(100, block_size=BS, min_tokens=0),
            "region_routing": sparse.RegionRouting(1000, region_shape=(2, 2), block_size=BS, min_tokens=0)}


def sparse_policies(heads=4, layers=2):
    return {"flexprefill": sparse.FlexPrefill(0.5, 0.1, block_size=BS, min_tokens=0),
            "moa": sparse.MoA(sparse.MoAConfig.uniform(layers, heads, 0.0, 0.2), block_size=BS, sink=BS, min_span=BS,
                              min_tokens=0),
            "hip": sparse.HiP(2, block_size=BS, min_tokens=0),
            "region_routing": sparse.RegionRouting(1, region_shape=(2, 2), block_size=BS, min_tokens=0)}


@pytest.mark.parametrize("name", list(keep_all()))
def test_keeping_every_block_is_the_unpatched_model(name):
    model, x = llama(), prompt()
    with torch.no_grad():
        want = model(x).logits
        tokens = model.generate(x, **GENERATE)
    vtattn.patch.llm(model, sparse_prefill=keep_all()[name])
    with torch.no_grad(), hf_attention.counting() as calls:
        got = model(x).logits
    assert calls["sparse prefill"] == 2  # both layers, block-sparse
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        assert torch.equal(model.generate(x, **GENERATE), tokens)
    vtattn.patch.unpatch(model)
    assert not routed(model.model.layers[0].self_attn)


def test_sparse_lists_change_the_prefill_and_decode_stays_dense():
    model, x = llama(), prompt()
    with torch.no_grad():
        want = model(x).logits
    vtattn.patch.llm(model, sparse_prefill=sparse.HiP(1, block_size=BS, min_tokens=0, layers=[1]))
    stage = model._vtattn_patch.stages[0]
    with torch.no_grad(), hf_attention.counting() as calls:
        out = model(x, use_cache=True)
    assert calls["sparse prefill"] == 1 and set(stage.density) == {1} and stage.density[1] < 0.5
    assert not torch.allclose(out.logits, want, atol=1e-3)
    # the layer's output is block_sparse_attention over HiP's lists of its own q / k
    with torch.no_grad(), hf_attention.counting() as calls:
        model(x[:, -1:], use_cache=True, **{model._vtattn_patch.cache_name: output_cache(out)})
    assert calls["sparse prefill"] == 0  # a decode step: dense
    short = sparse.HiP(1, block_size=BS, min_tokens=500)
    vtattn.patch.unpatch(model)
    vtattn.patch.auto(model, sparse_prefill=short)  # shorter than min_tokens: dense, the unpatched logits
    with torch.no_grad(), hf_attention.counting() as calls:
        torch.testing.assert_close(model(x).logits, want, atol=1e-5, rtol=1e-5)
    assert calls["sparse prefill"] == 0


def test_hook_output_is_block_sparse_attention_of_the_layer():
    """Layer 0's attention output is block_sparse_attention over the policy's lists of its own q / k."""
    model, x = llama(), prompt(150)
    policy = sparse.FlexPrefill(0.6, 0.2, block_size=BS, min_tokens=0, layers=[0])
    attn, seen = model.model.layers[0].self_attn, {}
    handle = attn.register_forward_hook(lambda module, args, out: seen.update(out=out[0]))
    vtattn.patch.llm(model, sparse_prefill=policy)
    stage = model._vtattn_patch.stages[0]
    inner = stage._attend

    def spy(module, q, k, v, *rest, **kw):
        if module is attn:
            seen.update(q=q, k=k, v=v)
        return inner(module, q, k, v, *rest, **kw)
    stage._attend = spy
    with torch.no_grad():
        model(x)
    handle.remove()
    num, idx = policy.blocks(seen["q"], seen["k"], layer=0, scale=attn.scaling)
    want = vtattn.reference.block_sparse_attention(seen["q"], seen["k"], seen["v"], num, idx, BS, True, attn.scaling)[0]
    with torch.no_grad():
        want = attn.o_proj(want.transpose(1, 2).reshape(1, 150, -1))
    torch.testing.assert_close(seen["out"], want, atol=1e-5, rtol=1e-5)
    assert stage.density[0] < 1


@pytest.mark.parametrize("budget", [1.0, 0.5])
def test_composes_with_kv_compression(budget):
    model, x = llama(), prompt()
    with torch.no_grad():
        tokens = model.generate(x, **GENERATE)
    vtattn.patch.llm(model, kv=kv.SnapKV(budget, window=8), sparse_prefill=keep_all()["flexprefill"])
    with torch.no_grad(), hf_attention.counting() as calls:
        got = model.generate(x, **GENERATE)
    assert calls["sparse prefill"] == 2 and calls["cache"] >= 2
    if budget == 1.0:
        assert torch.equal(got, tokens)
    vtattn.patch.unpatch(model)
    vtattn.patch.llm(model, kv=kv.SnapKV(budget, window=8), sparse_prefill=sparse_policies()["hip"])
    with torch.no_grad():
        assert model.generate(x, **GENERATE).shape == tokens.shape


def video_inputs(frames=8, side=8, seed=0):
    """A long-video prompt for the tiny Qwen2-VL: text, a video of `frames` temporal patches of side x side
    patches (side^2 / 4 tokens each after the merger), text."""
    g = torch.Generator().manual_seed(seed)
    per = side * side // 4
    text = torch.randint(1, IMAGE, (10,), generator=g).tolist()
    ids = torch.tensor([text[:5] + [QWEN_START] + [QWEN_VIDEO] * (frames * per) + [QWEN_END] + text[5:]])
    return dict(input_ids=ids, attention_mask=torch.ones_like(ids),
                pixel_values_videos=torch.randn(frames * side * side, 3 * 2 * 14 * 14, generator=g),
                video_grid_thw=torch.tensor([[frames, side, side]]),
                mm_token_type_ids=2 * (ids == QWEN_VIDEO).int())


@pytest.mark.parametrize("name", list(keep_all()))
def test_long_video_qwen2vl_end_to_end(name):
    model, x = qwen2_vl(), video_inputs()
    with torch.no_grad():
        tokens = model.generate(**x, **GENERATE)
    vtattn.patch.qwen2_vl(model, sparse_prefill=keep_all()[name])
    with torch.no_grad(), hf_attention.counting() as calls:
        assert torch.equal(model.generate(**x, **GENERATE), tokens)  # every block: the unpatched tokens
    assert calls["sparse prefill"] == 2
    vtattn.patch.unpatch(model)
    vtattn.patch.auto(model, sparse_prefill=sparse_policies()[name])
    stage = model._vtattn_patch.stages[0]
    with torch.no_grad(), hf_attention.counting() as calls:
        out = model.generate(**x, **GENERATE)
    assert out.shape == tokens.shape and calls["sparse prefill"] == 2
    assert all(0 < d < 1 for d in stage.density.values()), stage.density
    vtattn.patch.unpatch(model)


@pytest.mark.parametrize("name", ["flexprefill", "region_routing"])
def test_llava_images_through_patch_llava(name):
    """patch.llava(sparse_prefill=...): a LLaVA prompt of four 36-token (6 x 6) images; every block kept:
    the unpatched tokens; sparse: block-sparse prefill in both layers."""
    model = llava()
    ids, mask = prompts([[36] * 4])
    pixels = torch.randn(4, 3, 84, 84, generator=torch.Generator().manual_seed(0))
    x = dict(input_ids=ids, attention_mask=mask, pixel_values=pixels)
    with torch.no_grad():
        tokens = model.generate(**x, **GENERATE)
    vtattn.patch.llava(model, sparse_prefill=keep_all()[name])
    with torch.no_grad(), hf_attention.counting() as calls:
        assert torch.equal(model.generate(**x, **GENERATE), tokens)
    assert calls["sparse prefill"] == 2
    vtattn.patch.unpatch(model)
    vtattn.patch.llava(model, sparse_prefill=sparse_policies()[name])
    with torch.no_grad(), hf_attention.counting() as calls:
        assert model.generate(**x, **GENERATE).shape == tokens.shape
    assert calls["sparse prefill"] == 2 and all(d < 1 for d in model._vtattn_patch.stages[-1].density.values())


def test_region_routing_gets_each_frame_as_a_grid():
    from vtattn.patch.sparse_prefill import _grids
    from vtattn.patch.core import Call
    model, x = qwen2_vl(), video_inputs(frames=3, side=4)
    images = x["input_ids"] == QWEN_VIDEO
    call = Call(x["input_ids"], images, {"video_grid_thw": x["video_grid_thw"]}, "cache")
    assert _grids(call, model) == [[(6, 2, 2), (10, 2, 2), (14, 2, 2)]]
    odd = torch.zeros(1, 20, dtype=torch.bool)
    odd[0, 2:11], odd[0, 12:15] = True, True  # no grid given: a 3 x 3 square, then a row of 3
    assert _grids(Call(None, odd, {}, "cache"), model) == [[(2, 3, 3), (12, 1, 3)]]


def test_bad_arguments():
    model = llama()
    with pytest.raises(TypeError, match="sparse_prefill must be a vtattn.sparse policy"):
        vtattn.patch.llm(model, sparse_prefill="flexprefill")
    with pytest.raises(NotImplementedError, match="sparse_prefill= and fastv="):
        vtattn.patch.llm(model, sparse_prefill=sparse.HiP(2), fastv=vtattn.patch.FastV(layer=1, keep=0.5),
                         image_token_id=IMAGE)
    assert not routed(model.model.layers[0].self_attn)
