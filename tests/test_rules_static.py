"""The attention rules that keep every token (VAR, CMAI) under `generate(cache_implementation="static")`
and its compiled decode steps (transformers' CompileConfig, forced on the CPU as on a GPU), on tiny
LLaVA, LLaVA-NeXT and Qwen2-VL: the dynamic cache's tokens, decode steps that read nothing on the host,
compile once (no graph break, one recompile at most) and keep nothing they allocate (what a CUDA graph
of the step needs), and a static cache reset and reused as a new one."""
import pytest
import torch

import vtattn
from helpers import cache_name
from syncs import step_syncs
from test_kv_model_syncs import MODELS, _static
from test_kv_static_generate import (NEW, _cache, _generate, assert_static_generate_replays_cuda_graphs,
                                     assert_steps_keep_nothing_they_allocate)
from test_var import _options

pytest.importorskip("transformers")


def _patched(family, rule, keep=None):
    """A tiny model of `family` patched with `rule` (after LLaVA's vision-side `keep`, if given), its
    inputs, and its unpatched greedy logits. VAR: dims and tau from the unpatched run (random weights
    have no massive activations), layers 0 and 1."""
    model, patch, inputs = MODELS[family]()
    unpatched = torch.stack(_generate(model, inputs, output_logits=True).logits)
    stage = _options(model, inputs, (0, 1)) if rule == "var" else vtattn.patch.CMAI(keep=0.3)
    before = [] if keep is None else [vtattn.patch.VisionSelect(keep=keep, method="cls")]
    patch(model, stages=[*before, stage])
    return model, patch, inputs, unpatched


RULES = ["var", "cmai"]


@pytest.mark.parametrize("family", MODELS)
@pytest.mark.parametrize("rule", RULES)
def test_static_generate_gives_the_dynamic_tokens(family, rule):
    model, _, inputs, unpatched = _patched(family, rule)
    dynamic = _generate(model, inputs, output_logits=True)
    static = _generate(model, inputs, cache_implementation="static", output_logits=True)
    assert torch.equal(static.sequences, dynamic.sequences)
    torch.testing.assert_close(torch.stack(static.logits), torch.stack(dynamic.logits), atol=2e-5, rtol=1e-5)
    assert type(_cache(static)).__name__ == "StaticCache"
    assert not torch.allclose(torch.stack(static.logits), unpatched)  # the rule changed attention
    with vtattn.patch.hf_attention.counting() as calls:
        _generate(model, inputs, cache_implementation="static")
    assert calls["group_attention" if rule == "var" else "cmai"] == 2 * NEW  # two layers, every forward


@pytest.mark.parametrize("family", MODELS)
@pytest.mark.parametrize("rule", RULES)
def test_static_decode_steps_sync_nothing(family, rule):
    model, _, inputs, _ = _patched(family, rule)
    steps, _ = step_syncs(_static(model), inputs, 4)
    assert not any(steps), "\n".join(s.report() for s in steps if s)


@pytest.mark.parametrize("family,keep", [*((f, None) for f in MODELS), ("llava", 0.5), ("llava-next", 0.5)])
@pytest.mark.parametrize("rule", RULES)
def test_compiled_static_decode_steps_give_the_dynamic_tokens(family, rule, keep, monkeypatch):
    """Compiled whole (fullgraph: the stage's decode-step Python too), once and one recompile at most,
    and nothing new for a second cache (generate's, then one the caller gives). CMAI's compiled steps
    call the C++ kernel the prefill prepared, not the public op's Python dispatch. keep: LLaVA's
    vision-side pruning first (its decode steps attend over the cache's width, the caller's frame)."""
    from transformers import CompileConfig, StaticCache
    import torch._dynamo.utils as dynamo_utils
    from vtattn import _registry
    model, _, inputs, _ = _patched(family, rule, keep)
    dynamic = _generate(model, inputs)
    config = CompileConfig()
    config._compile_all_devices = True
    torch._dynamo.reset()
    dynamo_utils.counters.clear()
    dispatched, run = [], _registry.run
    monkeypatch.setattr(_registry, "run", lambda op, *a, **kw: dispatched.append(op) or run(op, *a, **kw))
    assert torch.equal(_generate(model, inputs, cache_implementation="static", compile_config=config).sequences,
                       dynamic.sequences)
    assert "cmai_step" not in dispatched
    graphs = dynamo_utils.counters["stats"]["unique_graphs"]
    assert 1 <= graphs <= 2 and not dynamo_utils.counters["graph_break"]
    width = inputs["input_ids"].shape[1] + NEW - 1  # (as generate sizes its own)
    given = StaticCache(config=model.config.get_text_config(decoder=True), max_cache_len=width)
    for options in (dict(cache_implementation="static"), {cache_name(model): given}):
        assert torch.equal(_generate(model, inputs, compile_config=config, **options).sequences, dynamic.sequences)
    assert dynamo_utils.counters["stats"]["unique_graphs"] == graphs


@pytest.mark.parametrize("family", ["llava", "llava-next"])
@pytest.mark.parametrize("rule", RULES)
def test_after_vision_side_keep_static_generate_gives_the_dynamic_tokens(family, rule):
    """LLaVA's vision-side keep, then the rule: a static cache's decode steps attend over its whole
    width, the caller's prompt plus the room (a record sized by the shortened prompt refused them), and
    give the dynamic cache's tokens; the keep alone is not what the rule gives."""
    model, patch, inputs, _ = _patched(family, rule, keep=0.5)
    dynamic = _generate(model, inputs, output_logits=True)
    static = _generate(model, inputs, cache_implementation="static", output_logits=True)
    assert torch.equal(static.sequences, dynamic.sequences)
    torch.testing.assert_close(torch.stack(static.logits), torch.stack(dynamic.logits), atol=2e-5, rtol=1e-5)
    patch(model, stages=[vtattn.patch.VisionSelect(keep=0.5, method="cls")])
    assert not torch.allclose(torch.stack(_generate(model, inputs, output_logits=True).logits),
                              torch.stack(dynamic.logits))


@pytest.mark.parametrize("rule", RULES)
def test_a_reset_static_cache_is_a_new_cache(rule):
    """After an image prompt and a reset, a text-only prompt (the unpatched model), then the image
    prompt again: what a new cache gives each."""
    from transformers import StaticCache

    from _vlm import IMAGE
    model, _, inputs, _ = _patched("llava", rule)
    ids = inputs["input_ids"]
    text = dict(input_ids=torch.randint(1, IMAGE, ids.shape, generator=torch.Generator().manual_seed(3)),
                attention_mask=torch.ones_like(ids))
    cache = StaticCache(config=model.config.get_text_config(decoder=True), max_cache_len=ids.shape[1] + NEW)
    for prompt in (inputs, text, inputs):
        cache.reset()
        got = _generate(model, prompt, **{cache_name(model): cache})
        assert torch.equal(got.sequences, _generate(model, prompt, cache_implementation="static").sequences)


@pytest.mark.parametrize("family", MODELS)
@pytest.mark.parametrize("rule", RULES)
def test_static_decode_steps_keep_nothing_they_allocate(family, rule):
    """Every tensor the stage and the cache hold after a decode step was there after the prefill, and
    each one a step writes in place is a static address (as tests/test_kv_static_generate.py's)."""
    model, _, inputs, _ = _patched(family, rule)
    assert_steps_keep_nothing_they_allocate(model, inputs, 8)


@pytest.mark.gpu
@pytest.mark.parametrize("rule", RULES)
def test_generate_compiled_decode_step_replays_cuda_graphs(rule):
    """On a GPU, generate(cache_implementation="static") compiles the decode steps itself (inductor,
    CUDA graphs): the dynamic cache's tokens, no graph skipped, the second call replaying the first's."""
    model, _, inputs, _ = _patched("llava", rule)
    assert_static_generate_replays_cuda_graphs(model.cuda(), {k: v.cuda() for k, v in inputs.items()})
