"""Host syncs of a whole decode step of every drop-in path, counted inside `generate` by
tests/syncs.py: after the prefill, a patched model's decode step reads nothing on the host that the
unpatched model's step does not (transformers' own step reads the 2-D attention mask once, in
`masking_utils`), on LLaVA, LLaVA-NeXT and Qwen2-VL, ragged left-padded batches included. With a
static cache (generate's `cache_implementation="static"`) the unpatched step reads nothing, and
neither does any drop-in path's, pruning stages and their combinations with KV compression included."""
import pytest
import torch

import vtattn
from vtattn import kv
from _vlm import llava, llava_next, llava_next_inputs, prompts, qwen2_vl, qwen2_vl_inputs
from syncs import prefill_syncs, step_syncs

pytest.importorskip("transformers")

STEPS = 6


def _paths():
    lookm = lambda b=0.2: kv.LookM(b, 0.1)  # noqa: E731
    return {
        "keep": dict(keep=0.25),
        "lookm": dict(kv=lookm(0.1)),
        "fastv": dict(fastv=vtattn.patch.FastV(layer=1, keep=0.25)),
        "keep+lookm": dict(keep=0.25, kv=lookm()),
        "fastv+lookm": dict(fastv=vtattn.patch.FastV(layer=1, keep=0.25), kv=lookm()),
        "keep+fastv+lookm": dict(keep=0.5, fastv=vtattn.patch.FastV(layer=1, keep=0.5), kv=lookm()),
        "decode-h2o": dict(kv=kv.DecodeH2O(lookm(), every=2, recent=2)),
    }


def _llava():
    ids, mask = prompts([[36], [36, 36]])
    pixels = torch.randn(3, 3, 84, 84, generator=torch.Generator().manual_seed(1))
    return llava(), vtattn.patch.llava, dict(input_ids=ids, attention_mask=mask, pixel_values=pixels)


def _llava_next():
    model = llava_next()
    return model, vtattn.patch.llava, llava_next_inputs(model)


def _qwen2_vl():
    return qwen2_vl(), vtattn.patch.qwen2_vl, qwen2_vl_inputs([(4, 6), (6, 4)])


MODELS = {"llava": _llava, "llava-next": _llava_next, "qwen2-vl": _qwen2_vl}


@pytest.mark.parametrize("family", MODELS)
@pytest.mark.parametrize("path", list(_paths()))
def test_decode_steps_sync_no_more_than_the_unpatched_model(family, path):
    if family == "qwen2-vl" and path.startswith("keep+fastv"):
        pytest.skip("Qwen2-VL's vision-side keep and FastV both act inside the LLM input: covered by keep and fastv")
    model, patch, inputs = MODELS[family]()
    model.config.text_config._attn_implementation = "sdpa"
    unpatched, _ = step_syncs(model, inputs, STEPS)
    patch(model, **_paths()[path])
    try:
        patched, _ = step_syncs(model, inputs, STEPS)
    finally:
        vtattn.patch.unpatch(model)
    for step, (mine, theirs) in enumerate(zip(patched, unpatched)):
        extra = [s for s in mine if s not in theirs] if len(mine) > len(theirs) else []
        assert len(mine) <= len(theirs), f"decode step {step + 1}: {len(mine)} host syncs, unpatched " \
                                          f"{len(theirs)}:\n{type(mine)(extra or mine).report()}"


def _static(model):
    generate = model.generate
    model.generate = lambda **kw: generate(**kw, cache_implementation="static")
    return model


@pytest.mark.parametrize("family", MODELS)
def test_static_cache_decode_steps_sync_nothing(family):
    """generate(cache_implementation="static"): the unpatched model's decode steps read nothing on
    the host, and neither do KV compression's on the static CompressedCache the KV stage makes."""
    model, patch, inputs = MODELS[family]()
    patch(model, stages=[vtattn.patch.KVCompress(kv.LookM(0.2, 0.1))])
    steps, _ = step_syncs(_static(model), inputs, STEPS)
    assert not any(steps), "\n".join(s.report() for s in steps if s)


def _static_dropping():
    lookm = kv.LookM(0.2, 0.1)
    return {
        "keep": dict(keep=0.25),
        "fastv": dict(fastv=vtattn.patch.FastV(layer=1, keep=0.25)),
        "visual-exit": dict(visual_exit=vtattn.patch.VisualExit(layer=1)),
        "keep+visual-exit": dict(keep=0.5, visual_exit=vtattn.patch.VisualExit(layer=1)),
        "keep+lookm": dict(keep=0.25, kv=lookm),
        "fastv+lookm": dict(fastv=vtattn.patch.FastV(layer=1, keep=0.25), kv=lookm),
        "visual-exit+lookm": dict(visual_exit=vtattn.patch.VisualExit(layer=1), kv=lookm),
        "keep+fastv+lookm": dict(keep=0.5, fastv=vtattn.patch.FastV(layer=1, keep=0.5), kv=lookm),
        "aim": dict(stages=[vtattn.patch.AIM(retention=(1.0, 0.5))]),
        "sparsevlm": dict(stages=[vtattn.patch.SparseVLM(layers=(0,), scale=3.0)]),
    }


@pytest.mark.parametrize("family", MODELS)
@pytest.mark.parametrize("path", list(_static_dropping()))
def test_static_cache_decode_steps_of_dropping_stages_sync_nothing(family, path):
    """generate(cache_implementation="static") with stages that shorten the sequence (vision-side
    pruning, FastV, VisualExit, SparseVLM, AIM; alone and with KV compression): a decode step reads nothing on the
    host, as the unpatched model's. The cache's length is a device count there: the stages tell the
    cache their prefill filled from a reset one by host counts (filled.Filled), never by reading it."""
    if family != "llava" and path in ("keep+fastv+lookm", "aim"):
        pytest.skip("one vision-side stage per model (Qwen2-VL: keep and FastV both at the LLM input); AIM "
                    "merges one view per image (LLaVA-1.5)")
    model, patch, inputs = MODELS[family]()
    patch(model, **_static_dropping()[path])
    steps, _ = step_syncs(_static(model), inputs, STEPS)
    assert not any(steps), "\n".join(s.report() for s in steps if s)


@pytest.mark.parametrize("path", ["keep", "fastv", "kv-stage"])
def test_decode_steps_do_not_compute_the_image_mask(path):
    """Call.images is computed when a stage first reads it: a decode step's stages read none (a
    per-step cost of ~35 us on CPU, docs/kv.md); a prefill's KV stage alone still finds the image
    tokens (with the vision stage it gets the shortened sequence's)."""
    options = (dict(stages=[vtattn.patch.KVCompress(kv.LookM(0.2, 0.1))]) if path == "kv-stage"
               else _paths()[path])
    model, patch, inputs = MODELS["llava"]()
    patch(model, **options)
    p, widths = model._vtattn_patch, []
    find = p.images
    p.images = lambda ids: widths.append(ids.shape[1]) or find(ids)
    step_syncs(model, inputs, STEPS)
    assert all(w == inputs["input_ids"].shape[1] for w in widths), widths
    assert len(widths) == (path == "kv-stage")


@pytest.mark.parametrize("policy", ["lookm", "decode-h2o", "snapkv", "adakv"])
@pytest.mark.parametrize("padded", [False, True])
def test_prefill_reads_each_keep_set_size_once(policy, padded):
    """A compressed prefill reads its keep-sets' sizes on the host once per prompt (and sample, when
    padded) for a fixed-size policy, whose sizes every later layer on the prompt takes as they are
    (`CompressedCache.sizes`), once per layer for AdaKV (its heads share the budget by score), and at
    most once for the prompt's padding: its own arguments go to the registered ops unchecked (no lse
    or cu_seqlens reads), no boolean indexing."""
    model, patch, inputs = _llava()
    if not padded:  # one sample, one image: nothing padded
        ids, mask = prompts([[36]])
        inputs = dict(input_ids=ids, attention_mask=mask, pixel_values=inputs["pixel_values"][:1])
    policies = {"lookm": kv.LookM(0.2, 0.1), "decode-h2o": kv.DecodeH2O(kv.SnapKV(0.3, window=2), every=2, recent=2),
                "snapkv": kv.SnapKV(0.3, window=2), "adakv": kv.AdaKV(kv.SnapKV(0.3, window=2))}
    patch(model, stages=[vtattn.patch.KVCompress(policies[policy])])
    syncs = [(why, where) for why, where in prefill_syncs(model, inputs)
             if why != "Tensor.numpy" and any(w.startswith("kv/") for w in where)]  # (numpy of a host copy: free)
    B, layers = inputs["input_ids"].shape[0], model.config.text_config.num_hidden_layers
    reads = B * (layers if policy == "adakv" else 1)
    # (+ 1: the padding read, once, where the mask is materialised: padded, or a transformers that builds one anyway)
    assert layers > 1 and reads <= len(syncs) <= reads + 1, "\n".join(f"{why}: {where}" for why, where in syncs)



@pytest.mark.parametrize("padded", [False, True])
def test_prefill_makes_each_prompts_plan_sets_and_layout_once(monkeypatch, padded):
    """The parts of a plan that follow from the prompt alone (LookM's window, text and free counts) are
    made by the first layer that compresses a prompt (once per sample when padded) and reused by the
    others (`CompressedCache.shared`), and layers whose heads keep the same counts share one layout
    (runs and block table); the tokens are those of a cache whose layers make their own."""
    from vtattn.kv.cache import Shared
    model, patch, inputs = _llava()
    if not padded:
        ids, mask = prompts([[36]])
        inputs = dict(input_ids=ids, attention_mask=mask, pixel_values=inputs["pixel_values"][:1])
    made, caches = [], []
    sets, shared = kv.LookM._sets, kv.CompressedCache.shared
    monkeypatch.setattr(kv.LookM, "_sets", lambda self, *a: made.append(1) or sets(self, *a))
    monkeypatch.setattr(kv.CompressedCache, "shared", lambda self, *a: caches.append(self) or shared(self, *a))
    patch(model, kv=kv.LookM(0.2, 0.1))
    run = dict(max_new_tokens=3, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        out = model.generate(**inputs, **run)
    B, layers = inputs["input_ids"].shape[0], model.config.text_config.num_hidden_layers
    assert layers > 1 and len(made) == (B if padded else 1)
    assert len({id(layer.pages.table) for layer in caches[0].layers}) == 1
    made.clear()
    monkeypatch.setattr(kv.CompressedCache, "shared", lambda self, policy, L, modality, sample=-1: Shared(policy, modality))
    with torch.no_grad():
        again = model.generate(**inputs, **run)
    assert len(made) == layers * (B if padded else 1) and torch.equal(out, again)
