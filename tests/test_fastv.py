"""FastV inside the LLM (vtattn.patch.llava(method="fastv") / fastv=FastV(...)) on a tiny random
LLaVA with a 4-layer LLM: the kept tokens follow the rule computed from eager attentions, the
logits equal the unpatched model run with the pruned tokens removed from layer K on by hand,
generate works with left padding and ragged batches, keep=1.0 and unpatch give the unpatched model."""
import pytest
import torch

import vtattn
from _vlm import (IMAGE, eager, eager_attentions, llava, llava_next, llava_next_inputs, positions, prompts,
                  reference_scores, shortened, topk, transformers)

K = 2
SPANS = [[36], [36, 36]]  # row 0 left-padded, rows keep different numbers of tokens (ragged)


def _model(seed=0, hidden=32):
    return llava(seed=seed, layers=4, hidden=hidden)


def _inputs():
    ids, mask = prompts(SPANS)
    pixels = torch.randn(3, 3, 84, 84, generator=torch.Generator().manual_seed(1))
    return ids, mask, pixels


def _embeds(model, ids, pixels):
    with torch.no_grad():
        features = model.model.get_image_features(pixel_values=pixels, vision_feature_layer=-2,
                                                  vision_feature_select_strategy="default").pooler_output
        embeds = model.get_input_embeddings()(ids)
    return embeds.masked_scatter((ids == IMAGE)[..., None], torch.cat(list(features)))


def _budget(keep, n):
    return n if keep == 1.0 else 0 if keep == 0 else max(1, round(keep * n)) if isinstance(keep, float) else keep


def _reference_kept(model, ids, embeds, mask, keep):
    """FastV's rule from eager attentions of the unpatched LLM: layer K-1, last prompt row, head
    mean, top-k of each sample's image tokens. Returns the kept tokens [B, N] (padding not kept)."""
    lm = model.model.language_model
    with eager(lm), torch.no_grad():
        attentions = lm(inputs_embeds=embeds, attention_mask=mask, output_attentions=True).attentions
    scores = attentions[K - 1][:, :, -1].mean(1)
    kept = mask.bool() & (ids != IMAGE)
    for b in range(len(ids)):
        image = (ids[b] == IMAGE).nonzero()[:, 0]
        kept[b, image[topk(scores[b, image], _budget(keep, len(image)))]] = True
    return kept


def _manual_logits(model, embeds, kept, grad=False):
    """Last-token logits of one unpadded sample [N, C] through the unpatched LLM, the tokens not
    in kept [N] removed from layer K on (kept ones keep their original positions); grad: recorded."""
    lm = model.model.language_model
    h, pos = embeds[None], torch.arange(len(embeds))[None]
    with torch.set_grad_enabled(grad):
        for i, layer in enumerate(lm.layers):
            if i == K:
                h, pos = h[:, kept], pos[:, kept]
            if i in (0, K):
                rope = lm.rotary_emb(h, pos)
                causal = torch.ones(h.shape[1], h.shape[1], dtype=torch.bool).tril()[None, None]
            h = layer(h, attention_mask=causal, position_embeddings=rope, position_ids=pos)
            h = h[0] if isinstance(h, tuple) else h
        return model.lm_head(lm.norm(h))[0, -1]


def _manual_greedy(model, embeds, kept, steps):
    """Greedy tokens of one sample: the manual pipeline re-run on the prompt plus the tokens so far."""
    tokens = []
    for _ in range(steps):
        new = model.get_input_embeddings()(torch.tensor(tokens, dtype=torch.long))
        logits = _manual_logits(model, torch.cat([embeds, new]), torch.cat([kept, kept.new_ones(len(tokens))]))
        tokens.append(int(logits.argmax()))
    return torch.tensor(tokens)


def _close(a, b):
    torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("keep", [0.25, 5, 0.0])
def test_fastv_matches_eager_rule_and_manual_pipeline(keep):
    model = _model()
    ids, mask, pixels = _inputs()
    embeds = _embeds(model, ids, pixels)
    kept = _reference_kept(model, ids, embeds, mask, keep)
    real = mask.bool()
    expected = torch.stack([_manual_logits(model, embeds[b][real[b]], kept[b][real[b]]) for b in range(2)])
    vtattn.patch.llava(model, method="fastv", layer=K, **({"keep": keep} if isinstance(keep, float) else
                                                          {"keep_tokens": keep}))
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, pixel_values=pixels, position_ids=positions(mask))
    assert torch.equal(model._vtattn_patch.kept, kept)
    assert out.logits.shape[1] == int(kept.sum(1).max())  # the sequence shrank from layer K on
    _close(out.logits[:, -1], expected)
    with eager(model.model.language_model), torch.no_grad():  # layers < K keep the model's own attention
        out = model(input_ids=ids, attention_mask=mask, pixel_values=pixels, position_ids=positions(mask))
    _close(out.logits[:, -1], expected)


def test_fastv_gradients_are_the_manual_pipelines():
    """With autograd on (training), the pruned layers run index_attention's differentiable reference: the
    language model's weight gradients of the manual pipeline's (tokens removed from layer K on by hand),
    on the two-image sample."""
    model = _model()
    ids, mask, pixels = _inputs()
    embeds = _embeds(model, ids, pixels)
    kept = _reference_kept(model, ids, embeds, mask, 0.25)
    weights = [p for p in model.model.language_model.parameters()] + [model.lm_head.weight]
    expected = torch.autograd.grad(_manual_logits(model, embeds[1], kept[1], grad=True).sum(), weights,
                                   allow_unused=True)
    vtattn.patch.llava(model, method="fastv", layer=K, keep=0.25)
    logits = model(input_ids=ids[1:], attention_mask=mask[1:], pixel_values=pixels[1:]).logits
    got = torch.autograd.grad(logits[0, -1].sum(), weights, allow_unused=True)
    reached = [(g, e) for g, e in zip(got, expected) if e is not None]  # (the manual embeddings are detached)
    assert len(reached) == len(weights) - 1
    for g, e in reached:
        torch.testing.assert_close(g, e, atol=1e-4, rtol=1e-4)


def test_fastv_generate_batch_left_padding_matches_each_sample_alone():
    model = _model()
    ids, mask, pixels = _inputs()
    kept = _reference_kept(model, ids, _embeds(model, ids, pixels), mask, 0.25)
    options = dict(max_new_tokens=5, do_sample=False)
    vtattn.patch.llava(model, method="fastv", layer=K, keep=0.25)
    with torch.no_grad():
        batch = model.generate(input_ids=ids, attention_mask=mask, pixel_values=pixels, **options)[:, -5:]
        for b, images in enumerate([slice(0, 1), slice(1, 3)]):
            real = mask[b].bool()
            alone = model.generate(input_ids=ids[b:b + 1, real], pixel_values=pixels[images], **options)
            assert torch.equal(alone[0, -5:], batch[b])
            embeds = _embeds(model, ids[b:b + 1, real], pixels[images])[0]
            assert torch.equal(_manual_greedy(model, embeds, kept[b][real], 5), batch[b])


def test_fastv_keep_all_is_identity_and_unpatch_restores():
    model = _model()
    ids, mask, pixels = _inputs()
    inputs = dict(input_ids=ids, attention_mask=mask, pixel_values=pixels)
    layers = model.model.language_model.layers
    configs = [layer.self_attn.config for layer in layers]
    with torch.no_grad():
        before = model(**inputs).logits
        tokens = model.generate(**inputs, max_new_tokens=5, do_sample=False)
        vtattn.patch.llava(model, method="fastv", layer=K, keep=1.0)
        after = model(**inputs).logits
        assert torch.equal(model.generate(**inputs, max_new_tokens=5, do_sample=False), tokens)
        vtattn.patch.llava(model, method="fastv", layer=1, keep=0.5)  # re-patching replaces the stage
        seen = []
        spy = layers[2].register_forward_pre_hook(lambda m, a: seen.append([len(x._forward_pre_hooks) for x in layers]))
        model.generate(**inputs, max_new_tokens=2, do_sample=False)
        assert seen == [[0, 1, 2, 1], [0, 0, 1, 0]]  # the prefill's pre-hooks (+ the spy): none while decoding
        layers[3].mlp.forward = lambda x: 1 / 0
        with pytest.raises(ZeroDivisionError):
            model(**inputs)
        del layers[3].mlp.forward
        spy.remove()
        assert not any(layer._forward_pre_hooks for layer in layers)  # a failed prefill takes its hooks off
        assert vtattn.patch.unpatch(model) is model
        assert "forward" not in model.__dict__ and "_vtattn_patch" not in model.__dict__
        assert not any(layer._forward_pre_hooks for layer in layers)
        assert all(layer.self_attn.config is c for layer, c in zip(layers, configs))
        assert torch.equal(model(**inputs).logits, before)
    real = mask.bool()
    _close(after[real], before[real])


def _shortened_ids(ids, kept_per_image):
    """input_ids in _vlm.shortened's frame: each image span keeps its first slots, rows re-left-padded."""
    rows = []
    for row in ids.tolist():
        out, run = [], 0
        for t in row:
            run = run + 1 if t == IMAGE else 0
            if run <= kept_per_image:
                out.append(t)
        rows.append(out)
    width = max(map(len, rows))
    return torch.tensor([[0] * (width - len(r)) + r for r in rows])


def test_fastv_composes_with_cls():
    model = _model()
    ids, mask, pixels = _inputs()
    attentions, hidden = eager_attentions(model.model.vision_tower, pixels)
    chosen = [topk(s, 18) for s in reference_scores("cls", attentions, 2)]
    with torch.no_grad():
        features = [model.model.multi_modal_projector(h[1:][k]) for h, k in zip(hidden[-2], chosen)]
    embeds, short, _ = shortened(model, ids, mask, [36] * 3, features)
    short_ids = _shortened_ids(ids, 18)
    kept = _reference_kept(model, short_ids, embeds, short, 0.25)
    real = short.bool()
    expected = torch.stack([_manual_logits(model, embeds[b][real[b]], kept[b][real[b]]) for b in range(2)])
    vtattn.patch.llava(model, keep=0.5, method="cls", fastv=vtattn.patch.FastV(layer=K, keep=0.25))
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, pixel_values=pixels, position_ids=positions(mask))
        assert torch.equal(model._vtattn_patch.kept, kept)
        _close(out.logits[:, -1], expected)
        tokens = model.generate(input_ids=ids, attention_mask=mask, pixel_values=pixels, max_new_tokens=4,
                                do_sample=False)[:, -4:]
    for b in range(2):
        assert torch.equal(_manual_greedy(model, embeds[b][real[b]], kept[b][real[b]], 4), tokens[b])


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(method="fastv", layer=0), ValueError, "layer"), (dict(method="fastv", layer=4), ValueError, "layer"),
    (dict(method="fastv", layer=2.0), TypeError, "layer"), (dict(method="fastv", keep=1.5), ValueError, "keep"),
    (dict(method="fastv", keep=-1), ValueError, "keep"), (dict(layer=2), ValueError, "layer"),
    (dict(method="fastv", fastv=vtattn.patch.FastV()), ValueError, "fastv"),
    (dict(fastv=(2, 0.5)), TypeError, "fastv")])
def test_fastv_bad_arguments(kwargs, error, match):
    model = _model()
    with pytest.raises(error, match=match):
        vtattn.patch.llava(model, **kwargs)
    assert "forward" not in model.__dict__
    assert not any(layer._forward_pre_hooks for layer in model.model.language_model.layers)


def test_fastv_text_only_prompt_is_the_unpatched_model():
    """A text-only turn has nothing to prune: forward and generate run as unpatched."""
    model = _model()
    ids, mask = prompts([[], []])
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask).logits
        tokens = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=4, do_sample=False)
        vtattn.patch.llava(model, method="fastv", layer=K, keep=0.5)
        assert torch.equal(model(input_ids=ids, attention_mask=mask).logits, logits)
        assert torch.equal(model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=4, do_sample=False),
                           tokens)


def test_fastv_llava_next():
    """LLaVA-NeXT (crops, newline tokens: all image tokens); K = 1 (layer 0 scores) on a 2-layer LLM."""
    model = llava_next()
    inputs = llava_next_inputs(model)
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    with torch.no_grad():
        before = model(**inputs).logits
        tokens = model.generate(**inputs, max_new_tokens=4, do_sample=False)
        vtattn.patch.llava(model, method="fastv", layer=1, keep=1.0)
        real = mask.bool()
        _close(model(**inputs).logits[real], before[real])
        assert torch.equal(model.generate(**inputs, max_new_tokens=4, do_sample=False), tokens)
        vtattn.patch.llava(model, method="fastv", layer=1, keep=0.3)
        assert model.generate(**inputs, max_new_tokens=4, do_sample=False).shape == (2, ids.shape[1] + 4)


@pytest.mark.gpu
def test_fastv_on_cuda_bf16():
    """keep=1.0 matches the unpatched model and a pruned, ragged batch generates, on CUDA in bf16
    (LLM head dim 64)."""
    model = _model(hidden=256).to("cuda", torch.bfloat16)
    ids, mask, pixels = (t.cuda() for t in _inputs())
    inputs = dict(input_ids=ids, attention_mask=mask, pixel_values=pixels.bfloat16())
    with torch.no_grad():
        before = model(**inputs).logits.float()
        vtattn.patch.llava(model, method="fastv", layer=K, keep=1.0)
        after = model(**inputs).logits.float()
        real = mask.bool()
        torch.testing.assert_close(after[real], before[real], atol=5e-2, rtol=5e-2)
        vtattn.patch.llava(model, keep=0.5, method="cls", fastv=vtattn.patch.FastV(layer=K, keep=0.25))
        out = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    assert out.shape == (2, ids.shape[1] + 4)


def test_fastv_generated_image_token_id_is_text():
    """A decode step whose token is the image token id (sampling can emit it) is an ordinary token,
    as in the unpatched model: generation goes on."""
    class Force(transformers.LogitsProcessor):
        def __init__(self, at):
            self.at = at

        def __call__(self, input_ids, scores):
            if input_ids.shape[1] == self.at:
                scores = torch.full_like(scores, -1e9)
                scores[:, IMAGE] = 0
            return scores

    model = _model()
    ids, mask, pixels = _inputs()
    inputs = dict(input_ids=ids, attention_mask=mask, pixel_values=pixels, max_new_tokens=4, do_sample=False,
                  logits_processor=transformers.LogitsProcessorList([Force(ids.shape[1] + 1)]))
    with torch.no_grad():
        expected = model.generate(**inputs)
        assert (expected[:, -3] == IMAGE).all()
        vtattn.patch.llava(model, method="fastv", layer=K, keep=1.0)
        assert torch.equal(model.generate(**inputs), expected)
        vtattn.patch.llava(model, keep=0.5, method="cls", fastv=vtattn.patch.FastV(layer=K, keep=0.25))
        assert model.generate(**inputs).shape == (2, ids.shape[1] + 4)


def test_fastv_concurrent_calls_from_two_threads():
    """Two threads inside one patched model at once (a barrier in layer 0 holds both there) each get
    the single-thread logits, and unpatch restores every attention module's config."""
    import threading
    model = _model()
    ids, mask, pixels = _inputs()
    inputs = dict(input_ids=ids, attention_mask=mask, pixel_values=pixels)
    layers = model.model.language_model.layers
    configs = [layer.self_attn.config for layer in layers]
    vtattn.patch.llava(model, method="fastv", layer=K, keep=0.25)
    with torch.no_grad():
        expected = model(**inputs).logits
    barrier = threading.Barrier(2, timeout=60)

    def wait(*_):
        barrier.wait()

    hook = layers[0].register_forward_pre_hook(wait)
    results = {}

    def run(name):
        try:
            with torch.no_grad():
                results[name] = model(**inputs).logits
        except Exception as e:  # noqa: BLE001
            results[name] = e

    threads = [threading.Thread(target=run, args=(name,)) for name in "ab"]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    hook.remove()
    for name in "ab":
        assert not isinstance(results[name], Exception), results[name]
        _close(results[name], expected)
    vtattn.patch.unpatch(model)
    assert all(layer.self_attn.config is c for layer, c in zip(layers, configs))


def test_fastv_twice_on_one_language_model_raises():
    """FastV through the inner LlavaModel and again through the outer model would route layers twice."""
    model = _model()
    vtattn.patch.llava(model.model, method="fastv", layer=K, keep=0.5)
    with pytest.raises(ValueError, match="already"):
        vtattn.patch.llava(model, method="fastv", layer=K, keep=0.5)
    assert "forward" not in model.__dict__
    vtattn.patch.unpatch(model.model)
    vtattn.patch.llava(model, method="fastv", layer=K, keep=0.5)
    ids, mask, pixels = _inputs()
    with torch.no_grad():
        assert model(input_ids=ids, attention_mask=mask, pixel_values=pixels).logits.shape[0] == 2


def _kept_positions(cache, layer, b):
    """Each kv head's kept original positions of sample b (the padding of -1 dropped)."""
    pos = cache.kept_positions(layer)[b]
    return [row[row >= 0].tolist() for row in pos]


def test_fastv_with_kv_budget_one_gives_fastv_alone():
    """A CompressedCache that keeps everything under FastV: FastV's tokens, and each layer holds
    what FastV leaves it (all real tokens before layer K, FastV's kept ones from K on) plus the
    decoded tokens, at their original positions."""
    model = _model()
    ids, mask, pixels = _inputs()
    inputs, options = dict(input_ids=ids, attention_mask=mask, pixel_values=pixels), dict(max_new_tokens=5,
                                                                                         do_sample=False)
    with torch.no_grad():
        vtattn.patch.llava(model, method="fastv", layer=K, keep=0.25)
        expected = model.generate(**inputs, **options)
        kept = model._vtattn_patch.kept
        vtattn.patch.llava(model, method="fastv", layer=K, keep=0.25, kv=vtattn.kv.LookM(budget=1.0, recent=0.1))
        out = model.generate(**inputs, **options, return_dict_in_generate=True)
    assert torch.equal(out.sequences, expected)
    cache, N = out.past_key_values, ids.shape[1]
    assert isinstance(cache, vtattn.kv.CompressedCache)
    for layer in range(4):
        for b in range(2):
            want = (mask[b].bool() if layer < K else kept[b]).nonzero()[:, 0].tolist() + [N, N + 1, N + 2, N + 3]
            assert all(heads == want for heads in _kept_positions(cache, layer, b)), (layer, b)


@pytest.mark.parametrize("vision_keep,merge", [(1.0, None), (0.5, "pivotal")])
def test_fastv_with_kv_compresses_the_pruned_layers_and_samples_stay_independent(vision_keep, merge):
    """LOOK-M on top of FastV (and of vision-side pruning): the pruned layers keep a subset of
    FastV's tokens, every text token among them; a padded batch generates what each sample does
    alone."""
    model = vtattn.patch.llava(_model(), keep=vision_keep, fastv=vtattn.patch.FastV(layer=K, keep=0.5),
                               kv=vtattn.kv.LookM(budget=0.2, recent=0.1, merge=merge))
    ids, mask, pixels = _inputs()
    options = dict(max_new_tokens=5, do_sample=False, return_dict_in_generate=True)
    with torch.no_grad():
        batch = model.generate(input_ids=ids, attention_mask=mask, pixel_values=pixels, **options)
        fastv_kept, text = model._vtattn_patch.kept, model._vtattn_patch.kept.clone()
        for b, images in enumerate([slice(0, 1), slice(1, 3)]):
            real = mask[b].bool()
            alone = model.generate(input_ids=ids[b:b + 1, real], pixel_values=pixels[images], **options)
            assert torch.equal(alone.sequences[0, -5:], batch.sequences[b, -5:]), b
    cache = batch.past_key_values
    for b in range(2):
        kept = set(fastv_kept[b].nonzero()[:, 0].tolist())
        for heads in _kept_positions(cache, K, b):
            prompt = [p for p in heads if p < fastv_kept.shape[1]]
            assert set(prompt) < kept  # a strict subset: LOOK-M evicted image tokens too
    held = [int((cache.kept_positions(layer) >= 0).sum()) for layer in range(4)]
    assert held[K] < held[K - 1]  # FastV's and LOOK-M's evictions add up


def test_record_grows_in_place_over_decode_steps():
    """A pruned group's record writes decode tokens into buffers with room: slot S + j holds position
    length + j (written ahead) and the mask's column says whether it is real. index / real equal a
    record built by concatenation, with padding, non-real columns and a two-token step, past two
    growths; while a buffer has room it is the same tensor (no copy per step)."""
    from vtattn.patch.drop import Record
    real = torch.tensor([[False, False, True, True, True], [True, True, True, True, True]])
    index = torch.tensor([[0, 0, 3, 5, 6], [1, 2, 3, 5, 6]])
    record = Record(index, real, 8)
    want_index, want_real, length = index, real, 8
    capacities = set()
    for s in range(40):
        new = 2 if s == 7 else 1
        column = torch.tensor([[1, 0], [0, 1]])[:, :new] if s % 5 == 3 else torch.ones(2, new, dtype=torch.long)
        before = record._index.data_ptr(), record._index.shape[1]
        record.extend(torch.cat([torch.ones(2, length, dtype=torch.long), column], 1), new)
        want_index = torch.cat([want_index, (length + torch.arange(new)).expand(2, new)], 1)
        want_real = torch.cat([want_real, column.bool()], 1)
        length += new
        assert torch.equal(record.index, want_index) and torch.equal(record.real, want_real)
        assert record.length == length and record.slots == want_index.shape[1]
        if record._index.shape[1] == before[1]:
            assert record._index.data_ptr() == before[0]
        capacities.add(record._index.shape[1])
    assert len(capacities) == 3  # grown twice
    with pytest.raises(ValueError, match="mask has"):
        record.extend(torch.ones(2, length, dtype=torch.long), 1)
