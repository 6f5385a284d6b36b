"""VAR (issue 17 item 4): visual attention sink redistribution inside the language model.

The reference is the unpatched model run layer by layer on one unpadded sample with its attention
computed here on eager probabilities (an explicit softmax, then the release's rule per head and
row: sinks scaled by p, their (1 - p) share spread over the image's non-sink tokens in proportion
to their attention), sinks from the hidden states entering each layer (prompt tokens only; decode
steps keep the prompt's). The patched model, batched with left padding and ragged image counts, must
give its prefill logits and greedy decode (tokens and logits); p = 1, or no sink, is the unpatched
model. The tiny random models have no massive activations: the tests pick dims and tau from the
unpatched run so that image and text sinks exist, and check that rows are both chosen and not."""
import copy

import pytest
import torch

import vtattn
from _vlm import (IMAGE, QWEN_IMAGE, capture, llava, llava_inputs, llava_next, llava_next_alone, llava_next_inputs,
                  qwen2_vl, qwen2_vl_alone, qwen2_vl_inputs, transformers)
from helpers import cache_name

VAR = vtattn.patch.VAR
STEPS = 3
GREEDY = dict(max_new_tokens=STEPS, min_new_tokens=STEPS, do_sample=False, return_dict_in_generate=True,
              output_logits=True)
REFERENCE = "vtattn_var_reference"
_STATE: dict = {}  # the reference attention's inputs for the layer being run


# ---- the reference ---------------------------------------------------------------------------------

def _rms_phi(h, dims):
    x = h.float()
    x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)
    return x[..., list(dims)].abs().amax(-1)


def _redistribute(P, image, sink, rows, opt, counts):
    """The release's VARProcessor on one sample's probabilities P [H, N, N], per head and row."""
    P = P.clone()
    img_sink, img_rest = image & sink, image & ~sink
    if not bool(img_sink.any()):
        return P
    for h in range(P.shape[0]):
        for i in range(P.shape[1]):
            row = P[h, i]
            on_image = row[image].sum()
            portion = row[img_sink].sum() / (row[image] + 1e-6).sum()
            if not (rows[i] and portion <= opt.rho and on_image >= opt.summ and row[img_rest].sum() > 0):
                continue
            counts["chosen"] += 1
            new = row.clone()
            new[sink] *= opt.p
            budget = row[sink].sum() * (1 - opt.p)
            ratios = torch.where(img_rest, row, 0.0) / row[img_rest].sum()
            P[h, i] = new + budget * ratios
    counts["rows"] += int(rows.sum()) * P.shape[0]
    return P


def _reference_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """Eager attention of one unpadded sample (causal), with VAR in the layers _STATE names."""
    groups = query.shape[1] // key.shape[1]
    key, value = key.repeat_interleave(groups, 1), value.repeat_interleave(groups, 1)
    s = torch.matmul(query, key.transpose(-1, -2)) * scaling
    n = s.shape[-1]
    s = s.masked_fill(~torch.ones(n, n, dtype=torch.bool).tril(), float("-inf"))
    P = torch.softmax(s.float(), dim=-1)
    layer = module.layer_idx
    if layer in _STATE["layers"]:
        P = _redistribute(P[0], _STATE["image"], _STATE["sinks"][layer], _STATE["rows"], _STATE["opt"],
                          _STATE["counts"])[None]
    return torch.matmul(P.to(value.dtype), value).transpose(1, 2).contiguous(), P


transformers.AttentionInterface.register(REFERENCE, _reference_attention)


def _layers(model, ids, prompt, image_id, opt, layers, counts, grad=False):
    """Last-row logits [C] of the decoder run layer by layer with the reference attention on
    ids [N] (prompt tokens first); grad: recorded by autograd."""
    lm = model.model.language_model
    N = ids.shape[0]
    image = (ids == image_id) & (torch.arange(N) < prompt)
    rows = ~image  # prompt rows: text rows; generated rows: all
    h, (cos, sin) = _STATE["h"], _STATE["rope"]
    _STATE.update(image=image, rows=rows, opt=opt, layers=layers, sinks={}, counts=counts)
    previous = lm.config._attn_implementation
    lm.config._attn_implementation = REFERENCE
    try:
        with torch.set_grad_enabled(grad):
            for i, layer in enumerate(lm.layers):
                if i in layers:
                    _STATE["sinks"][i] = (_rms_phi(h[0], opt.dims) > opt.tau) & (torch.arange(N) < prompt)
                h = layer(h, attention_mask=None, position_embeddings=(cos, sin))
                h = h[0] if isinstance(h, tuple) else h
            return model.lm_head(lm.norm(h))[0, -1]
    finally:
        lm.config._attn_implementation = previous


def _reference(model, inputs, image_id, opt, layers, counts):
    """(greedy tokens [STEPS], per-step logits [STEPS, C]) of one unpadded sample."""
    tokens, logits = [], []
    prompt = inputs["input_ids"].shape[1]
    for _ in range(STEPS):
        ids = torch.cat([inputs["input_ids"], torch.tensor([tokens], dtype=torch.long)], 1)
        x = dict(inputs, input_ids=ids)
        if "mm_token_type_ids" in x:
            x["mm_token_type_ids"] = torch.nn.functional.pad(x["mm_token_type_ids"], (0, len(tokens)))
        _STATE["h"], _STATE["rope"] = capture(model, x)
        logits.append(_layers(model, ids[0], prompt, image_id, opt, layers, counts))
        tokens.append(int(logits[-1].argmax()))
    return torch.tensor(tokens), torch.stack(logits)


def _close(a, b):
    torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-5)


def _options(model, batch, layers, **extra):
    """dims and tau for a tiny random model: its two largest RMS-normalised dims entering the VAR
    layers, tau between their typical and top values (so a few tokens are sinks)."""
    lm, got = model.model.language_model, []
    handles = [lm.layers[i].register_forward_pre_hook(
        lambda m, a, k: got.append(a[0] if a else k["hidden_states"]), with_kwargs=True) for i in layers]
    try:
        with torch.no_grad():
            model(**batch)
    finally:
        for handle in handles:
            handle.remove()
    real = batch["attention_mask"].bool()
    x = torch.cat([h[real] for h in got]).float()
    x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)
    dims = tuple(x.abs().amax(0).topk(2).indices.tolist())
    phi = x[:, list(dims)].abs().amax(-1)
    return VAR(dims=dims, tau=float(phi.quantile(0.8)), layers=layers, **extra)


def _check(model, ref, batch, alone, image_id, opt):
    """The patched model's batched greedy generate (tokens and per-step logits) equals each sample's
    reference; the reference chose some rows and left others."""
    with torch.no_grad():
        out = model.generate(**batch, **GREEDY)
    counts = {"chosen": 0, "rows": 0}
    for b, x in enumerate(alone):
        tokens, step_logits = _reference(ref, x, image_id, opt, opt.layers, counts)
        assert torch.equal(out.sequences[b, -STEPS:], tokens), b
        _close(torch.stack(out.logits)[:, b], step_logits)
    assert 0 < counts["chosen"] < counts["rows"], counts
    return out


def _unchanged(model, ref, batch, stages):
    with torch.no_grad():
        expected = ref.generate(**batch, **GREEDY)
        for stage in stages:
            vtattn.patch.auto(model, stages=[stage])
            got = model.generate(**batch, **GREEDY)
            assert torch.equal(got.sequences, expected.sequences)
            _close(torch.stack(got.logits), torch.stack(expected.logits))


# ---- LLaVA (4-layer LLM, VAR in layers 2 and 3 as the release; rows of 1 and 2 images) ----------------

@pytest.mark.parametrize("rho", [0.5, 0.15])
def test_llava_var_matches_the_eager_reference_batched_and_ragged(rho):
    model = llava(layers=4)
    ref = copy.deepcopy(model)
    batch, alone = llava_inputs()
    opt = _options(model, batch, (2, 3), rho=rho)
    vtattn.patch.llava(model, stages=[VAR(dims=opt.dims, tau=opt.tau, rho=rho)])  # layers: 2 .. L-1 by default
    with vtattn.patch.hf_attention.counting() as calls:
        _check(model, ref, batch, alone, IMAGE, opt)
    assert calls["group_attention"] == 2 * (1 + STEPS - 1)


def test_llava_var_with_p_one_or_no_sink_is_the_unpatched_model():
    model = llava(layers=4)
    ref = copy.deepcopy(model)
    batch, _ = llava_inputs()
    opt = _options(model, batch, (2, 3))
    _unchanged(model, ref, batch, [VAR(p=1.0, dims=opt.dims, tau=opt.tau), VAR(dims=opt.dims, tau=1e6)])
    vtattn.patch.unpatch(model)
    with torch.no_grad():  # a text-only prompt runs the unpatched model
        ids = batch["input_ids"].masked_fill(batch["input_ids"] == IMAGE, 5)
        expected = ref(input_ids=ids, attention_mask=batch["attention_mask"]).logits
        vtattn.patch.llava(model, stages=[VAR(dims=opt.dims, tau=opt.tau)])
        assert torch.equal(model(input_ids=ids, attention_mask=batch["attention_mask"]).logits, expected)


def test_llava_var_composes_with_vision_side_keep():
    """FasterVLM's keep=0.5 before the projector, then VAR on the shortened sequence: p = 1 is keep alone,
    p = 0.6 changes the logits (sinks among the kept image tokens)."""
    model = llava(layers=4)
    batch, _ = llava_inputs()
    opt = _options(model, batch, (2, 3))
    keep = vtattn.patch.VisionSelect(keep=0.5, method="cls")
    with torch.no_grad():
        vtattn.patch.llava(model, stages=[keep])
        expected = model(**batch).logits
        vtattn.patch.llava(model, stages=[keep, VAR(p=1.0, dims=opt.dims, tau=opt.tau)])
        _close(model(**batch).logits, expected)
        vtattn.patch.llava(model, stages=[keep, VAR(dims=opt.dims, tau=opt.tau)])
        assert not torch.allclose(model(**batch).logits, expected, atol=1e-4)


# ---- LLaVA-NeXT (2-layer LLM, VAR in both layers) ----------------------------------------------------

def test_llava_next_var_matches_the_eager_reference():
    model = llava_next()
    ref = copy.deepcopy(model)
    batch = llava_next_inputs(model)
    alone = [llava_next_alone(batch, b) for b in range(2)]
    opt = _options(model, batch, (0, 1))
    vtattn.patch.llava(model, stages=[opt])
    _check(model, ref, batch, alone, IMAGE, opt)


# ---- Qwen2-VL (2-layer M-RoPE LLM; images of 4 and 8 tokens) -------------------------------------------

GRIDS = [(4, 4), (4, 8)]


@pytest.mark.parametrize("adapter", ["qwen2_vl", "llm"])
def test_qwen2vl_var_matches_the_eager_reference(adapter):
    model = qwen2_vl()
    ref = copy.deepcopy(model)
    batch = qwen2_vl_inputs(GRIDS)
    alone = [qwen2_vl_alone(batch, GRIDS, b) for b in range(2)]
    opt = _options(model, batch, (0, 1), rho=0.3)
    getattr(vtattn.patch, adapter)(model, stages=[opt])
    _check(model, ref, batch, alone, QWEN_IMAGE, opt)
    _unchanged(model, ref, batch, [VAR(p=1.0, dims=opt.dims, tau=opt.tau, layers=(0, 1))])


# ---- decode, grad, refusals -----------------------------------------------------------------------

def _decode_syncs(model, batch):
    from syncs import count_syncs
    with torch.no_grad():
        out = model(**batch, use_cache=True)
        cache, mask = out.past_key_values, torch.nn.functional.pad(batch["attention_mask"], (0, 1), value=1)
        token = out.logits[:, -1:].argmax(-1)
        with count_syncs() as syncs:
            model(input_ids=token, attention_mask=mask, use_cache=True, **{cache_name(model): cache})
    return syncs


def test_var_decode_step_syncs_no_more_than_the_unpatched_model():
    model = llava(layers=4)
    batch, _ = llava_inputs()
    model.config.text_config._attn_implementation = "sdpa"
    unpatched = _decode_syncs(model, batch)
    vtattn.patch.llava(model, stages=[_options(model, batch, (2, 3))])
    patched = _decode_syncs(model, batch)
    assert len(patched) <= len(unpatched), patched.report()


def test_var_with_grad_gives_the_no_grad_logits_and_the_references_gradients():
    """With autograd on, VAR's layers run group_attention's differentiable reference: the no-grad logits,
    and the language model's weight gradients of the eager reference's (an explicit softmax and the
    release's rule, autograd through both) on a sample of two images, rows redistributed."""
    model = llava(layers=4)
    batch, alone = llava_inputs()
    opt = _options(model, batch, (2, 3))
    x, counts = alone[1], {"chosen": 0, "rows": 0}
    lm = model.model.language_model
    weights = [p for p in lm.layers.parameters() if p.requires_grad]
    _STATE["h"], _STATE["rope"] = capture(model, x)
    ids = x["input_ids"]
    expected = torch.autograd.grad(_layers(model, ids[0], ids.shape[1], IMAGE, opt, (2, 3), counts, grad=True).sum(),
                                   weights)
    assert counts["chosen"] > 0
    vtattn.patch.llava(model, stages=[opt])
    with torch.no_grad():
        no_grad = model(**batch).logits
    logits = model(**batch).logits
    _close(logits, no_grad)
    got = torch.autograd.grad(model(**x).logits[0, -1].sum(), weights)
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, atol=1e-4, rtol=1e-4)


def test_var_options_and_refusals():
    with pytest.raises(ValueError, match="p must lie"):
        VAR(p=1.5)
    with pytest.raises(TypeError, match="tau"):
        VAR(tau="big")
    with pytest.raises(ValueError, match="layers"):
        VAR(layers=(-1,))
    assert VAR(dims=[3, 1, 3]).dims == (1, 3)
    model = llava(layers=4)
    with pytest.raises(ValueError, match="needs dims="):  # a tiny LLM: the release lists no dims for it
        vtattn.patch.llava(model, stages=[VAR()])
    with pytest.raises(ValueError, match="< the hidden size"):
        vtattn.patch.llava(model, stages=[VAR(dims=(999,))])
    with pytest.raises(ValueError, match="< the 4 decoder layers"):
        vtattn.patch.llava(model, stages=[VAR(dims=(0,), layers=(4,))])
    assert not hasattr(model, "_vtattn_patch")
    batch, _ = llava_inputs()
    vtattn.patch.llava(model, stages=[VAR(dims=(0,)), vtattn.patch.FastV(layer=1, keep=0.5)])
    with pytest.raises(NotImplementedError, match="tokens leaving"), torch.no_grad():
        model(**batch)
    vtattn.patch.llava(model, stages=[VAR(dims=(0,))])
    with pytest.raises(NotImplementedError, match="VAR needs a DynamicCache, a StaticCache"), torch.no_grad():
        model(**batch, **{cache_name(model): transformers.EncoderDecoderCache(transformers.DynamicCache(),
                                                                             transformers.DynamicCache())})
    vtattn.patch.llava(model, stages=[VAR(dims=(0,)), vtattn.patch.KVCompress(vtattn.kv.LookM(0.2, 0.1))])
    with pytest.raises(NotImplementedError, match="got CompressedCache"), torch.no_grad():
        model(**batch)


def test_release_dims_for_llama2():
    from vtattn.patch.var import sink_dims
    cfg = transformers.LlamaConfig(hidden_size=4096, num_hidden_layers=32)
    assert sink_dims(cfg, None) == (2533, 1415)
    cfg = transformers.LlamaConfig(hidden_size=5120, num_hidden_layers=40)
    assert sink_dims(cfg, None) == (2100, 4743)
