"""Host syncs of a whole decode step of every drop-in path, counted inside `generate` by
tests/syncs.py: after the prefill, a patched model's decode step reads nothing on the host that the
unpatched model's step does not (transformers' own step reads the 2-D attention mask once, in
`masking_utils`), on LLaVA, LLaVA-NeXT and Qwen2-VL, ragged left-padded batches included."""
import pytest
import torch

import vtattn
from vtattn import kv
from _vlm import llava, llava_next, prompts, qwen2_vl, qwen2_vl_inputs, PINPOINTS
from syncs import count_syncs

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
    from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches
    model = llava_next()
    sizes = torch.tensor([[50, 90], [84, 30]])
    views = [image_size_to_num_patches(s, PINPOINTS, 42) for s in sizes]
    pixels = torch.randn(2, max(views), 3, 42, 42, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        spans = [len(p) for p in model.model.get_image_features(pixels, sizes).pooler_output]
    ids, mask = prompts([[spans[0]], [spans[1]]])
    return model, vtattn.patch.llava, dict(input_ids=ids, attention_mask=mask, pixel_values=pixels,
                                           image_sizes=sizes)


def _qwen2_vl():
    return qwen2_vl(), vtattn.patch.qwen2_vl, qwen2_vl_inputs([(4, 6), (6, 4)])


MODELS = {"llava": _llava, "llava-next": _llava_next, "qwen2-vl": _qwen2_vl}


def _step_syncs(model, inputs):
    """The syncs of each forward generate runs after the prefill, and the tokens."""
    per_step, active = [], []

    def before(module, args, kwargs):
        active.append(count_syncs())
        per_step.append(active[-1].__enter__())

    def after(module, args, kwargs, out):
        active.pop().__exit__(None, None, None)

    hooks = [model.register_forward_pre_hook(before, with_kwargs=True),
             model.register_forward_hook(after, with_kwargs=True)]
    try:
        with torch.no_grad():
            tokens = model.generate(**inputs, max_new_tokens=STEPS, min_new_tokens=STEPS, do_sample=False,
                                    pad_token_id=0)
    finally:
        for h in hooks:
            h.remove()
    assert len(per_step) == STEPS
    return per_step[1:], tokens


@pytest.mark.parametrize("family", MODELS)
@pytest.mark.parametrize("path", list(_paths()))
def test_decode_steps_sync_no_more_than_the_unpatched_model(family, path):
    if family == "qwen2-vl" and path.startswith("keep+fastv"):
        pytest.skip("Qwen2-VL's vision-side keep and FastV both act inside the LLM input: covered by keep and fastv")
    model, patch, inputs = MODELS[family]()
    model.config.text_config._attn_implementation = "sdpa"
    unpatched, _ = _step_syncs(model, inputs)
    patch(model, **_paths()[path])
    try:
        patched, _ = _step_syncs(model, inputs)
    finally:
        vtattn.patch.unpatch(model)
    for step, (mine, theirs) in enumerate(zip(patched, unpatched)):
        extra = [s for s in mine if s not in theirs] if len(mine) > len(theirs) else []
        assert len(mine) <= len(theirs), f"decode step {step + 1}: {len(mine)} host syncs, unpatched " \
                                          f"{len(theirs)}:\n{type(mine)(extra or mine).report()}"


@pytest.mark.parametrize("family", MODELS)
def test_static_cache_decode_steps_sync_nothing(family):
    """generate(cache_implementation="static"): the unpatched model's decode steps read nothing on
    the host, and neither do KV compression's on the static CompressedCache the KV stage makes."""
    model, patch, inputs = MODELS[family]()
    patch(model, stages=[vtattn.patch.KVCompress(kv.LookM(0.2, 0.1))])
    generate = model.generate
    model.generate = lambda **kw: generate(**kw, cache_implementation="static")
    steps, _ = _step_syncs(model, inputs)
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
    _step_syncs(model, inputs)
    assert all(w == inputs["input_ids"].shape[1] for w in widths), widths
    assert len(widths) == (path == "kv-stage")
