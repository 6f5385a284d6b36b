"""CMAI (issue 17 item 5): cross-modality attention inhibition. The reference
(`vtattn.reference.cmai_attention`, eager N x N probabilities) against a float64 naive computation;
the fused form (pass 1 on vtattn's kernels, pass 2 over the text rows) against the reference, under a
cap on the largest tensor; the stage on tiny LLaVA / LLaVA-NeXT / Qwen2-VL / a text LM: batched with
left padding and ragged image counts, prefill and greedy decode give the logits of each sample run
alone with the reference attention in the chosen layers (the whole sequence recomputed each step), the
"off" settings are the unpatched model, decode steps do not sync, bad options raise by name."""
import copy
import importlib
import inspect

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import vtattn
from vtattn.patch import cmai as fused
from vtattn.reference.cmai_attention import cmai_attention
from _vlm import (IMAGE, QWEN_IMAGE, llava, llava_inputs, llava_next, llava_next_alone, llava_next_inputs, prompts,
                  qwen2_vl, qwen2_vl_alone, qwen2_vl_inputs, transformers)
from helpers import Largest, cache_name
from syncs import step_syncs

CMAI = vtattn.patch.CMAI
cmai_step_ref = importlib.import_module("vtattn.reference.cmai_step")  # (the package exports the function)
STEPS = 4
GREEDY = dict(max_new_tokens=STEPS, min_new_tokens=STEPS, do_sample=False, return_dict_in_generate=True,
              output_logits=True)


# ---- the reference against a naive float64 computation ---------------------------------------------

def _naive(q, k, v, images, real, keep, weight, scale):
    """Row by row, head by head, with Python ranking."""
    B, H, N, D = q.shape
    g = H // k.shape[1]
    out = torch.zeros_like(q)
    for b in range(B):
        P = torch.zeros(H, N, N, dtype=q.dtype)
        for h in range(H):
            for i in range(N):
                seen = [j for j in range(i + 1) if real[b, j]]
                if seen:
                    s = torch.stack([q[b, h, i] @ k[b, h // g, j] * scale for j in seen])
                    P[h, i, seen] = torch.softmax(s, 0)
        text = [t for t in range(N) if real[b, t] and not images[b, t]]
        for i in range(N):
            w = torch.ones(N, dtype=q.dtype)
            if i in text:
                cand = [j for j in range(i + 1) if real[b, j] and images[b, j]]
                focus = {j: sum(float(P[h, i, t] * P[h, t, j]) for h in range(H) for t in text) / H for j in cand}
                budget = max(1, round(keep * len(cand))) if cand else 0
                for j in sorted(cand, key=lambda j: (-focus[j], j))[budget:]:
                    w[j] = weight
            for h in range(H):
                p = P[h, i] * w
                if p.sum() > 0:
                    out[b, h, i] = (p / p.sum()) @ v[b, h // g]
    return out


def _inputs(B=3, Hq=4, Hkv=2, N=21, D=8, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, h, N, D, generator=g).to(dtype) for h in (Hq, Hkv, Hkv))
    images = torch.zeros(B, N, dtype=torch.bool)
    images[0, 3:11] = True  # one image after a short prefix
    images[1, 5:8] = True  # two images, text between
    images[1, 12:18] = True
    images[2, 9:14] = True
    real = torch.ones(B, N, dtype=torch.bool)
    real[1, :2] = False  # left padding
    real[2, :4] = False
    return q, k, v, images, real


@pytest.mark.parametrize("keep,weight", [(0.5, 0.0), (0.3, 0.25), (0.9, 0.0), (1.0, 0.0)])
def test_reference_matches_naive_float64(keep, weight):
    q, k, v, images, real = _inputs(B=3, N=19, dtype=torch.float64)
    want = _naive(q, k, v, images, real, keep, weight, 0.4)
    got = cmai_attention(q, k, v, images, real, keep, weight, 0.4)
    torch.testing.assert_close(got, want, atol=1e-10, rtol=1e-10)


def test_reference_off_is_attention():
    q, k, v, images, real = _inputs(dtype=torch.float64)
    want = cmai_attention(q, k, v, images, real, 1.0, 0.0)
    rows = real[:, None, :, None]
    for keep, weight in [(1.0, 0.0), (0.2, 1.0)]:
        torch.testing.assert_close(cmai_attention(q, k, v, images, real, keep, weight) * rows, want * rows)
    assert not torch.allclose(cmai_attention(q, k, v, images, real, 0.5, 0.0) * rows, want * rows)


# ---- the fused form ---------------------------------------------------------------------------------

@pytest.mark.parametrize("chunk", [cmai_step_ref.CHUNK_LOGITS, 300])  # 300: a chunk of one text row at a time
@pytest.mark.parametrize("keep,weight", [(0.5, 0.0), (0.25, 0.1), (1.0, 0.0)])
def test_fused_matches_the_reference(keep, weight, chunk, monkeypatch):
    monkeypatch.setattr(cmai_step_ref, "CHUNK_LOGITS", chunk)
    q, k, v, images, real = _inputs(seed=3)
    q = q.transpose(1, 2).contiguous().transpose(1, 2)  # token-major, as a model's projections give
    got = fused.cmai_attention(q, k, v, images, real, keep, weight, 0.3)
    want = cmai_attention(q, k, v, images, real, keep, weight, 0.3)
    rows = real[:, None, :, None]
    torch.testing.assert_close(got * rows, want * rows, atol=2e-5, rtol=1e-5)


def test_fused_bf16_within_rounding():
    q, k, v, images, real = _inputs(seed=4, dtype=torch.bfloat16)
    got = fused.cmai_attention(q, k, v, images, real, 0.5, 0.0)
    want = cmai_attention(q, k, v, images, real, 0.5, 0.0)
    rows = real[:, None, :, None]
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got * rows, want * rows, atol=3e-2, rtol=3e-2)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_on_cuda_matches_the_reference(dtype):
    """On CUDA (pass 1 on SDPA / the CUDA or Triton kernels, select_tokens on its CUDA kernel), head dim
    64, a chunk of a few rows: the reference's output within the dtype's rounding."""
    q, k, v, images, real = (t.cuda() for t in _inputs(B=3, Hq=4, Hkv=2, N=21, D=64, seed=6))
    q, k, v = (t.to(dtype) for t in (q, k, v))
    got = fused.cmai_attention(q, k, v, images, real, 0.5, 0.0)
    want = cmai_attention(q, k, v, images, real, 0.5, 0.0)
    rows = real[:, None, :, None]
    tol = 2e-5 if dtype == torch.float32 else 3e-2
    torch.testing.assert_close((got * rows).float(), (want * rows).float(), atol=tol, rtol=tol)


@pytest.mark.gpu
def test_llava_on_cuda_decode_does_not_sync():
    """A bf16 LLaVA on CUDA generates with CMAI in every layer, its decode steps syncing no more than
    the unpatched model's."""
    model = llava(layers=4, hidden=256).to("cuda", torch.bfloat16)
    batch, _ = llava_inputs()
    batch = {k: v.cuda() for k, v in batch.items()}
    batch["pixel_values"] = batch["pixel_values"].bfloat16()
    unpatched, _ = step_syncs(model, batch, STEPS)
    vtattn.patch.llava(model, stages=[CMAI(keep=0.3)])
    patched, _ = step_syncs(model, batch, STEPS)
    assert all(len(mine) <= len(theirs) for mine, theirs in zip(patched, unpatched))


def _long(N, text=24):
    """One sample of N tokens: `text` text tokens around one image of N - text tokens, 2 heads."""
    g = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(1, h, N, 16, generator=g) for h in (2, 1, 1))
    images = torch.zeros(1, N, dtype=torch.bool)
    images[0, text // 2:N - text // 2] = True
    return q, k, v, images, torch.ones(1, N, dtype=torch.bool)


def test_fused_stays_under_a_cap_the_n_by_n_path_exceeds(monkeypatch):
    """At N = 3072 (2 heads) the fused form never makes a tensor of N * N elements (one head's
    probabilities): pass 2 holds text rows x (text + image) logits per chunk of rows and [T, I]
    probabilities. The same mode sees the reference's N x N, and a pass 2 left unchunked on a
    text-heavy sequence (T = N - 32)."""
    if vtattn.info()["compiled_kernels"] != "loaded":
        pytest.skip("without vtattn._C pass 1 runs the reference attention (N x N)")
    N = 3072
    cap = N * N
    for text, below in ((24, cap // 50), (N - 32, cap)):
        q, k, v, images, real = _long(N, text)
        with Largest() as seen:
            fused.cmai_attention(q, k, v, images, real, 0.5, 0.0)
        assert seen.largest < below, (text, seen.largest)
    monkeypatch.setattr(cmai_step_ref, "CHUNK_LOGITS", 4 * cap)  # unchunked: 2 heads x 3040 text rows x 3040 text keys
    with Largest() as seen:
        fused.cmai_attention(q, k, v, images, real, 0.5, 0.0)
    assert seen.largest >= cap
    q, k, v, images, real = _long(64, text=8)
    with Largest() as seen:
        cmai_attention(q, k, v, images, real, 0.5, 0.0)
    assert seen.largest >= 64 * 64


# ---- the stage on tiny models: each sample alone, reference attention in the chosen layers ------------

_REF = {}


class _Config:
    """A module's config whose attention implementation is the test's reference."""
    _attn_implementation = "cmai_reference"

    def __init__(self, config):
        object.__setattr__(self, "_config", config)

    def __getattr__(self, name):
        return getattr(self._config, name)


def _reference_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    keep, weight = _REF["options"]
    images = _REF["images"]
    real = torch.ones_like(images)
    out = cmai_attention(query, key, value, images, real, keep, weight, scaling)
    return out.transpose(1, 2), None


def _reference_model(model, options):
    """A copy of `model` whose chosen decoder layers attend with the reference (batch 1, no padding)."""
    transformers.AttentionInterface.register("cmai_reference", _reference_attention)
    ref = copy.deepcopy(model)
    layers = ref.get_decoder().layers
    for i in range(len(layers)) if options.layers is None else options.layers:
        layers[i].self_attn.config = _Config(layers[i].self_attn.config)
    return ref


def _reference(ref, options, x, image, steps=STEPS, frame=lambda ids: ids):
    """(greedy tokens [steps], per-step logits [steps, C]) of one unpadded sample, the whole sequence
    recomputed at each step (generated tokens are text; no end of sequence before `steps` tokens, as
    generate's min_new_tokens). frame: the prompt's ids as the language model sees them (a stage
    before it may shorten the image spans)."""
    tokens, logits = [], []
    eos = ref.generation_config.eos_token_id
    eos = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
    prompt = x["input_ids"]
    _REF["options"] = (options.keep, options.weight)
    for _ in range(steps):
        ids = torch.cat([prompt, torch.tensor([tokens], dtype=torch.long)], 1)
        y = dict(x, input_ids=ids)
        if "mm_token_type_ids" in y:
            y["mm_token_type_ids"] = torch.nn.functional.pad(y["mm_token_type_ids"], (0, len(tokens)))
        _REF["images"] = torch.nn.functional.pad(frame(prompt) == image, (0, len(tokens)))
        with torch.no_grad():
            logits.append(ref(**y, use_cache=False).logits[0, -1])
        tokens.append(int(logits[-1].index_fill(0, torch.tensor(eos, dtype=torch.long), float("-inf")).argmax()))
    return torch.tensor(tokens), torch.stack(logits)


def _check(model, ref, options, batch, alone, image, steps=STEPS, frame=lambda ids: ids):
    with torch.no_grad():
        out = model.generate(**batch, **dict(GREEDY, max_new_tokens=steps, min_new_tokens=steps))
    for b, x in enumerate(alone):
        tokens, logits = _reference(ref, options, x, image, steps, frame)
        assert torch.equal(out.sequences[b, -steps:], tokens), b
        torch.testing.assert_close(torch.stack(out.logits)[:, b], logits, atol=2e-5, rtol=1e-5)
    return out


@pytest.mark.parametrize("options", [CMAI(keep=0.25), CMAI(keep=0.5, weight=0.2, layers=(1, 3))])
def test_llava_matches_the_reference_batched_and_ragged(options):
    model = llava(layers=4)
    ref = _reference_model(model, options)
    batch, alone = llava_inputs()
    with torch.no_grad():
        base = model.generate(**batch, **GREEDY)
    vtattn.patch.llava(model, stages=[options])
    out = _check(model, ref, options, batch, alone, IMAGE)
    assert not torch.allclose(torch.stack(out.logits), torch.stack(base.logits))  # it did inhibit
    attn = model.model.language_model.layers[0].self_attn
    assert vtattn.patch.core.routed(attn) == (options.layers is None)
    vtattn.patch.unpatch(model)
    assert not vtattn.patch.core.routed(attn)


def test_llava_after_vision_side_keep_matches_the_reference():
    """FasterVLM's keep=0.5 before the projector: CMAI inhibits among the kept image tokens (18 of each
    image's 36, in the language model's shorter frame), as the reference on the keep-patched model."""
    model = llava(layers=4)
    options = CMAI(keep=0.25)
    keep = vtattn.patch.VisionSelect(keep=0.5, method="cls")
    ref = _reference_model(model, options)
    vtattn.patch.llava(ref, stages=[keep])
    batch, alone = llava_inputs()

    def frame(ids):  # one sample's: each 36-token image span shortened to 18 tokens
        kept, run = [], 0
        for token in ids[0].tolist():
            run = run + 1 if token == IMAGE else 0
            if run == 0 or (run - 1) % 36 < 18:
                kept.append(token)
        return torch.tensor([kept])

    vtattn.patch.llava(model, stages=[keep])
    with torch.no_grad():
        kept_only = model.generate(**batch, **GREEDY)
    vtattn.patch.llava(model, stages=[keep, options])
    out = _check(model, ref, options, batch, alone, IMAGE, frame=frame)
    assert not torch.allclose(torch.stack(out.logits), torch.stack(kept_only.logits))  # it did inhibit


@pytest.mark.parametrize("cache", ["dynamic", "static"])
def test_beam_search_keeps_each_beams_record(cache):
    """Beam search reorders the cache's rows at each step (`reorder_cache`): the record follows them (a
    beam's text keys, values and P_ti rows are its own), so the beams are those of the whole sequence
    recomputed at each step (use_cache=False: every forward a prefill), scores included."""
    model = llava(layers=4)
    ids, mask = prompts([[36], [36]])  # (one image a prompt: generate expands pixel_values row by row)
    pixels = torch.randn(2, 3, 84, 84, generator=torch.Generator().manual_seed(1))
    batch = dict(input_ids=ids, attention_mask=mask, pixel_values=pixels)
    vtattn.patch.llava(model, stages=[CMAI(keep=0.3)])
    options = dict(GREEDY, max_new_tokens=8, min_new_tokens=8, num_beams=3, num_return_sequences=3,
                   output_scores=True)
    options.pop("output_logits")
    with torch.no_grad():
        want = model.generate(**batch, **options, use_cache=False)
        got = model.generate(**batch, **options, **({"cache_implementation": "static"} if cache == "static" else {}))
    assert torch.equal(got.sequences, want.sequences)
    torch.testing.assert_close(torch.stack(got.scores).nan_to_num(0, 0, 0), torch.stack(want.scores).nan_to_num(0, 0, 0),
                               atol=2e-5, rtol=1e-5)


def test_gradients_are_the_references():
    """With autograd on (the fused form's torch passes; the kept image keys chosen without gradient):
    the language model's weight gradients of the eager reference's, on a sample of two images."""
    model = llava(layers=4)
    options = CMAI(keep=0.25, weight=0.1)
    ref = _reference_model(model, options)
    _, alone = llava_inputs()
    x = alone[1]
    _REF["options"], _REF["images"] = (options.keep, options.weight), x["input_ids"] == IMAGE
    weights = [p for p in ref.model.language_model.layers.parameters()]
    expected = torch.autograd.grad(ref(**x, use_cache=False).logits[0, -1].sum(), weights)
    vtattn.patch.llava(model, stages=[options])
    weights = [p for p in model.model.language_model.layers.parameters()]
    got = torch.autograd.grad(model(**x, use_cache=False).logits[0, -1].sum(), weights)
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, atol=1e-4, rtol=1e-4)


def test_a_prompt_of_image_tokens_only():
    """No text row in the prefill (nothing to inhibit there): the generated tokens are then the text
    rows, inhibited as the reference's."""
    model = llava(layers=4)
    options = CMAI(keep=0.25)
    ref = _reference_model(model, options)
    batch, _ = llava_inputs()
    ids = batch["input_ids"][:1]
    x = dict(input_ids=ids[:, ids[0] == IMAGE], pixel_values=batch["pixel_values"][:1])
    vtattn.patch.llava(model, stages=[options])
    _check(model, ref, options, dict(x, attention_mask=torch.ones_like(x["input_ids"])), [x], IMAGE)


def test_llava_next_matches_the_reference():
    model = llava_next()
    options = CMAI(keep=0.3)
    ref = _reference_model(model, options)
    batch = llava_next_inputs(model)
    alone = [llava_next_alone(batch, b) for b in range(2)]
    vtattn.patch.llava(model, stages=[options])
    _check(model, ref, options, batch, alone, IMAGE)


GRIDS = [(4, 4), (4, 8)]


@pytest.mark.parametrize("adapter", ["qwen2_vl", "llm"])
def test_qwen2_vl_matches_the_reference(adapter):
    model = qwen2_vl()
    options = CMAI(keep=0.4, layers=(1,))
    ref = _reference_model(model, options)
    batch = qwen2_vl_inputs(GRIDS)
    alone = [qwen2_vl_alone(batch, GRIDS, b) for b in range(2)]
    getattr(vtattn.patch, adapter)(model, stages=[options])
    _check(model, ref, options, batch, alone, QWEN_IMAGE)


def test_decode_steps_write_only_their_rows_into_kept_buffers(monkeypatch):
    """The text lists and each hooked layer's record (text keys / values, P_ti) grow in capacity
    buffers: over 11 decode steps from 8 text entries (capacity 16 after the first step, 32 after the
    ninth) each buffer moves once, where copying the record at every step (torch.cat, a fresh P_ti)
    moves it at every step; the greedy tokens and logits are still the reference's."""
    steps = 12
    model = llava(layers=4)
    options = CMAI(keep=0.3, layers=(0, 2))
    ref = _reference_model(model, options)
    batch, alone = llava_inputs()
    inhibit, seen = fused.inhibit, {}  # per hooked layer's record: its buffers' storages, call by call

    def spy(q_rows, key, value, focus, layer, *args):
        out = inhibit(q_rows, key, value, focus, layer, *args)
        held = (focus.text, focus.text_ok, layer.k_t.filled, layer.v_t.filled, layer.p_ti.filled)
        assert all(t.shape[-2 if t.dim() == 4 else 1] == focus.text.shape[1] for t in held)
        seen.setdefault(layer, []).append([t.untyped_storage().data_ptr() for t in held])
        return out

    monkeypatch.setattr(fused, "inhibit", spy)
    vtattn.patch.llava(model, stages=[options])
    _check(model, ref, options, batch, alone, IMAGE, steps)
    assert batch["input_ids"].ne(IMAGE).logical_and(batch["attention_mask"].bool()).sum(1).max() == 8
    assert len(seen) == 2
    for calls in seen.values():
        assert len(calls) == steps  # the prefill, then steps - 1 decode steps
        decode = calls[1:]
        for k in range(5):
            moves = sum(a[k] != b[k] for a, b in zip(decode, decode[1:]))
            assert moves == 1, (k, moves)


def test_off_is_the_unpatched_model():
    model = llava(layers=4)
    batch, _ = llava_inputs()
    attn = model.model.language_model.layers[1].self_attn
    with torch.no_grad():
        expected = model.generate(**batch, **GREEDY)
        for options in (CMAI(keep=1.0), CMAI(keep=0.3, weight=1.0)):
            vtattn.patch.llava(model, stages=[options])
            assert not vtattn.patch.core.routed(attn)
            got = model.generate(**batch, **GREEDY)
            assert torch.equal(got.sequences, expected.sequences)
            assert all(torch.equal(a, b) for a, b in zip(got.logits, expected.logits))
            vtattn.patch.unpatch(model)


def test_text_only_prompt_is_the_unpatched_model():
    model = llava(layers=4)
    ids, mask = prompts([[], []])
    with torch.no_grad():
        expected = model.generate(input_ids=ids, attention_mask=mask, **GREEDY)
        vtattn.patch.llava(model, stages=[CMAI(keep=0.2)])
        got = model.generate(input_ids=ids, attention_mask=mask, **GREEDY)
    assert torch.equal(got.sequences, expected.sequences)


class _Calls(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(func)
        return func(*args, **(kwargs or {}))


def _prefill_and_step(model, batch, grad):
    """The prefill, then one decode step's logits and the ops it dispatched."""
    with torch.set_grad_enabled(grad):
        out = model(**batch, use_cache=True)
        ids = out.logits[:, -1:].argmax(-1)
        mask = torch.cat([batch["attention_mask"], torch.ones_like(ids)], 1)
        name = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
        with _Calls() as calls:
            step = model(input_ids=ids, attention_mask=mask, **{name: vtattn.patch.core.output_cache(out)})
    return step.logits.detach(), [str(f) for f in calls.ops]


def test_decode_steps_run_one_cmai_step_a_hooked_layer_on_each_backend():
    """A decode step's pass 2 is one `cmai_step` call per hooked layer (its C++ kernel on the CPU:
    one op where the torch form ran ~140), and its backends and the differentiable form (a step with
    grad on: the model's weights require grad) decode alike, logits within fp32 rounding."""
    model = llava(layers=4)
    batch, _ = llava_inputs()
    vtattn.patch.llava(model, stages=[CMAI(keep=0.3, layers=(1, 3))])
    want, ops = _prefill_and_step(model, batch, grad=False)
    assert ops.count("vtattn_C.cmai_step.default") == 2, ops
    for backend, grad in (("torch", False), (None, True)):
        with vtattn.use_backend(backend):
            got, ops = _prefill_and_step(model, batch, grad)
        assert not any("cmai_step" in op for op in ops), ops
        torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-5)


def test_decode_steps_sync_no_more_than_the_unpatched_model():
    model = llava(layers=4)
    batch, _ = llava_inputs()
    unpatched, _ = step_syncs(model, batch, STEPS)
    vtattn.patch.llava(model, stages=[CMAI(keep=0.3)])
    patched, _ = step_syncs(model, batch, STEPS)
    for step, (mine, theirs) in enumerate(zip(patched, unpatched)):
        assert len(mine) <= len(theirs), f"decode step {step + 1}: {len(mine)} syncs, unpatched {len(theirs)}:\n" \
                                          f"{mine.report()}"


@pytest.mark.parametrize("kwargs,error,name", [
    (dict(keep=0.0), ValueError, "keep"), (dict(keep=1.5), ValueError, "keep"), (dict(keep="half"), TypeError, "keep"),
    (dict(keep=True), TypeError, "keep"), (dict(weight=-0.1), ValueError, "weight"),
    (dict(weight=2.0), ValueError, "weight"), (dict(weight=None), TypeError, "weight"),
    (dict(layers=()), ValueError, "layers"), (dict(layers=(1, 1)), ValueError, "layers"),
    (dict(layers=(-1,)), ValueError, "layers"), (dict(layers=3), ValueError, "layers"),
])
def test_bad_options_raise_naming_the_argument(kwargs, error, name):
    with pytest.raises(error, match=name):
        CMAI(**kwargs)


def test_install_refusals():
    model = llava(layers=4)
    with pytest.raises(ValueError, match="layers"):
        vtattn.patch.llava(model, stages=[CMAI(layers=(4,))])
    assert not hasattr(model, "_vtattn_patch")
    lm = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, vocab_size=128))
    with pytest.raises(ValueError, match="image_token_id"):
        vtattn.patch.llm(lm, stages=[CMAI()])
    vtattn.patch.llava(model, stages=[CMAI(keep=0.5)])
    batch, _ = llava_inputs()
    other = transformers.EncoderDecoderCache(transformers.DynamicCache(), transformers.DynamicCache())
    with pytest.raises(NotImplementedError, match="CMAI needs a DynamicCache, a StaticCache"), torch.no_grad():
        model(**batch, **{cache_name(model): other})
    assert CMAI(layers=range(2)).layers == (0, 1) and CMAI(keep=1).keep == 1.0


@pytest.mark.parametrize("extra,match", [(dict(fastv=vtattn.patch.FastV(layer=1, keep=0.5)), "leaving"),
                                         (dict(kv=vtattn.kv.SnapKV(0.5)), "CompressedCache")])
def test_compositions_it_refuses(extra, match):
    model = llava(layers=4)
    batch, _ = llava_inputs()
    stages = [vtattn.patch.KVCompress(extra["kv"])] if "kv" in extra else [extra["fastv"]]
    vtattn.patch.llava(model, stages=stages + [CMAI(keep=0.5)])
    with pytest.raises(NotImplementedError, match=match), torch.no_grad():
        model.generate(**batch, max_new_tokens=2)
