"""KV compression under `generate(cache_implementation="static")` and a compiled decode step, on tiny
LLaVA, LLaVA-NeXT and Qwen2-VL: the KVCompress stage turns generate's StaticCache into a static
`CompressedCache` (fixed capacity: the prompt's kept tokens plus what the StaticCache leaves for new
tokens), which generates the dynamic cache's tokens, holds no more bytes than its bound, and whose
decode step torch.compile (inductor, fullgraph) traces once. Stages that drop tokens (vision-side
pruning, FastV, VisualExit, SparseVLM, AIM) give the dynamic cache's tokens on generate's StaticCache,
alone and with KV compression (DecodeH2O's device-side eviction too), and take a static cache reset
and reused as a new one."""
import pytest
import torch

import vtattn
from vtattn import kv
from helpers import cache_name
from test_kv_model_syncs import MODELS

pytest.importorskip("transformers")
from vtattn.kv.cache import CompressedCache  # noqa: E402  (needs transformers)

NEW = 6


def _generate(model, inputs, **options):
    with torch.no_grad():
        return model.generate(**inputs, max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False, pad_token_id=0,
                              return_dict_in_generate=True, **options)


def _cache(out):
    return out.cache if "cache" in out else out.past_key_values


@pytest.mark.parametrize("family", MODELS)
@pytest.mark.parametrize("policy", [kv.LookM(0.2, 0.1), kv.SnapKV(0.3, window=4)], ids=["lookm", "snapkv"])
def test_static_generate_gives_the_dynamic_tokens(family, policy):
    model, patch, inputs = MODELS[family]()
    patch(model, stages=[vtattn.patch.KVCompress(policy)])
    dynamic = _generate(model, inputs)
    static = _generate(model, inputs, cache_implementation="static")
    assert torch.equal(static.sequences, dynamic.sequences)
    cache = _cache(static)
    assert isinstance(cache, CompressedCache) and cache.static and cache.max_new_tokens == NEW - 1
    # bound: each head's kept tokens + max_new_tokens, plus less than a page; generate's eager steps
    # filled the max_new_tokens, so the heads' lengths now are exactly kept + max_new_tokens
    for layer in cache.layers:
        per_token = 2 * layer.pages.k.shape[-1] * layer.pages.k.element_size()
        assert layer.nbytes <= int((layer.pages.host_lengths + cache.page_size - 1).sum()) * per_token


def _compiled_tokens(monkeypatch, device, **compile_options):
    """Greedy tokens of a KV-compressed LLaVA's decode steps: the eager patched model on the dynamic
    cache, and its patched forward compiled whole (fullgraph) on a static CompressedCache. The 2-D
    mask is given at the static width, as generate gives a static cache's. Also: the graphs dynamo
    made, and the public ops run by Python dispatch while the compiled steps ran."""
    import torch._dynamo.utils as dynamo_utils
    from vtattn import _registry
    model, _, inputs = MODELS["llava"]()
    model, inputs = model.to(device), {k: v.to(device) for k, v in inputs.items()}
    policy = kv.LookM(0.2, 0.1)
    vtattn.patch.llava(model, stages=[vtattn.patch.KVCompress(policy)])
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    B, L = ids.shape

    def decode(cache, forward, static_width):
        with torch.no_grad():
            out = model(**inputs, **({} if cache is None else {"past_key_values": cache}), use_cache=True)
            cache, token, tokens = out.past_key_values, out.logits[:, -1:].argmax(-1), []
            for s in range(NEW):
                width = NEW if static_width else s + 1
                step_mask = torch.cat([mask, mask.new_ones(B, width)], 1)
                out = forward(input_ids=token, attention_mask=step_mask, past_key_values=cache,
                              cache_position=torch.tensor([L + s], device=device), use_cache=True)
                token = out.logits[:, -1:].argmax(-1)
                tokens.append(token)
        return torch.cat(tokens, 1)

    expected = decode(None, model.forward, False)
    torch._dynamo.reset()
    compiled = torch.compile(model.forward, fullgraph=True, **compile_options)
    dynamo_utils.counters.clear()
    dispatched: list[str] = []
    run = _registry.run
    monkeypatch.setattr(_registry, "run", lambda op, *a, **kw: dispatched.append(op) or run(op, *a, **kw))
    got = decode(CompressedCache(policy, max_new_tokens=NEW), compiled, True)
    return got, expected, dynamo_utils.counters, dispatched


def test_compiled_decode_step_gives_the_dynamic_tokens(monkeypatch):
    """Compiled with inductor on CPU: one graph for every step, the dynamic cache's tokens; the graph
    calls the decode step's vtattn._C kernel itself (the static prefill prepared it), never the public
    op's Python dispatch."""
    from vtattn import _registry
    got, expected, counters, dispatched = _compiled_tokens(monkeypatch, "cpu")
    assert torch.equal(got, expected)
    assert counters["stats"]["unique_graphs"] == 1
    assert "paged_decode_step" not in dispatched and _registry.kernel_ops() >= {"paged_decode_step"}


@pytest.mark.gpu
def test_compiled_decode_step_replays_cuda_graphs(monkeypatch):
    """torch.compile(mode="reduce-overhead") on a GPU: the static cache's decode step is captured in
    CUDA graphs (inductor skips none: the pools' addresses are static, the step reads no host state)
    and its replays give the eager dynamic cache's tokens."""
    got, expected, counters, dispatched = _compiled_tokens(monkeypatch, "cuda", mode="reduce-overhead")
    assert torch.equal(got, expected)
    assert counters["stats"]["unique_graphs"] == 1
    assert counters["inductor"]["cudagraph_skips"] == 0
    assert "paged_decode_step" not in dispatched


DROPPING = {
    "keep": lambda: dict(keep=0.25),
    "fastv": lambda: dict(fastv=vtattn.patch.FastV(layer=1, keep=0.25)),
    "kv": lambda: dict(kv=kv.LookM(0.2, 0.1)),  # the vision stage at keep=1.0, then KV compression
    "keep+lookm": lambda: dict(keep=0.25, kv=kv.LookM(0.2, 0.1)),
    "fastv+lookm": lambda: dict(fastv=vtattn.patch.FastV(layer=1, keep=0.25), kv=kv.LookM(0.2, 0.1)),
    "visual-exit": lambda: dict(visual_exit=vtattn.patch.VisualExit(layer=1)),
    "keep+visual-exit": lambda: dict(keep=0.5, visual_exit=vtattn.patch.VisualExit(layer=1)),
    "visual-exit+lookm": lambda: dict(visual_exit=vtattn.patch.VisualExit(layer=1), kv=kv.LookM(0.2, 0.1)),
    "keep+decode-h2o": lambda: dict(keep=0.25, kv=kv.DecodeH2O(kv.LookM(0.2, 0.1), every=2, recent=2)),
    "fastv+decode-h2o": lambda: dict(fastv=vtattn.patch.FastV(layer=1, keep=0.25),
                                     kv=kv.DecodeH2O(kv.SnapKV(0.3, window=4), every=2, recent=1)),
    "aim": lambda: dict(stages=[vtattn.patch.AIM(retention=(1.0, 0.5))]),
    "sparsevlm": lambda: dict(stages=[vtattn.patch.SparseVLM(layers=(0,), scale=3.0)]),
}


@pytest.mark.parametrize("family", MODELS)
@pytest.mark.parametrize("path", DROPPING)
def test_dropping_stages_give_the_dynamic_tokens_on_a_static_cache(family, path):
    """Vision-side pruning, FastV, VisualExit, SparseVLM and AIM shorten the sequence (in the LLM's input, or from
    layer K on) while generate's static-cache mask / positions are in the full prompt's frame: the
    stages read the padding back from it and hand the model the shortened frame's (left-padded samples
    too)."""
    if family != "llava" and path == "aim":
        pytest.skip("AIM merges one view per image (LLaVA-1.5)")
    model, patch, inputs = MODELS[family]()
    patch(model, **DROPPING[path]())
    dynamic = _generate(model, inputs)
    static = _generate(model, inputs, cache_implementation="static")
    assert torch.equal(static.sequences, dynamic.sequences)
    cache = _cache(static)
    assert type(cache).__name__ == ("CompressedCache" if "kv" in path or "lookm" in path or "h2o" in path
                                    else "StaticCache")
    if isinstance(cache, CompressedCache):  # room for generate's new tokens alone, not for those pruned
        assert cache.max_new_tokens == NEW - 1
    if "h2o" in path:  # two evictions on the device (every 2 of 5 steps): the dynamic cache's choices
        for layer, same in zip(cache.layers, _cache(dynamic).layers):
            assert torch.equal(cache.kept_positions(layer.index), _cache(dynamic).kept_positions(same.index))
            assert layer._evict is not None and int(layer.pages.lengths.max()) <= int(layer._evict.floor.max()) + 1


@pytest.mark.parametrize("family", ["llava", "qwen2-vl"])
@pytest.mark.parametrize("path", ["keep", "fastv", "keep+lookm", "aim"])
def test_a_reset_static_cache_is_a_new_cache(family, path):
    """A static cache the caller keeps and resets between prompts: the stages tell it from the cache
    their pruned prefill filled by counting its reset() calls on the host (its length is a device
    count, not read in a decode step). After a pruned prompt and a reset, a text-only prompt longer
    than the pruned one, then the image prompt again, give what a new cache gives."""
    from transformers import StaticCache

    from _vlm import IMAGE
    if family != "llava" and path == "aim":
        pytest.skip("AIM merges one view per image (LLaVA-1.5)")
    model, patch, inputs = MODELS[family]()
    patch(model, **DROPPING[path]())
    ids = inputs["input_ids"]
    text = dict(input_ids=torch.randint(1, IMAGE, ids.shape, generator=torch.Generator().manual_seed(3)),
                attention_mask=torch.ones_like(ids))
    cache = StaticCache(config=model.config.get_text_config(decoder=True), max_cache_len=ids.shape[1] + NEW)
    got = []
    for prompt in (inputs, text, inputs):
        cache.reset()
        out = _generate(model, prompt, **{cache_name(model): cache})
        got.append(out.sequences)
        cache = _cache(out)  # (with KV compression: the static CompressedCache the prefill put in its place)
    for prompt, tokens in zip((inputs, text, inputs), got):
        assert torch.equal(tokens, _generate(model, prompt, cache_implementation="static").sequences)


@pytest.mark.parametrize("family", MODELS)
@pytest.mark.parametrize("path", ["keep+lookm", "fastv+lookm", "fastv", "keep+decode-h2o"])
def test_generate_compiles_static_decode_steps_as_on_a_gpu(family, path):
    """On a GPU, generate(cache_implementation="static") compiles the decode steps itself (transformers'
    auto-compile: its CompileConfig, inductor, mode "reduce-overhead"); forced here on the CPU (the
    config's `_compile_all_devices`, as transformers' own tests do). The patched model's decode steps
    under it give the dynamic cache's tokens: vision-side pruning, FastV and KV compression together."""
    from transformers import CompileConfig
    import torch._dynamo.utils as dynamo_utils
    model, patch, inputs = MODELS[family]()
    patch(model, **DROPPING[path]())
    dynamic = _generate(model, inputs)
    config = CompileConfig()
    config._compile_all_devices = True
    torch._dynamo.reset()
    dynamo_utils.counters.clear()
    static = _generate(model, inputs, cache_implementation="static", compile_config=config)
    graphs = dynamo_utils.counters["stats"]["unique_graphs"]
    assert torch.equal(static.sequences, dynamic.sequences)
    assert graphs >= 1  # the decode steps ran compiled
    # whole (the stages' decode-step Python too) and not recompiled step by step (NEW - 1 = 5 steps:
    # one recompile after the first), on torch 2.11 too (a ContextVar context broke there at every layer)
    assert graphs <= 2 and not dynamo_utils.counters["graph_break"]
    # nor call by call, generate's own cache reused or a new one given: each cache holds what the stages
    # keep for it (tables keyed by caches had dynamo guard on their members: a recompile per new cache,
    # and a guard failing once a cache was freed)
    from transformers import StaticCache
    width = inputs["input_ids"].shape[1] + NEW - 1  # (as generate sizes its own: the same shapes)
    given = [StaticCache(config=model.config.get_text_config(decoder=True), max_cache_len=width) for _ in range(2)]
    for options in [dict(cache_implementation="static")] + [{cache_name(model): cache} for cache in given]:
        again = _generate(model, inputs, compile_config=config, **options)
        assert torch.equal(again.sequences, dynamic.sequences)
    # nor patch by patch: the same stages patched again (their tables keyed by their place in the patch;
    # keyed by the tables themselves, dynamo guarded on their identity: a recompile per patch)
    vtattn.patch.unpatch(model)
    patch(model, **DROPPING[path]())
    assert torch.equal(_generate(model, inputs, compile_config=config, cache_implementation="static").sequences,
                       dynamic.sequences)
    assert dynamo_utils.counters["stats"]["unique_graphs"] == graphs
    cache = _cache(static)  # (with KV compression: the static CompressedCache the prefill put in its place)
    assert type(cache).__name__ == ("StaticCache" if path == "fastv" else "CompressedCache") and cache.is_compileable


@pytest.mark.gpu
@pytest.mark.parametrize("path", ["keep+lookm", "fastv+lookm", "keep+decode-h2o"])
def test_generate_compiled_decode_step_replays_cuda_graphs(path):
    """What a GPU user runs: generate(cache_implementation="static") compiles the patched LLaVA's decode
    steps itself (inductor, CUDA graphs), vision pruning or FastV with LOOK-M (or DecodeH2O's device-side
    eviction, last: the first cut if the device call runs short): the eager dynamic cache's tokens, the
    patched forward whole, inductor's CUDA graphs skipping nothing, and a second call (a new
    CompressedCache; the stages' records and masks on it) replaying the first call's graphs."""
    model, patch, inputs = MODELS["llava"]()
    model, inputs = model.cuda(), {k: v.cuda() for k, v in inputs.items()}
    patch(model, **DROPPING[path]())
    assert_static_generate_replays_cuda_graphs(model, inputs)


def assert_static_generate_replays_cuda_graphs(model, inputs):
    """Two static-cache generates of a patched model on CUDA (transformers compiles their decode steps:
    inductor, CUDA graphs): the dynamic cache's tokens, one graph (a recompile at most), no graph
    break, no CUDA-graph skip."""
    import torch._dynamo.utils as dynamo_utils
    dynamic = _generate(model, inputs)
    torch._dynamo.reset()
    dynamo_utils.counters.clear()
    for _ in range(2):
        assert torch.equal(_generate(model, inputs, cache_implementation="static").sequences, dynamic.sequences)
    counters = dynamo_utils.counters
    assert 1 <= counters["stats"]["unique_graphs"] <= 2 and not counters["graph_break"]
    assert counters["inductor"]["cudagraph_skips"] == 0


def _held_tensors(root):
    """{(id, data_ptr): (path, version, static address)} of the tensors reachable from `root` through
    attributes, slots and containers (weak ones too), not through modules (the model's weights)."""
    import functools
    import weakref
    held, seen, stack = {}, set(), [("", root)]
    while stack:
        path, o = stack.pop()
        if o is None or id(o) in seen or isinstance(o, (torch.nn.Module, type, str, bytes, int, float)):
            continue
        seen.add(id(o))
        if isinstance(o, torch.Tensor):
            held[id(o), o.data_ptr()] = (path, o._version, bool(getattr(o, "_dynamo_static_input_type", None)))
            continue
        if isinstance(o, (weakref.WeakKeyDictionary, weakref.WeakValueDictionary)):
            o = dict(o.items())
        if isinstance(o, dict):
            stack += [(f"{path}[{k!r}]", v) for k, v in o.items()] + [(f"{path}<key>", k) for k in o]
        elif isinstance(o, (list, tuple, set, frozenset)):
            stack += [(f"{path}[{i}]", v) for i, v in enumerate(o)]
        elif isinstance(o, functools.partial):
            stack += [(f"{path}.args", o.args), (f"{path}.keywords", o.keywords)]
        else:
            stack += [(f"{path}.{k}", v) for k, v in getattr(o, "__dict__", {}).items()]
            stack += [(f"{path}.{s}", getattr(o, s)) for s in getattr(type(o), "__slots__", ()) if hasattr(o, s)]
    return held


@pytest.mark.parametrize("family", MODELS)
@pytest.mark.parametrize("path", DROPPING)
def test_static_decode_steps_keep_nothing_they_allocate(family, path):
    """What a CUDA graph of a decode step needs (generate's compiled static decoding on a GPU): every
    tensor the stages and the cache hold after a decode step was there after the prefill (a replay
    overwrites the memory of what the graph allocated), and each one a step writes in place is a static
    address (inductor's CUDA graphs skip a graph with a mutated input at an address that may move).
    20 new tokens: past the 16 slots a growing record reserves."""
    if family != "llava" and path == "aim":
        pytest.skip("AIM merges one view per image (LLaVA-1.5)")
    model, patch, inputs = MODELS[family]()
    patch(model, **DROPPING[path]())
    assert_steps_keep_nothing_they_allocate(model, inputs, 20)


def assert_steps_keep_nothing_they_allocate(model, inputs, steps):
    """Static-cache generate of `steps` tokens: the tensors the patch and the cache hold after the last
    forward were all there after the prefill, and those written since are static addresses."""
    snapshots = []

    def hold(module, args, kwargs, out):
        snapshots.append(_held_tensors((model._vtattn_patch, _cache(out))))
    handle = model.register_forward_hook(hold, with_kwargs=True)
    with torch.no_grad():
        model.generate(**inputs, max_new_tokens=steps, min_new_tokens=steps, do_sample=False, pad_token_id=0,
                       cache_implementation="static")
    handle.remove()
    prefill, last = snapshots[0], snapshots[-1]
    assert len(snapshots) == steps
    assert [v[0] for k, v in last.items() if k not in prefill] == []
    assert [v[0] for k, v in last.items() if v[1] != prefill[k][1] and not v[2]] == []
