"""Thread safety of patched models, as a tested property: concurrent patched calls from several
threads on two patched models give what the same calls give one after another, and no lock is
shared across models (the patch layer keeps per-call state per thread (`core.current()`), never in shared config)."""
import sys
import threading
from concurrent.futures import ThreadPoolExecutor

import torch

import vtattn
from vtattn import kv
from vtattn.patch import FastV
from _vlm import llava, prompts, qwen2_vl, qwen2_vl_inputs

GENERATE = dict(max_new_tokens=4, min_new_tokens=4, do_sample=False)


def _models():
    """A LLaVA with all three stages (vision-side pruning, FastV, KV compression) and a Qwen2-VL with
    ViT-scored pruning at the LLM input and KV compression with decode-time eviction."""
    a = vtattn.patch.llava(llava(), keep=0.5, fastv=FastV(layer=1, keep=0.5),
                           kv=kv.LookM(budget=0.5, recent=0.1, merge="pivotal"))
    b = vtattn.patch.qwen2_vl(qwen2_vl(), keep=0.5, kv=kv.DecodeH2O(kv.LookM(budget=0.5, recent=0.1), every=2,
                                                                    recent=2))
    ids, mask = prompts([[36], [36, 36]])
    pixels = torch.randn(3, 3, 84, 84, generator=torch.Generator().manual_seed(1))
    inputs = {"a": dict(input_ids=ids, attention_mask=mask, pixel_values=pixels),
              "b": qwen2_vl_inputs([(4, 4), (4, 8)])}
    return {"a": a, "b": b}, inputs


def _job(models, inputs, name, kind):
    with torch.no_grad():
        if kind == "forward":
            return models[name](**inputs[name]).logits
        return models[name].generate(**inputs[name], **GENERATE)


def test_concurrent_calls_on_two_patched_models_equal_sequential_calls():
    models, inputs = _models()
    jobs = [(name, kind) for name in "ab" for kind in ("forward", "generate")] * 3
    expected = [_job(models, inputs, *job) for job in jobs]
    with ThreadPoolExecutor(max_workers=4) as pool:
        got = list(pool.map(lambda job: _job(models, inputs, *job), jobs))
    for job, e, g in zip(jobs, expected, got):
        assert torch.equal(g, e), job


def test_two_models_run_inside_their_patched_forwards_at_once():
    """Each model's vision encoder waits for the other model's at a barrier: both patched forwards
    must be inside at the same time, which a lock shared across models would forbid (the barrier
    would time out)."""
    models, inputs = _models()
    with torch.no_grad():
        expected = {name: models[name](**inputs[name]).logits for name in "ab"}
    barrier = threading.Barrier(2, timeout=60)

    def wait(*_):
        barrier.wait()

    hooks = [models["a"].model.vision_tower.encoder.layers[0].register_forward_pre_hook(wait),
             models["b"].model.visual.blocks[0].register_forward_pre_hook(wait)]
    try:
        with ThreadPoolExecutor(max_workers=2) as pool:
            got = dict(zip("ab", pool.map(lambda name: _job(models, inputs, name, "forward"), "ab")))
    finally:
        for hook in hooks:
            hook.remove()
    for name in "ab":
        assert torch.equal(got[name], expected[name]), name


def test_the_patch_layer_holds_no_lock():
    lock_types = (type(threading.Lock()), type(threading.RLock()))
    for name, module in list(sys.modules.items()):
        if name.startswith("vtattn.patch") or name == "vtattn.kv.cache":
            assert not any(isinstance(v, lock_types) for v in vars(module).values()), name
