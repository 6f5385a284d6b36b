"""VisualExit (issue 17 item 3): every image token leaves the language model from decoder layer K on.
The reference is the unpatched model run layer by layer on one unpadded sample (layer 0's inputs
captured from its own forward, the image rows removed before layer K, kept rows keeping their
RoPE tables); the patched model, batched with left padding and ragged image counts, must give its
logits and greedy tokens, hold no image token in the cache of layers >= K, and K = the number of
layers must be the unpatched model. Compositions: vision-side keep= (LLaVA before the projector,
Qwen2-VL at the LLM input), FastV before the exit, and KV compression."""
import copy

import pytest
import torch

import vtattn
from vtattn import kv
from _vlm import (IMAGE, QWEN_IMAGE, capture, eager_attentions, llava, llava_inputs, llava_next, llava_next_alone,
                  llava_next_inputs, qwen2_vl, qwen2_vl_alone, qwen2_vl_inputs, reference_scores, text_config, topk,
                  transformers)

VisualExit = vtattn.patch.VisualExit
STEPS = 4
GREEDY = dict(max_new_tokens=STEPS, min_new_tokens=STEPS, do_sample=False, return_dict_in_generate=True,
              output_logits=True)


# ---- the reference ---------------------------------------------------------------------------------

def _layers(model, h, rope, drops):
    """Last-row logits [C] of the unpatched decoder run layer by layer on one sample: before layer i
    in `drops`, the rows outside drops[i] ([N] bool over the input) leave (RoPE rows follow)."""
    lm, (cos, sin) = model.model.language_model, rope
    index = torch.arange(h.shape[1])
    with torch.no_grad():
        for i, layer in enumerate(lm.layers):
            if i in drops:
                kept = drops[i][index]
                h, index = h[:, kept], index[kept]
            n = len(index)
            causal = torch.ones(n, n, dtype=torch.bool).tril()[None, None]
            h = layer(h, attention_mask=causal, position_embeddings=(cos[:, index], sin[:, index]))
            h = h[0] if isinstance(h, tuple) else h
        return model.lm_head(lm.norm(h))[0, -1]


def _reference(model, inputs, drops):
    """(logits [C], greedy tokens [STEPS], per-step logits [STEPS, C]) of one unpadded sample;
    drops(input_ids) -> {layer: kept [N] bool} for the prompt plus the tokens so far."""
    tokens, logits = [], []
    for _ in range(STEPS):
        ids = torch.cat([inputs["input_ids"], torch.tensor([tokens], dtype=torch.long)], 1)
        x = dict(inputs, input_ids=ids)
        if "mm_token_type_ids" in x:
            x["mm_token_type_ids"] = torch.nn.functional.pad(x["mm_token_type_ids"], (0, len(tokens)))
        logits.append(_layers(model, *capture(model, x), drops(ids[0])))
        tokens.append(int(logits[-1].argmax()))
    return logits[0], torch.tensor(tokens), torch.stack(logits)


def _exit_at(K, image):
    return lambda ids: {K: ids != image}


def _close(a, b):
    torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-5)


def _check(model, ref, batch, alone, drops, prefix_layers=None):
    """The patched model's batched prefill logits and greedy generate (tokens and logits) equal each
    sample's reference; returns the batched generate output."""
    with torch.no_grad():
        out = model.generate(**batch, **GREEDY)
    for b, x in enumerate(alone):
        logits, tokens, step_logits = _reference(ref, x, drops)
        assert torch.equal(out.sequences[b, -STEPS:], tokens), b
        _close(torch.stack(out.logits)[:, b], step_logits)
        _close(step_logits[0], logits)
    return out


def _text_lengths(ids, mask, image):
    return int((mask.bool() & (ids != image)).sum(1).max())


# ---- LLaVA (4-layer LLM; rows of 1 and 2 images of 36 tokens, row 0 left-padded) ----------------------

def _llava(seed=0, hidden=32):
    return llava(seed=seed, layers=4, hidden=hidden)


@pytest.mark.parametrize("K", [0, 2, 3])
def test_llava_exit_matches_the_layer_by_layer_reference_batched_and_ragged(K):
    model = _llava()
    ref = copy.deepcopy(model)
    batch, alone = llava_inputs()
    vtattn.patch.llava(model, visual_exit=VisualExit(layer=K))
    out = _check(model, ref, batch, alone, _exit_at(K, IMAGE))
    ids, mask = batch["input_ids"], batch["attention_mask"]
    assert torch.equal(model._vtattn_patch.kept, mask.bool() & (ids != IMAGE))
    cache, N = out.past_key_values, ids.shape[1]
    for layer in range(4):  # layers >= K cache the text tokens only (the last generated token is not cached)
        want = N if layer < K else _text_lengths(ids, mask, IMAGE)
        assert cache.get_seq_length(layer) == want + STEPS - 1, layer


def test_llava_exit_after_the_last_layer_is_the_unpatched_model():
    model = _llava()
    batch, _ = llava_inputs()
    layers = model.model.language_model.layers
    with torch.no_grad():
        expected = model.generate(**batch, **GREEDY)
        vtattn.patch.llava(model, stages=[VisualExit(layer=4)])
        got = model.generate(**batch, **GREEDY)
        assert torch.equal(got.sequences, expected.sequences)
        assert all(torch.equal(a, b) for a, b in zip(got.logits, expected.logits))
        vtattn.patch.llava(model, visual_exit=VisualExit(layer=4))  # with the tower on vtattn's attention (keep=1.0)
        got = model.generate(**batch, **GREEDY)
    assert torch.equal(got.sequences, expected.sequences)
    _close(torch.stack(got.logits), torch.stack(expected.logits))
    assert model._vtattn_patch.kept is None and not any(layer._forward_pre_hooks for layer in layers)
    vtattn.patch.llava(model, visual_exit=VisualExit(layer=1))
    assert "_vtattn_drop" in model.model.language_model.__dict__  # (pre-hooks only while a prefill runs)
    assert [layer.self_attn.config is model.config.text_config for layer in layers] == [True, False, False, False]
    vtattn.patch.unpatch(model)
    assert not any(layer._forward_pre_hooks for layer in layers)
    assert "_vtattn_drop" not in model.model.language_model.__dict__
    assert all(layer.self_attn.config is model.config.text_config for layer in layers)


def _shortened_ids(ids, per_image):
    """input_ids with each image span cut to its first `per_image` slots, rows re-left-padded."""
    rows = []
    for row in ids.tolist():
        out, run = [], 0
        for t in row:
            run = run + 1 if t == IMAGE else 0
            if t != 0 and run <= per_image:
                out.append(t)
        rows.append(out)
    return rows


def test_llava_exit_composes_with_vision_side_keep():
    """keep=0.5 (method "cls") before the projector, then every kept image token leaves at K = 2."""
    model = _llava()
    ref = copy.deepcopy(model)
    batch, alone = llava_inputs()
    vtattn.patch.llava(model, keep=0.5, method="cls", visual_exit=VisualExit(layer=2))
    # the reference's input: the shortened sequence, with the CLS rule's 18 tokens per image
    attentions, hidden = eager_attentions(model.model.vision_tower, batch["pixel_values"])
    chosen = [topk(s, 18) for s in reference_scores("cls", attentions, 2)]
    with torch.no_grad():
        features = [ref.model.multi_modal_projector(h[1:][k]) for h, k in zip(hidden[-2], chosen)]
    rows = _shortened_ids(batch["input_ids"], 18)
    embed = ref.get_input_embeddings()
    with torch.no_grad():
        out = model.generate(**batch, **GREEDY)
        for b, (row, first) in enumerate(zip(rows, [0, 1])):
            ids = torch.tensor(row)
            tokens, logits = [], []
            for _ in range(STEPS):
                full = torch.cat([ids, torch.tensor(tokens, dtype=torch.long)])
                embeds = embed(full).masked_scatter((full == IMAGE)[:, None],
                                                    torch.cat(features[first:first + (full == IMAGE).sum() // 18]))
                rope = ref.model.language_model.rotary_emb(embeds[None], torch.arange(len(full))[None])
                logits.append(_layers(ref, embeds[None], rope, {2: full != IMAGE}))
                tokens.append(int(logits[-1].argmax()))
            assert torch.equal(out.sequences[b, -STEPS:], torch.tensor(tokens)), b
            _close(torch.stack(out.logits)[:, b], torch.stack(logits))
    assert out.past_key_values.get_seq_length(2) == max(sum(t != IMAGE for t in r) for r in rows) + STEPS - 1


def test_llava_fastv_then_exit():
    """FastV keeps half of the image tokens at layer 1, the rest leave at layer 3: the reference drops
    FastV's tokens (its rule is checked in test_fastv) at 1 and every image token at 3."""
    model = _llava()
    ref = copy.deepcopy(model)
    batch, alone = llava_inputs()
    vtattn.patch.llava(model, fastv=vtattn.patch.FastV(layer=1, keep=0.5), visual_exit=VisualExit(layer=3))
    with torch.no_grad():
        model(**batch)
    kept = model._vtattn_patch.kept  # FastV's (the first stage's)
    with torch.no_grad():
        both = model.generate(**batch, **GREEDY)
    for b, x in enumerate(alone):
        real = batch["attention_mask"][b].bool()
        mine = kept[b][real]
        drops = lambda ids, mine=mine: {1: torch.cat([mine, mine.new_ones(len(ids) - len(mine))]), 3: ids != IMAGE}
        with torch.no_grad():
            single = model.generate(**x, **GREEDY)
        logits, tokens, step_logits = _reference(ref, x, drops)
        assert torch.equal(single.sequences[0, -STEPS:], tokens)
        assert torch.equal(both.sequences[b, -STEPS:], tokens)
        _close(torch.stack(single.logits)[:, 0], step_logits)
        _close(torch.stack(both.logits)[:, b], step_logits)
    text = _text_lengths(batch["input_ids"], batch["attention_mask"], IMAGE)
    lengths = [both.past_key_values.get_seq_length(i) - STEPS + 1 for i in range(4)]
    assert lengths[0] == batch["input_ids"].shape[1] > lengths[1] > lengths[3] == text  # three groups of layers
    with pytest.raises(NotImplementedError, match="FastV at layer 2 reads the whole sequence"):
        vtattn.patch.llava(model, fastv=vtattn.patch.FastV(layer=2, keep=0.5), visual_exit=VisualExit(layer=1))
    assert "forward" not in model.__dict__


@pytest.mark.parametrize("policy", [kv.LookM(budget=1.0, recent=0.1), kv.SnapKV(0.5, window=2)],
                         ids=["lookm-1", "snapkv"])
def test_llava_exit_with_kv_compression(policy):
    """KV compression over the exit: LOOK-M at budget 1.0 gives the exit alone; SnapKV at 0.5
    generates, batched, what each sample does alone, and the layers >= K hold a strict subset of the
    text tokens."""
    batch, alone = llava_inputs()
    model = vtattn.patch.llava(_llava(), visual_exit=VisualExit(layer=2))
    budget = 1.0 if isinstance(policy, kv.LookM) else 0.5
    with torch.no_grad():
        expected = model.generate(**batch, **GREEDY).sequences
        vtattn.patch.llava(model, visual_exit=VisualExit(layer=2), kv=policy)
        out = model.generate(**batch, **GREEDY)
        if budget == 1.0:
            assert torch.equal(out.sequences, expected)
        for b, x in enumerate(alone):
            single = model.generate(**x, **GREEDY).sequences
            assert torch.equal(single[0, -STEPS:], out.sequences[b, -STEPS:]), b
    ids, mask = batch["input_ids"], batch["attention_mask"]
    cache = out.past_key_values
    for b in range(2):
        text = set((mask[b].bool() & (ids[b] != IMAGE)).nonzero()[:, 0].tolist())
        for layer in (2, 3):
            for heads in cache.kept_positions(layer)[b]:
                prompt = {p for p in heads.tolist() if 0 <= p < ids.shape[1]}
                assert prompt <= text and (budget == 1.0) == (prompt == text), (layer, b)


@pytest.mark.gpu
def test_llava_exit_on_cuda_bf16():
    """On CUDA in bf16 (LLM head dim 64): the exit after the last layer gives the unpatched logits,
    and an exit at K = 2 generates a ragged batch whose layers >= K cache the text tokens only."""
    model = _llava(hidden=256).to("cuda", torch.bfloat16)
    batch, _ = llava_inputs()
    batch = {k: v.cuda() for k, v in batch.items()}
    batch["pixel_values"] = batch["pixel_values"].bfloat16()
    ids, mask = batch["input_ids"], batch["attention_mask"]
    with torch.no_grad():
        before = model(**batch).logits.float()
        vtattn.patch.llava(model, stages=[VisualExit(layer=4)])
        after = model(**batch).logits.float()
        real = mask.bool()
        torch.testing.assert_close(after[real], before[real], atol=5e-2, rtol=5e-2)
        vtattn.patch.llava(model, visual_exit=VisualExit(layer=2))
        out = model.generate(**batch, **GREEDY)
    assert out.sequences.shape == (2, ids.shape[1] + STEPS)
    assert out.past_key_values.get_seq_length(2) == _text_lengths(ids, mask, IMAGE) + STEPS - 1


# ---- LLaVA-NeXT (2-layer LLM: base view + crops + newline tokens, all image tokens) -------------------

def test_llava_next_exit_matches_the_reference():
    model = llava_next()
    ref = copy.deepcopy(model)
    batch = llava_next_inputs(model)
    alone = [llava_next_alone(batch, b) for b in range(2)]
    vtattn.patch.llava(model, visual_exit=VisualExit(layer=1))
    out = _check(model, ref, batch, alone, _exit_at(1, IMAGE))
    text = _text_lengths(batch["input_ids"], batch["attention_mask"], IMAGE)
    assert out.past_key_values.get_seq_length(1) == text + STEPS - 1
    with torch.no_grad():
        expected = ref.generate(**batch, **GREEDY).sequences
        vtattn.patch.llava(model, visual_exit=VisualExit(layer=2))
        assert torch.equal(model.generate(**batch, **GREEDY).sequences, expected)


# ---- Qwen2-VL (2-layer M-RoPE LLM; images of 4 and 8 tokens) ------------------------------------------

GRIDS = [(4, 4), (4, 8)]


def _qwen(patch_with):
    model = qwen2_vl()
    ref = copy.deepcopy(model)
    batch = qwen2_vl_inputs(GRIDS)
    alone = [qwen2_vl_alone(batch, GRIDS, b) for b in range(2)]
    return patch_with(model), ref, batch, alone


@pytest.mark.parametrize("adapter", ["qwen2_vl", "llm", "auto"])
def test_qwen2vl_exit_matches_the_reference(adapter):
    model, ref, batch, alone = _qwen(lambda m: getattr(vtattn.patch, adapter)(m, visual_exit=VisualExit(layer=1)))
    out = _check(model, ref, batch, alone, _exit_at(1, QWEN_IMAGE))
    ids, mask = batch["input_ids"], batch["attention_mask"]
    assert out.past_key_values.get_seq_length(0) == ids.shape[1] + STEPS - 1
    assert out.past_key_values.get_seq_length(1) == _text_lengths(ids, mask, QWEN_IMAGE) + STEPS - 1
    with torch.no_grad():
        expected = ref.generate(**batch, **GREEDY).sequences
        vtattn.patch.qwen2_vl(model, visual_exit=VisualExit(layer=2))
        assert torch.equal(model.generate(**batch, **GREEDY).sequences, expected)


def test_qwen2vl_exit_composes_with_vision_side_keep():
    """keep=0.5 (scored in the ViT, tokens leave at the LLM input), then the kept image tokens leave
    at layer 1: the reference drops VisionSelect's tokens (its rule is checked in
    test_patch_qwen2_vl) at 0 and every image token at 1."""
    model, ref, batch, alone = _qwen(lambda m: m)
    for b, x in enumerate(alone):
        vtattn.patch.qwen2_vl(model, keep=0.5)
        with torch.no_grad():
            model(**x)
        mine = model._vtattn_patch.kept[0]
        vtattn.patch.qwen2_vl(model, keep=0.5, visual_exit=VisualExit(layer=1))
        with torch.no_grad():
            single = model.generate(**x, **GREEDY)
        drops = lambda ids, mine=mine: {0: torch.cat([mine, mine.new_ones(len(ids) - len(mine))]),  # noqa: E731
                                        1: ids != QWEN_IMAGE}
        logits, tokens, step_logits = _reference(ref, x, drops)
        assert torch.equal(single.sequences[0, -STEPS:], tokens), b
        _close(torch.stack(single.logits)[:, 0], step_logits)
        n = x["input_ids"].shape[1]
        assert single.past_key_values.get_seq_length(0) == int(mine.sum()) + STEPS - 1
        assert single.past_key_values.get_seq_length(1) == int((x["input_ids"] != QWEN_IMAGE).sum()) + STEPS - 1 < n
    with torch.no_grad():
        both = model.generate(**batch, **GREEDY).sequences
        for b, x in enumerate(alone):
            assert torch.equal(model.generate(**x, **GREEDY).sequences[0, -STEPS:], both[b, -STEPS:]), b


# ---- arguments -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("layer, error", [(-1, ValueError), (2.0, TypeError), (True, TypeError)])
def test_visual_exit_bad_layer(layer, error):
    with pytest.raises(error, match="VisualExit layer"):
        VisualExit(layer=layer)


def test_visual_exit_refusals():
    model = _llava()
    with pytest.raises(ValueError, match="<= the 4 decoder layers"):
        vtattn.patch.llava(model, visual_exit=VisualExit(layer=5))
    with pytest.raises(TypeError, match="visual_exit must be a vtattn.patch.VisualExit"):
        vtattn.patch.llava(model, visual_exit=2)
    with pytest.raises(NotImplementedError, match="sparse_prefill"):
        vtattn.patch.llava(model, visual_exit=VisualExit(layer=1), sparse_prefill=vtattn.sparse.FlexPrefill())
    assert "forward" not in model.__dict__
    with pytest.raises(ValueError, match="image token ids"):
        vtattn.patch.llm(transformers.LlamaForCausalLM(text_config()), visual_exit=VisualExit(layer=1))
    vtattn.patch.llava(model.model, visual_exit=VisualExit(layer=1))  # the inner model, then the outer one
    with pytest.raises(ValueError, match="already"):
        vtattn.patch.llava(model, visual_exit=VisualExit(layer=2))
    vtattn.patch.unpatch(model.model)
    vtattn.patch.auto(model, stages=[VisualExit(layer=1)])
    assert isinstance(model._vtattn_patch.stages[0].options, VisualExit)
