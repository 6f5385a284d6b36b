"""The patch layer's core: `vtattn.patch.auto` per family, lists of stages, routing (installed once,
undone exactly, shared by nested patches), and routed modules of models on another attention
implementation (a flash-attention-style 2-D padding mask reaches the module's own attention); the
thread's forward context, left as found and read by a compiled model in one graph; what a prefill
leaves in a cache (`Filled`); patched models run with grad enabled."""

import pytest
import torch
import torch.nn.functional as F

import vtattn
from vtattn import kv
from vtattn.patch import FastV, KVCompress, VisionSelect, core, hf_attention
from vtattn.patch.filled import Filled
from _vlm import (IMAGE, llava, llava_next, prompts, qwen2_5_vl, qwen2_vl, qwen2_vl_inputs, text_config,
                  transformers)
from helpers import cache_name

GENERATE = dict(max_new_tokens=3, min_new_tokens=3, do_sample=False)


def _images(n):
    return torch.randn(n, 3, 84, 84, generator=torch.Generator().manual_seed(1))


def _text_model(kind):
    """A tiny random text LM of each `llm` family auto supports (full attention)."""
    small = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=128)
    if kind == "llama":
        return transformers.LlamaForCausalLM(text_config()).eval()
    config = {"mistral": lambda: transformers.MistralConfig(sliding_window=None, **small),
              "qwen2": lambda: transformers.Qwen2Config(**small),
              "qwen3": lambda: transformers.Qwen3Config(head_dim=8, **small)}[kind]()
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(config).eval()


@pytest.mark.parametrize("kind", ["llama", "mistral", "qwen2", "qwen3"])
def test_auto_text_lms(kind):
    """Text LMs get `llm`: a KV policy that keeps everything generates the unpatched tokens."""
    model = _text_model(kind)
    assert model.config.model_type == kind
    ids = torch.randint(1, 100, (2, 9), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    with torch.no_grad():
        expected = model.generate(input_ids=ids, attention_mask=mask, **GENERATE)
        assert vtattn.patch.auto(model, kv=kv.StreamingLLM(sinks=4, window=30)) is model
        assert model._vtattn_patch.family == "llm"
        with hf_attention.counting() as calls:
            assert torch.equal(model.generate(input_ids=ids, attention_mask=mask, **GENERATE), expected)
    assert set(calls) == {"cache"}  # every attention call ran the compressed cache's kernels
    vtattn.patch.unpatch(model)
    assert not any(core.routed(m) for m in model.modules())


@pytest.mark.parametrize("build", [llava, llava_next], ids=["llava", "llava_next"])
def test_auto_llava_families(build):
    model = build()
    vtattn.patch.auto(model, keep=0.5)
    assert model._vtattn_patch.family == "llava" and isinstance(model._vtattn_patch.stages[0].options, VisionSelect)
    if build is llava:
        ids, mask = prompts([[36]])
        with torch.no_grad():
            assert model.generate(input_ids=ids, attention_mask=mask, pixel_values=_images(1),
                                  **GENERATE).shape == (1, ids.shape[1] + 3)


@pytest.mark.parametrize("build", [qwen2_vl, qwen2_5_vl], ids=["qwen2_vl", "qwen2_5_vl"])
def test_auto_qwen_families(build):
    model = build()
    x = qwen2_vl_inputs([(4, 4), (4, 8)])
    vtattn.patch.auto(model, keep=0.5, kv=kv.LookM(budget=0.5, recent=0.1))
    assert model._vtattn_patch.family == "qwen2_vl"
    with torch.no_grad():
        out = model.generate(**x, **GENERATE, return_dict_in_generate=True)
    assert isinstance(out.past_key_values, vtattn.kv.CompressedCache)
    assert int(model._vtattn_patch.kept.sum()) < int(x["attention_mask"].sum())


def test_auto_refuses_other_types_naming_the_supported_ones():
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_embd=32, n_layer=1, n_head=4, vocab_size=64))
    with pytest.raises(TypeError, match="model_type 'gpt2'.*supported: .*llava.*qwen2_5_vl"):
        vtattn.patch.auto(model, kv=kv.H2O(0.5, 0))
    with pytest.raises(TypeError, match="model_type None"):
        vtattn.patch.auto(torch.nn.Linear(2, 2))


def test_a_list_of_stages_is_the_keyword_patch_and_stages_are_reusable():
    ids, mask = prompts([[36], [36, 36]])
    inputs = dict(input_ids=ids, attention_mask=mask, pixel_values=_images(3), **GENERATE)
    model = llava()
    with torch.no_grad():
        vtattn.patch.llava(model, keep=0.5, kv=kv.LookM(budget=0.5, recent=0.1), fastv=FastV(layer=1, keep=0.5))
        expected = model.generate(**inputs)
        stages = [FastV(layer=1, keep=0.5), KVCompress(kv.LookM(budget=0.5, recent=0.1)), VisionSelect(keep=0.5)]
        vtattn.patch.llava(model, stages)  # any order: each stage has its phase
        assert [type(s.options).__name__ for s in model._vtattn_patch.stages] == ["VisionSelect", "KVCompress",
                                                                                  "FastV"]
        assert torch.equal(model.generate(**inputs), expected)
        other = vtattn.patch.llava(llava(), stages)  # the same stage objects on a second model
        assert torch.equal(other.generate(**inputs), expected)
    with pytest.raises(ValueError, match="not both"):
        vtattn.patch.llava(model, stages, keep=0.5)
    with pytest.raises(TypeError, match="stages"):
        vtattn.patch.llm(model, [kv.H2O(0.5, 0)])
    with pytest.raises(TypeError, match="VisionSelect supports"):
        vtattn.patch.llm(model, [VisionSelect(keep=0.5)])
    assert "forward" not in model.__dict__  # a refused patch leaves the model unpatched


def test_routes_are_shared_by_nested_patches_and_undone_exactly():
    model = llava()
    lm = model.model.language_model
    configs = [(m, m.config) for m in model.modules() if hasattr(m, "config")]
    vtattn.patch.llava(model.model, kv=kv.LookM(budget=0.5, recent=0.1))  # the inner model: LLM and tower
    vtattn.patch.llava(model, keep=0.5)  # the outer one: the tower again
    assert all(core.routed(layer.self_attn) for layer in lm.layers)
    tower = model.model.vision_tower.encoder.layers
    vtattn.patch.unpatch(model.model)
    assert not any(core.routed(layer.self_attn) for layer in lm.layers)
    assert all(core.routed(layer.self_attn) for layer in tower)  # still the outer patch's
    vtattn.patch.unpatch(model)
    assert all(m.config is c for m, c in configs)
    assert lm.config._attn_implementation == "sdpa"


def test_a_patched_model_inside_a_patched_model_shares_its_forward():
    """KV compression on the inner LlavaModel, FastV on the outer model: one forward context, so the
    two patches compose as one patch with both stages does."""
    ids, mask = prompts([[36], [36, 36]])
    inputs = dict(input_ids=ids, attention_mask=mask, pixel_values=_images(3), **GENERATE)
    policy, fastv = kv.LookM(budget=0.5, recent=0.1), FastV(layer=1, keep=0.5)
    model = llava()
    with torch.no_grad():
        vtattn.patch.llava(model, kv=policy, fastv=fastv)
        expected = model.generate(**inputs)
        vtattn.patch.unpatch(model)
        vtattn.patch.llava(model.model, kv=policy)
        vtattn.patch.llava(model, method="fastv", layer=1, keep=0.5)
        assert torch.equal(model.generate(**inputs), expected)


def _attention_2d(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """A stand-in for flash attention: causal, end-aligned, reading a 2-D padding mask (or none)."""
    Nq, Nk = query.shape[2], key.shape[2]
    visible = torch.ones(Nq, Nk, dtype=torch.bool).tril(Nk - Nq)[None, None]
    if attention_mask is not None:
        visible = visible & attention_mask.bool()[:, None, None, -Nk:]
    visible = visible | torch.eye(Nq, Nk, dtype=torch.bool).roll(Nk - Nq, 1)  # padding rows see themselves
    out = F.scaled_dot_product_attention(query, key, value, attn_mask=visible, scale=scaling, enable_gqa=True)
    return out.transpose(1, 2), None


def test_routed_modules_of_a_model_with_2d_masks():
    """A model whose implementation builds 2-D padding masks (as flash attention's): FastV's scored
    layer runs the model's own attention with it ("native"), the compressed cache reads it as
    padding; keep / budget 1.0 generate the unpatched tokens."""
    name = "vtattn_test_2d"
    transformers.AttentionInterface.register(name, _attention_2d)
    transformers.AttentionMaskInterface.register(name, transformers.masking_utils.flash_attention_mask)
    model = transformers.LlamaForCausalLM(text_config()).eval()
    model.config._attn_implementation = name
    ids = torch.randint(1, IMAGE, (2, 12), generator=torch.Generator().manual_seed(1))
    ids[:, 4:8] = IMAGE
    mask = torch.ones_like(ids)
    mask[1, :2] = 0
    with torch.no_grad():
        expected = model.generate(input_ids=ids, attention_mask=mask, **GENERATE)
        for options in (dict(fastv=FastV(layer=1, keep=1.0)), dict(kv=kv.LookM(budget=1.0, recent=0.1))):
            vtattn.patch.llm(model, image_token_id=IMAGE, **options)
            with hf_attention.counting() as calls:
                assert torch.equal(model.generate(input_ids=ids, attention_mask=mask, **GENERATE), expected)
            assert set(calls) == ({"native: 2-D mask", *PRUNED} if "fastv" in options else {"cache"})
    module = model.model.layers[0].self_attn
    vtattn.patch.unpatch(model)
    q = torch.randn(1, 4, 3, 8)
    with pytest.raises(NotImplementedError, match="2-D mask"):  # not routed: nothing else to run it
        hf_attention.attention_forward(module, q, q[:, :2], q[:, :2], torch.ones(1, 3))


PRUNED = {"index_attention", "sdpa: a pruned layer's decode step"}  # a pruned layer: prefill, decode steps


@pytest.mark.parametrize("family, options, kernels", [
    ("llava", dict(keep=0.5), {"attention"}),  # the tower; the LLM is not routed
    ("llava", dict(method="fastv", layer=1, keep=0.5), {"sdpa: an explicit mask", *PRUNED}),
    ("llava", dict(kv=kv.LookM(budget=0.5, recent=0.1)), {"attention", "cache"}),
    ("llava", dict(keep=0.5, fastv=FastV(layer=1, keep=0.5), kv=kv.LookM(budget=0.5, recent=0.1)),
     {"attention", "cache"}),
    ("qwen2_vl", dict(keep=0.5), {"attention", *PRUNED}),
    ("qwen2_vl", dict(keep=0.5, kv=kv.LookM(budget=0.5, recent=0.1)), {"attention", "cache"}),
    ("qwen2_vl", dict(fastv=FastV(layer=1, keep=0.5)), {"sdpa: an explicit mask", *PRUNED})],
    ids=["llava-keep", "llava-fastv", "llava-kv", "llava-all", "qwen-keep", "qwen-keep-kv", "qwen-fastv"])
def test_each_stage_runs_its_kernels(family, options, kernels):
    """Which path every attention call of a patched generate took (on a padded batch): vision towers
    on vtattn.attention, FastV's pruned layers on index_attention (decode steps: SDPA with the padding
    mask), a compressed cache's layers on its own kernels; FastV's scored layer gets the model's SDPA
    mask and runs SDPA with it."""
    if family == "llava":
        model = llava()
        ids, mask = prompts([[36], [36, 36]])
        inputs = dict(input_ids=ids, attention_mask=mask, pixel_values=_images(3))
    else:
        model, inputs = qwen2_vl(), qwen2_vl_inputs([(4, 4), (4, 8)])
    getattr(vtattn.patch, family)(model, **options)
    with torch.no_grad(), hf_attention.counting() as calls:
        model.generate(**inputs, **GENERATE)
    assert set(calls) == kernels


def test_the_thread_context_is_left_as_found_and_traced_whole():
    """A patched forward leaves the thread's context as it found it; a CompressedCache outside any patch
    leaves the thread's own, nothing pending; a compiled attn_implementation="vtattn" model reads it
    in one graph (on torch 2.11 too: its dynamo cannot trace a ContextVar)."""
    ids, mask = prompts([[36], [36, 36]])
    model, before = llava(), core.current()
    vtattn.patch.llava(model, keep=0.5, fastv=FastV(layer=1, keep=0.5), kv=kv.LookM(budget=0.5, recent=0.1))
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask, pixel_values=_images(3))
    assert core.current() is before
    vtattn.patch.unpatch(model)
    vtattn.patch.register_hf_attention()
    lm = transformers.LlamaForCausalLM._from_config(text_config(), attn_implementation="vtattn").eval()
    with torch.no_grad():  # the thread's own context for a cache outside any patch
        lm(input_ids=ids, attention_mask=mask, **{cache_name(lm): kv.CompressedCache(kv.SnapKV(0.5))})
    ctx = core.current()
    assert ctx is not None and not ctx.open and ctx.pending is None
    torch._dynamo.reset()
    compiled = torch.compile(lm, fullgraph=True, backend="eager")
    x = ids[1:, 3:]
    with torch.no_grad():
        torch.testing.assert_close(compiled(input_ids=x, use_cache=False).logits,
                                   lm(input_ids=x, use_cache=False).logits)


@pytest.mark.parametrize("family, options", [
    ("llava", dict(keep=0.5)),
    ("llava", dict(keep=0.5, merge="weighted")),
    ("llava", dict(method="fastv", layer=1, keep=0.5)),
    ("llava", dict(kv=kv.LookM(budget=0.5, recent=0.1, merge="pivotal"))),
    ("qwen2_vl", dict(keep=0.5, kv=kv.DecodeH2O(kv.LookM(budget=0.5, recent=0.1), every=2, recent=2))),
    ("qwen2_vl", dict(keep=0.5)),
    ("qwen2_vl", dict(fastv=FastV(layer=1, keep=0.5)))],
    ids=["llava-keep", "llava-merge", "llava-fastv", "llava-kv", "qwen-keep-kv", "qwen-keep", "qwen-fastv"])
def test_patched_models_run_with_grad_enabled(family, options):
    """Outside torch.no_grad (training, or a user who forgot it): every stage's forward gives the
    logits it gives under no_grad, and a backward reaches the weights with finite gradients (scores
    and similarities detach; index_attention and merge_tokens run their differentiable references)."""
    if family == "llava":
        model = llava()
        ids, mask = prompts([[36], [36, 36]])
        inputs = dict(input_ids=ids, attention_mask=mask, pixel_values=_images(3))
    else:
        model, inputs = qwen2_vl(), qwen2_vl_inputs([(4, 4), (4, 8)])
    getattr(vtattn.patch, family)(model, **options)
    with torch.no_grad():
        expected = model(**inputs).logits
    logits = model(**inputs).logits
    torch.testing.assert_close(logits, expected, atol=1e-5, rtol=1e-5)
    logits.sum().backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(bool(g.isfinite().all()) for g in grads)


def test_the_walk_from_patch_llava_through_generate_stays_short():
    """issue 13: `vtattn.patch.llava(model, keep=0.1)` then a 3-token generate runs functions of at most
    11 vtattn files (traced as docs/internals.md counts them: sys.setprofile, every vtattn file one of
    whose functions runs). Internal callers use the registered ops (`core.op`), never the public
    functions that validate again (ops/*.py)."""
    import os
    import sys
    root = os.path.dirname(vtattn.__file__)
    model = llava()
    ids, mask = prompts([[36]])
    seen = set()

    def trace(frame, event, arg):
        if event == "call" and frame.f_code.co_filename.startswith(root):
            seen.add(os.path.relpath(frame.f_code.co_filename, root))

    sys.setprofile(trace)
    try:
        vtattn.patch.llava(model, keep=0.1)
        with torch.no_grad():
            model.generate(input_ids=ids, attention_mask=mask, pixel_values=_images(1), max_new_tokens=3,
                           do_sample=False, pad_token_id=0)
    finally:
        sys.setprofile(None)
        vtattn.patch.unpatch(model)
    assert not any(f.startswith("ops" + os.sep) for f in seen), sorted(seen)
    assert len(seen) <= 11, sorted(seen)


def test_filled_entries_live_on_their_cache_only():
    """What a stage's prefill leaves in a cache (filled.Filled) is that cache's: its reset() forgets it, a
    crop is told, and a copy (copy, deepcopy, pickle) is a new cache that holds none of it."""
    import copy
    import pickle
    cache = transformers.DynamicCache()
    table, other = Filled(), Filled()
    table[cache] = "prefill"
    assert table.get(cache) == "prefill" and cache in table and cache not in other and not table.cropped(cache)
    for clone in (copy.copy(cache), copy.deepcopy(cache), pickle.loads(pickle.dumps(cache))):
        assert clone not in table
        table[clone] = "clone"
        assert table.get(clone) == "clone" and table.get(cache) == "prefill"
    cache.crop(0)
    assert table.cropped(cache) and table.get(cache) == "prefill"
    cache.reset()
    assert table.get(cache) is None
    table[cache] = "again"
    table.pop(cache)
    assert cache not in table


def test_filled_tables_with_rows_follow_the_caches_row_selections():
    """A table given `rows` sees each row selection of the cache (beam search's reorder_cache,
    batch_select_indices) after the cache's, for its current record only (not one a reset forgot);
    a table without `rows` is not told; a copy of the cache selects for its own records."""
    import copy
    seen = []
    cache = transformers.DynamicCache()
    cache.update(torch.arange(3.0).view(3, 1, 1, 1).expand(3, 1, 2, 1), torch.zeros(3, 1, 2, 1), 0)
    table, plain = Filled(rows=lambda record, index: seen.append((record, index.tolist()))), Filled()
    table[cache], plain[cache] = "record", "plain"
    cache.reorder_cache(torch.tensor([2, 2, 0]))
    assert seen == [("record", [2, 2, 0])] and cache.layers[0].keys[:, 0, 0, 0].tolist() == [2.0, 2.0, 0.0]
    cache.batch_select_indices(torch.tensor([1]))
    assert seen[-1] == ("record", [1]) and cache.layers[0].keys.shape[0] == 1
    clone = copy.deepcopy(cache)
    table[clone] = "clone's"
    clone.reorder_cache(torch.tensor([0]))
    assert seen[-1] == ("clone's", [0]) and len(seen) == 3
    cache.reset()
    cache.reorder_cache(torch.tensor([0]))
    assert len(seen) == 3


def test_stages_that_attend_themselves_refuse_output_attentions():
    """output_attentions=True on an eager LLaVA: the stages that compute a layer's attention themselves
    (pruned keys: FastV, VisualExit, SparseVLM; their own rule: VAR, CMAI) refuse it at the prefill
    (before, those layers' weights were left out of `attentions` without a word); the vision-side
    keep returns every layer's weights, over the shortened sequence."""
    from test_var import _options
    ids, mask = prompts([[36]])
    x = dict(input_ids=ids, attention_mask=mask, pixel_values=_images(1))
    P = vtattn.patch
    stages = {"fastv": lambda m: dict(fastv=FastV(layer=1, keep=0.3)),
              "visual-exit": lambda m: dict(visual_exit=P.VisualExit(layer=1)),
              "sparsevlm": lambda m: dict(stages=[P.SparseVLM(layers=(0,), scale=3.0)]),
              "var": lambda m: dict(stages=[_options(m, x, (0, 1))]), "cmai": lambda m: dict(stages=[P.CMAI(keep=0.3)])}
    for name, options in stages.items():
        model = llava()
        model.set_attn_implementation("eager")
        P.llava(model, **options(model))
        with torch.no_grad(), pytest.raises(NotImplementedError, match="cannot take output_attentions"):
            model.generate(**x, max_new_tokens=2, output_attentions=True, return_dict_in_generate=True)
    model = llava()
    model.set_attn_implementation("eager")
    P.llava(model, keep=0.25)
    with torch.no_grad():
        attentions = model(**x, output_attentions=True).attentions
    kept = ids.shape[1] - 36 + 9
    assert [tuple(a.shape[-2:]) for a in attentions] == [(kept, kept)] * model.config.text_config.num_hidden_layers
