"""Conformance of `attn_implementation="vtattn"` across transformers families (tests/_hf_models.py):
the same outputs as the family's own "sdpa" (or "eager" where SDPA is not exact: Gemma2's softcap,
GPT-OSS's sinks) in fp32 and bf16, on a padded batch, in greedy generate (batch 1, left-padded
batch, static cache), in training backward and under torch.compile; and which attention calls ran
vtattn's kernels (`hf_attention.calls`). Models are made sensitive (q / k projections scaled up),
and a deliberately wrong scale is caught."""
import functools
import warnings

import pytest
import torch

import vtattn
from vtattn.patch import hf_attention

import _hf_models as M  # noqa: E402  (skips the module without transformers)

FAMILIES = {f.name: f for f in M.FAMILIES}
GENERATE = [f.name for f in M.FAMILIES if f.generate]
KERNELS = ("attention", "varlen_attention", "sdpa: a decode row")  # (a decode row wants no LSE: SDPA, the aten kernels)


@pytest.fixture(autouse=True)
def _registered():
    vtattn.patch.register_hf_attention()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tiny configs make transformers talk
        yield


@functools.cache
def _pair(name):
    family = FAMILIES[name]
    model = family.build()
    return M.with_attention(model, family.ref), M.with_attention(model, "vtattn")


@functools.cache
def _refused(name):
    """The refusal of a family that attends without transformers' attention interface (Falcon in
    transformers 5.17), else None."""
    try:
        output(_pair(name)[1], FAMILIES[name].inputs(1))
    except NotImplementedError as e:
        if "attention interface" in str(e):
            return str(e)
        raise
    return None


def models(name, dtype=torch.float32):
    family = FAMILIES[name]
    missing = family.available()
    if missing:
        pytest.skip(missing)
    ref, ours = _pair(name)
    if _refused(name):
        pytest.skip(f"refused by name in transformers {M.transformers.__version__}: {_refused(name)}")
    if dtype != torch.float32:
        ref, ours = M.copy.deepcopy(ref).to(dtype), M.copy.deepcopy(ours).to(dtype)
    return family, ref, ours


def output(model, inputs):
    with torch.no_grad():
        out = model(**inputs)
    for key in ("logits", "logits_per_image", "last_hidden_state"):
        if getattr(out, key, None) is not None:
            return getattr(out, key)
    raise AssertionError(f"no output among logits / logits_per_image / last_hidden_state in {type(out).__name__}")


def error(ours, ref, inputs):
    """max |ours - ref| / max |ref| over the real tokens (padded rows hold what each implementation
    leaves there: nothing reads them)."""
    mask = inputs.get("attention_mask")
    if mask is not None and ours.shape[:2] == mask.shape:
        ours, ref = ours[mask.bool()], ref[mask.bool()]
    return float((ours.float() - ref.float()).abs().max() / ref.float().abs().max())


def close(ours, ref, inputs, tol):
    err = error(ours, ref, inputs)
    assert err <= tol, f"relative error {err:.2e} > {tol:.0e}"


def check_calls(family, calls, padded=False):
    """vtattn's kernels ran (varlen_attention on a padded batch of a kernel family); fallbacks only
    for the family's documented reasons."""
    assert calls, "no attention call went through vtattn"
    assert not (padded and family.kernel) or calls["varlen_attention"], f"no varlen_attention call: {dict(calls)}"
    other = {k: n for k, n in calls.items() if k not in KERNELS}
    if family.kernel:
        assert not other, f"{family.name} fell back: {other}"
    else:
        assert all(any(k.startswith(r) for r in family.notes) for k in other), f"unexpected fallbacks {other}"


@pytest.mark.parametrize("name", FAMILIES)
def test_logits_fp32(name):
    family, ref, ours = models(name)
    for batch in (1, 2):
        inputs = family.inputs(batch)
        with hf_attention.counting() as calls:
            got = output(ours, inputs)
        close(got, output(ref, inputs), inputs, 2e-5)
        check_calls(family, calls, padded="attention_mask" in inputs and batch > 1)


@pytest.mark.parametrize("name", FAMILIES)
def test_logits_bf16(name):
    """In bf16, vtattn's error against the fp32 reference is within twice the reference's own."""
    family, exact, _ = models(name)
    _, ref, ours = models(name, torch.bfloat16)
    inputs = family.inputs(2)
    half = {k: v.to(torch.bfloat16) if torch.is_floating_point(v) else v for k, v in inputs.items()}
    with hf_attention.counting() as calls:
        got = output(ours, half)
    expected = output(exact, inputs)
    assert error(got, expected, inputs) <= 2 * error(output(ref, half), expected, inputs) + 1e-3
    check_calls(family, calls)


def _generate(model, inputs, **kwargs):
    with torch.no_grad():
        return model.generate(**inputs, max_new_tokens=4, do_sample=False, min_new_tokens=4, **kwargs)


@pytest.mark.parametrize("name", GENERATE)
def test_generate(name):
    """Greedy generate, batch 1 and a left-padded batch: the same tokens."""
    family, ref, ours = models(name)
    for batch in (1, 2):
        inputs = family.inputs(batch)
        with hf_attention.counting() as calls:
            got = _generate(ours, inputs)
        assert torch.equal(got, _generate(ref, inputs))
        check_calls(family, calls, padded=batch > 1)


@pytest.mark.parametrize("name", GENERATE)
def test_generate_static_cache(name):
    """A static cache hands attention its whole capacity (no mask on an unpadded prefill)."""
    family, ref, ours = models(name)
    for batch in (1, 2):
        inputs = family.inputs(batch)
        try:
            expected = _generate(ref, inputs, cache_implementation="static")
        except Exception as e:  # noqa: BLE001  (the family's own model fails: Falcon's ALiBi)
            pytest.skip(f"{name} with {family.ref} and a static cache fails: {str(e).splitlines()[0][:100]}")
        with hf_attention.counting() as calls:
            got = _generate(ours, inputs, cache_implementation="static")
        assert torch.equal(got, expected)
        check_calls(family, calls)


def _projection_grads(model):
    return {n: p.grad for n, p in model.named_parameters()
            if p.grad is not None and any(f".{k}." in f".{n}" for k in M.QK_NAMES + ("v_proj", "v", "value", "sinks"))}


@pytest.mark.parametrize("name", ["llama", "mistral", "gemma2", "gpt_oss", "bert", "vit", "t5"])
def test_training_backward(name):
    """model.train() (dropout 0): the q / k / v projections get SDPA's / eager's gradients."""
    family, ref, ours = models(name)
    ref, ours = (M.copy.deepcopy(m).train() for m in (ref, ours))
    inputs = family.inputs(2)
    grads = []
    for model in (ref, ours):
        with hf_attention.counting() as calls:
            out = model(**inputs)
            value = next(getattr(out, k) for k in ("logits", "last_hidden_state") if getattr(out, k, None) is not None)
            mask = inputs.get("attention_mask")
            weight = torch.randn(value.shape, generator=torch.Generator().manual_seed(0))
            if mask is not None and value.shape[:2] == mask.shape:
                weight = weight * mask[..., None]
            (value * weight).sum().backward()
        grads.append(_projection_grads(model))
    check_calls(family, calls)
    assert grads[0].keys() == grads[1].keys() and grads[0]
    for n in grads[0]:
        torch.testing.assert_close(grads[1][n], grads[0][n], atol=1e-5, rtol=1e-4, msg=n)


def _recording(seen):
    """A torch.compile backend: aot_eager, recording the ops of the graph it gets."""
    def backend(gm, example_inputs):
        seen.update(str(node.target) for node in gm.graph.nodes if node.op == "call_function")
        return torch._dynamo.lookup_backend("aot_eager")(gm, example_inputs)
    return backend


def test_compile_fullgraph():
    """torch.compile(fullgraph=True) of the whole model (backend aot_eager, for CI time): the mask
    function returns SDPA's masks while tracing; an unpadded call runs vtattn's op in the graph."""
    family, ref, ours = models("llama")
    torch._dynamo.reset()
    seen = set()
    compiled = torch.compile(ours, fullgraph=True, backend=_recording(seen))
    for inputs in ({"input_ids": family.inputs(1)["input_ids"]}, family.inputs(2)):
        close(output(compiled, inputs), output(ref, inputs), inputs, 2e-5)
    if hasattr(M.transformers.masking_utils, "is_torchdynamo_exporting"):  # skips plain causal masks when tracing
        assert any("vtattn.attention" in op for op in seen), sorted(seen)
    else:  # transformers 5.17 always materialises them: SDPA then runs with the mask
        assert any("scaled_dot_product_attention" in op for op in seen), sorted(seen)


def test_compile_static_cache_generate():
    """generate's compiled decoding (static cache, fullgraph, aot_eager on CPU): its masks are built
    outside the graph (vtattn's lazy masks, traced into SDPA's inside it); the prefill runs eagerly."""
    family, ref, ours = models("mistral")
    torch._dynamo.reset()
    config = M.transformers.CompileConfig(fullgraph=True, backend="aot_eager")
    config._compile_all_devices = True  # compile on CPU too
    inputs = family.inputs(2)
    with hf_attention.counting() as calls:
        got = _generate(ours, inputs, cache_implementation="static", compile_config=config)
    assert torch.equal(got, _generate(ref, inputs, cache_implementation="static"))
    assert calls == {"varlen_attention": 2}  # the eager prefill; decoding steps are compiled (not counted)


def test_wrong_scale_is_caught(monkeypatch):
    """The suite fails on a kernel call with a 2% wrong scale, on both kernel paths."""
    run = hf_attention._run_kernel

    def wrong(call, query, key, value, scaling, *args):
        return run(call, query, key, value, (scaling or query.shape[-1] ** -0.5) * 1.02, *args)

    monkeypatch.setattr(hf_attention, "_run_kernel", wrong)
    for name, batch in (("llama", 1), ("llama", 2), ("gemma2", 2)):
        family, ref, ours = models(name)
        inputs = family.inputs(batch)
        with pytest.raises(AssertionError, match="relative error"):
            close(output(ours, inputs), output(ref, inputs), inputs, 2e-5)


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["llama", "mistral", "gemma2", "gpt_oss", "bert", "llava", "qwen2_vl"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cuda_kernels(name, dtype):
    """On the GPU (CUDA / Triton kernels: varlen with windows, softcap, sinks): within twice SDPA's
    own error against the fp32 reference, on a padded batch, and greedy generate runs."""
    family, exact, _ = models(name)
    ref, ours = (M.copy.deepcopy(m).to("cuda", dtype) for m in _pair(name))
    inputs = family.inputs(2)
    device = {k: v.to("cuda", dtype) if torch.is_floating_point(v) else v.to("cuda") for k, v in inputs.items()}
    with hf_attention.counting() as calls:
        got = output(ours, device).cpu()
    expected = output(exact, inputs)
    assert error(got, expected, inputs) <= 2 * error(output(ref, device).cpu(), expected, inputs) + 1e-3
    check_calls(family, calls)
    if family.generate:
        assert _generate(ours, device).shape == _generate(ref, device).shape
