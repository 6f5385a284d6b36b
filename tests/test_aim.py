"""AIM (issue 17 item 2): token merging before the LLM, progressive pruning inside it by PageRank.

The references: `vtattn.reference.aim` (merge, importance, schedule), checked here against naive
float64 loops; the patched models are checked against the unpatched model run layer by layer on
each unpadded sample, with the reference's merge of that sample's features, the reference
importance of each scoring layer's queries and keys (recorded from the reference's own attention
calls) and its cuts, then greedy steps with the prefill's choices (the cuts are made once)."""
import contextlib
import copy

import pytest
import torch

import vtattn
from vtattn.patch.aim import pagerank
from vtattn.reference.aim import aim_importance, aim_keep, aim_merge, aim_retention, merge_counts
from _vlm import (IMAGE, QWEN_IMAGE, capture, llava, llava_inputs, llava_next, llava_next_alone, llava_next_inputs,
                  prompts, qwen2_vl, qwen2_vl_alone, qwen2_vl_inputs, transformers)
from syncs import step_syncs

AIM = vtattn.patch.AIM
STEPS = 3
GREEDY = dict(max_new_tokens=STEPS, min_new_tokens=STEPS, do_sample=False, return_dict_in_generate=True,
              output_logits=True)


# ---- the references against naive loops ---------------------------------------------------------------

def _naive_merge(x, metric, removals, weights):
    """One view at a time, Python lists, float64: ToMe rounds as the release writes them."""
    out = []
    for xv, mv in zip(x.double(), metric.double()):
        toks = [dict(x=xv[i], m=mv[i], index=i, size=1.0) for i in range(len(xv))]
        for r in merge_counts(len(xv), removals):
            if r == 0:
                continue
            a, b = toks[0::2], toks[1::2]
            best = []
            for i, t in enumerate(a):
                sims = [float(torch.dot(t["m"], u["m"]) / (t["m"].norm() * u["m"].norm())) for u in b]
                j = max(range(len(b)), key=lambda j: (sims[j], -j))
                best.append((sims[j], i, j))
            ranked = sorted(best, key=lambda s: (-s[0], s[1]))
            merged, unmerged = ranked[:r], ranked[r:]
            new_b = []
            for j, u in enumerate(b):
                group = [a[i] for _, i, jj in merged if jj == j]
                w = [(t["size"] if weights == "size" else 1.0) for t in [u] + group]
                new_b.append(dict(x=sum(wi * t["x"] for wi, t in zip(w, [u] + group)) / sum(w),
                                  m=sum(wi * t["m"] for wi, t in zip(w, [u] + group)) / sum(w),
                                  index=u["index"], size=u["size"] + sum(t["size"] for t in group)))
            toks = [a[i] for _, i, _ in unmerged] + new_b
        out.append(toks)
    return out


@pytest.mark.parametrize("weights", ["mean", "size"])
@pytest.mark.parametrize("N,removals", [(36, (0.5, 0.0625)), (13, (0.5, 0.25, 3)), (9, (0, 100)), (10, ())])
def test_merge_reference_matches_naive_rounds(N, removals, weights):
    g = torch.Generator().manual_seed(N)
    x, metric = torch.randn(3, N, 5, generator=g), torch.randn(3, N, 7, generator=g)
    merged, index, size = aim_merge(x, metric, removals, weights=weights)
    naive = _naive_merge(x, metric, removals, weights)
    for v, toks in enumerate(naive):
        assert index[v].tolist() == [t["index"] for t in toks]
        assert size[v].tolist() == [t["size"] for t in toks]
        torch.testing.assert_close(merged[v].double(), torch.stack([t["x"] for t in toks]), atol=1e-5, rtol=1e-5)
    original, oi, osize = aim_merge(x, metric, removals, weights=weights, order="original")
    perm = index.argsort(1)
    assert torch.equal(oi, index.gather(1, perm)) and torch.equal(osize, size.gather(1, perm))
    assert torch.equal(original, merged.gather(1, perm[..., None].expand_as(merged)))


def test_merge_counts_follow_the_release():
    assert merge_counts(576, (0.5, 0.0625)) == [288, 36]  # LLaVA-1.5: 252 kept (43.75%)
    assert merge_counts(196, (0.5, 0.25)) == [98, 49]  # a pooled OneVision frame: 49 kept
    assert merge_counts(5, (0.5, 0.5, 0.5)) == [2, 1, 1]  # at most half of what a round starts with


def _naive_importance(q, k, scale, tau, iterations):
    B, Hq, N, _ = q.shape
    out = torch.zeros(B, N, dtype=torch.float64)
    for b in range(B):
        per_head = []
        for h in range(Hq):
            kh = k[b, h // (Hq // k.shape[1])].double()
            m = torch.zeros(N, N, dtype=torch.float64)
            for i in range(N):
                s = (kh[:i + 1] @ q[b, h, i].double()) * scale / tau
                m[i, :i + 1] = torch.softmax(s, 0)
            d = torch.full((N,), 1.0 / N, dtype=torch.float64)
            for _ in range(iterations):
                d = torch.stack([sum(d[i] * m[i, j] for i in range(N)) for j in range(N)])
            per_head.append(d)
        out[b] = torch.stack(per_head).pow(2).mean(0).sqrt()
    return out


@pytest.mark.parametrize("Hq,Hkv,N,tau,iterations", [(4, 2, 11, 0.1, 5), (2, 2, 6, 1.0, 1), (3, 1, 9, 0.5, 3)])
def test_importance_reference_and_kernels_match_naive(Hq, Hkv, N, tau, iterations):
    g = torch.Generator().manual_seed(N)
    q, k = torch.randn(2, Hq, N, 8, generator=g), torch.randn(2, Hkv, N, 8, generator=g)
    naive = _naive_importance(q, k, 8 ** -0.5, tau, iterations)
    ref = aim_importance(q, k, scale=8 ** -0.5, tau=tau, iterations=iterations)
    torch.testing.assert_close(ref.double(), naive, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(pagerank(q, k, 8 ** -0.5, tau, iterations), ref, atol=1e-6, rtol=1e-5)


def test_pagerank_weights_that_underflow_to_zero():
    """Sharp attention (tau 0.1, large logits): some rows' weights underflow to 0 (an LSE of -inf)."""
    g = torch.Generator().manual_seed(3)
    q, k = 6 * torch.randn(1, 2, 12, 8, generator=g), 6 * torch.randn(1, 2, 12, 8, generator=g)
    ref = aim_importance(q, k, scale=8 ** -0.5)
    assert bool((ref == 0).any())
    # tempered logits near 350: one fp32 ulp of an LSE there (3e-5) is a relative 3e-5 of a weight
    torch.testing.assert_close(pagerank(q, k, 8 ** -0.5, 0.1, 5), ref, atol=1e-6, rtol=2e-4)


def test_schedule_and_options():
    rates = aim_retention(32, 13, 0.125)
    assert rates[12] == 1.0 and rates[13] == 0.875 and rates[19] == 0.125 and rates[20:] == (0.0,) * 12
    assert aim_keep(576, 0.875) == 504 and aim_keep(7, 0.5) == 3
    assert AIM(retention=[1, 0.5]).retention == (1.0, 0.5)
    for bad in [dict(retention=(0.5, 0.75)), dict(merge=(1.5,)), dict(metric="x"), dict(tau=0), dict(iterations=0),
                dict(start=-1), dict(order="sorted"), dict(weights="max")]:
        with pytest.raises(ValueError):
            AIM(**bad)


# ---- the layer-by-layer model reference ---------------------------------------------------------------

_SEEN = []


def _recording(module, query, key, value, attention_mask, **kwargs):
    _SEEN.append((query, key, kwargs["scaling"]))
    return transformers.modeling_utils.ALL_ATTENTION_FUNCTIONS["sdpa"](module, query, key, value, attention_mask,
                                                                        **kwargs)


transformers.AttentionInterface.register("aim_test_recording", _recording)


@contextlib.contextmanager
def _recorded(lm):
    previous = lm.config._attn_implementation
    lm.config._attn_implementation = "aim_test_recording"
    _SEEN.clear()
    try:
        yield _SEEN
    finally:
        lm.config._attn_implementation = previous


def _layers(lm, head, h, rope, images, rates, decided=None, merged=None):
    """Last-row logits of the decoder run layer by layer on one sample (h [1, N, C], images [N] bool).
    Before layer K = l + 1 with rates[l] below the previous rate, the visual tokens are cut to
    int(n * rates[l]) by the reference importance of layer l over the tokens there (decided: the
    prefill's choices {K: kept [N0] bool}, extended with the later tokens). Returns (logits, decided)."""
    cos, sin = rope
    N = h.shape[1]
    index = torch.arange(N)
    if merged is not None:  # merge survivors ([N0] bool over the prompt) before layer 0; the rest leave
        merged = torch.cat([merged, merged.new_ones(N - len(merged))])
        h, index = h[:, merged], index[merged]
    n = int((images & merged).sum()) if merged is not None else int(images.sum())
    cuts, last = {}, 1.0
    for l, rate in enumerate(rates[:-1]):
        if rate < last:
            cuts[l + 1], last = rate, rate
    choices = {} if decided is None else {K: torch.cat([kept, kept.new_ones(N - len(kept))])
                                          for K, kept in decided.items()}
    with torch.no_grad(), _recorded(lm) as seen:
        for i, layer in enumerate(lm.layers):
            if i in cuts:
                if i not in choices:
                    keep = torch.zeros(N, dtype=torch.bool)
                    if cuts[i] > 0:
                        q, k, scale = seen[-1]
                        score = aim_importance(q, k, scale=scale)[0]
                        vis = images[index]
                        order = torch.sort(score.masked_fill(~vis, -1.0), descending=True, stable=True).indices
                        keep[index[order[:aim_keep(n, cuts[i])]]] = True
                    choices[i] = keep | ~images
                kept = choices[i][index]
                h, index = h[:, kept], index[kept]
            m = len(index)
            causal = torch.ones(m, m, dtype=torch.bool).tril()[None, None]
            h = layer(h, attention_mask=causal, position_embeddings=(cos[:, index], sin[:, index]))
            h = h[0] if isinstance(h, tuple) else h
        return head(lm.norm(h))[0, -1], {K: c[:N if decided is None else len(decided[K])] for K, c in choices.items()}


def _reference_unmerged(ref, x, image_id, rates):
    """(per-step logits [STEPS, C], tokens, prefill choices) of one unpadded sample, no merge."""
    tokens, logits, decided = [], [], None
    lm = ref.model.language_model
    for _ in range(STEPS):
        ids = torch.cat([x["input_ids"], torch.tensor([tokens], dtype=torch.long)], 1)
        xi = dict(x, input_ids=ids)
        if "mm_token_type_ids" in xi:
            xi["mm_token_type_ids"] = torch.nn.functional.pad(xi["mm_token_type_ids"], (0, len(tokens)))
        h, rope = capture(ref, xi)
        out, choice = _layers(lm, ref.lm_head, h, rope, ids[0] == image_id, rates, decided)
        decided = decided or choice
        logits.append(out)
        tokens.append(int(out.argmax()))
    return torch.stack(logits), torch.tensor(tokens), decided


def _close(a, b):
    torch.testing.assert_close(a, b, atol=3e-5, rtol=1e-5)


def _check(model, batch, alone, reference):
    with torch.no_grad():
        out = model.generate(**batch, **GREEDY)
    for b, x in enumerate(alone):
        logits, tokens, _ = reference(x)
        assert torch.equal(out.sequences[b, -STEPS:], tokens), b
        _close(torch.stack(out.logits)[:, b], logits)
    return out


# ---- LLaVA: merge before the projector, then the cuts (4-layer LLM; rows of 1 and 2 images) -----------

RATES = (0.75, 0.5, 0.0, 0.0)  # cuts before layers 1 (scored at 0), 2 (scored at 1) and 3 (all leave)


def _merged_features(ref, pixels, options):
    """The reference merge of LLaVA's images: [V, K, C] projected."""
    tower = ref.model.vision_tower
    with torch.no_grad():
        hidden = tower(pixels, output_hidden_states=True).hidden_states[-2]
        if options.metric == "features":
            x = ref.model.multi_modal_projector(hidden[:, 1:])
            return aim_merge(x, x, options.merge, weights=options.weights, order=options.order)[0]
        reader = tower.encoder.layers[-1]
        keys = reader.self_attn.k_proj(reader.layer_norm1(hidden))[:, 1:]
        merged = aim_merge(hidden[:, 1:], keys, options.merge, weights=options.weights, order=options.order)[0]
        return ref.model.multi_modal_projector(merged)


def _reference_merged(ref, x, options, rates):
    features = _merged_features(ref, x["pixel_values"], options)
    K = features.shape[1]
    spans = (x["input_ids"] == IMAGE).sum() // 36
    ids = _shorten(x["input_ids"][0].tolist(), 36, K)
    assert ids.count(IMAGE) == K * spans
    lm, embed = ref.model.language_model, ref.get_input_embeddings()
    tokens, logits, decided = [], [], None
    with torch.no_grad():
        for _ in range(STEPS):
            full = torch.tensor(ids + tokens)
            embeds = embed(full).masked_scatter((full == IMAGE)[:, None], features.flatten(0, 1))
            rope = lm.rotary_emb(embeds[None], torch.arange(len(full))[None])
            out, choice = _layers(lm, ref.lm_head, embeds[None], rope, full == IMAGE, rates, decided)
            decided = decided or choice
            logits.append(out)
            tokens.append(int(out.argmax()))
    return torch.stack(logits), torch.tensor(tokens), decided


def _shorten(row, span, K):
    out, run = [], 0
    for t in row:
        run = run + 1 if t == IMAGE else 0
        if t != IMAGE or (run - 1) % span < K:
            out.append(t)
    return out


@pytest.mark.parametrize("options", [
    AIM(retention=RATES),
    AIM(retention=RATES, metric="features", weights="size", order="original", merge=(0.5, 0.25)),
], ids=["release-image", "features-size-original"])
def test_llava_merge_and_cuts_match_the_reference_batched_and_ragged(options):
    model = llava(layers=4)
    ref = copy.deepcopy(model)
    batch, alone = llava_inputs()
    vtattn.patch.llava(model, stages=[options])
    out = _check(model, batch, alone, lambda x: _reference_merged(ref, x, options, RATES))
    merged = _merged_features(ref, batch["pixel_values"], options).shape[1]
    text = int((batch["attention_mask"].bool() & (batch["input_ids"] != IMAGE)).sum(1).max())
    assert out.past_key_values.get_seq_length(3) == text + STEPS - 1  # every visual token left before layer 3
    images = [merged, 2 * merged]
    assert out.past_key_values.get_seq_length(1) - STEPS + 1 == max(
        t + aim_keep(n, 0.75) for t, n in zip((batch["attention_mask"].bool() & (batch["input_ids"] != IMAGE))
                                              .sum(1).tolist(), images))


def test_llava_kept_indices_match_the_reference():
    options = AIM(retention=RATES)
    model = llava(layers=4)
    ref = copy.deepcopy(model)
    batch, alone = llava_inputs()
    vtattn.patch.llava(model, stages=[options])
    with torch.no_grad():
        model(**batch)
    prune = next(s for s in model._vtattn_patch.stages if s.phase == vtattn.patch.core.LAYERS)
    for b, x in enumerate(alone):
        _, _, decided = _reference_merged(ref, x, options, RATES)
        for K in (1, 2):
            kept = prune.drops[K].kept[b]
            real = kept.new_zeros(kept.shape)
            width = len(decided[K])
            real[-width:] = True  # the merged prompt, left-padded in the batch
            assert torch.equal(kept[-width:], decided[K]) and not bool(kept[:-width].any()), (b, K)


def test_nothing_merged_or_pruned_is_the_unpatched_model():
    model = llava(layers=4)
    batch, _ = llava_inputs()
    with torch.no_grad():
        expected = model.generate(**batch, **GREEDY)
        vtattn.patch.llava(model, stages=[AIM(merge=(), retention=(1.0,) * 4)])
        got = model.generate(**batch, **GREEDY)
    assert torch.equal(got.sequences, expected.sequences)
    assert all(torch.equal(a, b) for a, b in zip(got.logits, expected.logits))
    layers = model.model.language_model.layers
    assert not any(layer._forward_pre_hooks for layer in layers)
    vtattn.patch.llava(model, stages=[AIM(retention=RATES)])
    vtattn.patch.unpatch(model)
    assert not any(layer._forward_pre_hooks for layer in layers) and "forward" not in model.__dict__
    assert all(layer.self_attn.config is model.config.text_config for layer in layers)


def test_decode_steps_make_no_host_sync():
    """Decode steps sync no more than the unpatched model's (transformers' own mask check)."""
    model = llava(layers=4)
    model.config.text_config._attn_implementation = "sdpa"
    batch, _ = llava_inputs()
    unpatched, _ = step_syncs(model, batch, 4)
    vtattn.patch.llava(model, stages=[AIM(retention=RATES)])
    for mine, theirs in zip(step_syncs(model, batch, 4)[0], unpatched):
        assert len(mine) <= len(theirs), mine.report()


def test_refusals():
    with pytest.raises(NotImplementedError, match="LLaVA-NeXT"):
        vtattn.patch.llava(llava_next(), stages=[AIM(retention=(1.0, 0.5))])
    with pytest.raises(ValueError, match="M-RoPE"):
        vtattn.patch.qwen2_vl(qwen2_vl(), stages=[AIM(retention=(1.0, 0.5))])
    with pytest.raises(ValueError, match="at layer 0"):
        vtattn.patch.qwen2_vl(qwen2_vl(), stages=[vtattn.patch.VisionSelect(keep=0.5), AIM(
            retention=(1.0, 0.5), metric="features", order="original")])
    with pytest.raises(ValueError, match="metric='features'"):
        vtattn.patch.llava(llava(layer=-1), stages=[AIM(retention=(1.0, 0.5))])
    with pytest.raises(ValueError, match="2 decoder layers"):
        vtattn.patch.llava(llava(), stages=[AIM(retention=(1.0, 0.5, 0.0))])
    model = llava()
    with pytest.raises(NotImplementedError, match="not with VisionSelect"):
        vtattn.patch.llava(model, stages=[AIM(retention=(1.0, 0.5)), vtattn.patch.VisionSelect(keep=0.5)])(
            **dict(zip(("input_ids", "attention_mask"), prompts([[36]]))),
            pixel_values=torch.randn(1, 3, 84, 84))


# ---- LLaVA-NeXT and Qwen2-VL: the cuts alone (merge=()) -----------------------------------------------

def test_llava_next_cuts_match_the_reference():
    model = llava_next()
    ref = copy.deepcopy(model)
    batch = llava_next_inputs(model)
    alone = [llava_next_alone(batch, b) for b in range(2)]
    rates = (0.5, 0.5)
    vtattn.patch.llava(model, stages=[AIM(merge=(), retention=rates)])
    _check(model, batch, alone, lambda x: _reference_unmerged(ref, x, IMAGE, rates))


@pytest.mark.parametrize("adapter", ["qwen2_vl", "llm"])
def test_qwen2vl_cuts_match_the_reference(adapter):
    grids = [(4, 4), (4, 8)]
    model = qwen2_vl()
    ref = copy.deepcopy(model)
    batch = qwen2_vl_inputs(grids)
    alone = [qwen2_vl_alone(batch, grids, b) for b in range(2)]
    rates = (0.6, 0.6)  # 2 layers: one cut, before layer 1, scored at layer 0
    getattr(vtattn.patch, adapter)(model, stages=[AIM(merge=(), retention=rates)])
    _check(model, batch, alone, lambda x: _reference_unmerged(ref, x, QWEN_IMAGE, rates))


def test_qwen2vl_cuts_after_vision_side_keep():
    """VisionSelect's exit at the LLM input (layer 0), then AIM's cut at layer 1 over what it kept."""
    grids = [(4, 4), (4, 8)]
    model = qwen2_vl()
    batch = qwen2_vl_inputs(grids)
    vtattn.patch.qwen2_vl(model, stages=[vtattn.patch.VisionSelect(keep=0.5), AIM(merge=(), retention=(0.5, 0.5))])
    with torch.no_grad():
        out = model.generate(**batch, **GREEDY)
        model(**batch)
    prune = next(s for s in model._vtattn_patch.stages if isinstance(s, vtattn.patch.aim._Prune))
    kept, images = prune.kept, batch["input_ids"] == QWEN_IMAGE
    assert (kept & images).sum(1).tolist() == [min(aim_keep(4, 0.5), 2), min(aim_keep(8, 0.5), 4)]
    assert out.sequences.shape[1] == batch["input_ids"].shape[1] + STEPS


def test_llava_compositions():
    """FastV at layer 1, then AIM's cuts at 2 (scored at 1 over what FastV kept) and 3; LOOK-M at
    budget 1.0 over AIM's layers gives AIM alone; batched = each sample alone."""
    batch, alone = llava_inputs()
    model = llava(layers=4)
    fastv = vtattn.patch.FastV(layer=1, keep=0.5)
    vtattn.patch.llava(model, stages=[AIM(retention=(1.0, 0.25, 0.0, 0.0)), fastv])
    with torch.no_grad():
        out = model.generate(**batch, **GREEDY)
        for b, x in enumerate(alone):
            single = model.generate(**x, **GREEDY)
            assert torch.equal(single.sequences[0, -STEPS:], out.sequences[b, -STEPS:]), b
            _close(torch.stack(single.logits)[:, 0], torch.stack(out.logits)[:, b])
    prune = next(s for s in model._vtattn_patch.stages if isinstance(s, vtattn.patch.aim._Prune))
    with torch.no_grad():
        model(**batch)
    fast = next(s for s in model._vtattn_patch.stages if isinstance(s, vtattn.patch.fastv._FastV)).kept
    assert not bool((prune.drops[2].kept & ~fast).any())  # a token FastV dropped stays out
    with pytest.raises(ValueError, match="already leave this language model at layer 1"):
        vtattn.patch.llava(model, stages=[AIM(retention=(0.5, 0.25, 0.0, 0.0)), fastv])
    with pytest.raises(ValueError, match="at layer 3"):  # AIM's second exit collides: its first comes off too
        vtattn.patch.llava(model, stages=[vtattn.patch.VisualExit(layer=3), AIM(retention=(1.0, 0.5, 0.0, 0.0))])
    assert "_vtattn_drop" not in model.model.language_model.__dict__ and "forward" not in model.__dict__

    options = AIM(retention=RATES)
    with torch.no_grad():
        expected = vtattn.patch.llava(model, stages=[options]).generate(**batch, **GREEDY)
        vtattn.patch.llava(model, stages=[options, vtattn.patch.KVCompress(vtattn.kv.LookM(budget=1.0, recent=0.1))])
        got = model.generate(**batch, **GREEDY)
    assert torch.equal(got.sequences, expected.sequences)
    _close(torch.stack(got.logits), torch.stack(expected.logits))


def _video_inputs(grids):
    """Left-padded Qwen2-VL inputs, row b one video of grid grids[b] = (t, h, w), and each row alone."""
    from _vlm import PAD, QWEN_END, QWEN_START, QWEN_VIDEO
    g = torch.Generator().manual_seed(0)
    rows = []
    for b, (t, h, w) in enumerate(grids):
        text = torch.randint(1, IMAGE, (6 + 2 * b,), generator=g).tolist()
        rows.append(text[:3 + 2 * b] + [QWEN_START] + [QWEN_VIDEO] * (t * h * w // 4) + [QWEN_END] + text[3 + 2 * b:])
    width = max(map(len, rows))
    ids = torch.tensor([[PAD] * (width - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    pixels = torch.randn(sum(t * h * w for t, h, w in grids), 3 * 2 * 14 * 14, generator=g)
    batch = dict(input_ids=ids, attention_mask=mask, pixel_values_videos=pixels, video_grid_thw=torch.tensor(grids),
                 mm_token_type_ids=2 * (ids == QWEN_VIDEO).int())
    first = [0, grids[0][0] * grids[0][1] * grids[0][2]]
    alone = [dict(input_ids=ids[b:b + 1, mask[b].bool()], video_grid_thw=batch["video_grid_thw"][b:b + 1],
                  pixel_values_videos=pixels[first[b]:first[b] + t * h * w],
                  mm_token_type_ids=batch["mm_token_type_ids"][b:b + 1, mask[b].bool()])
             for b, (t, h, w) in enumerate(grids)]
    return batch, alone


def test_qwen2vl_video_cuts_match_the_reference():
    """Video tokens are visual tokens to the cuts (two 2-frame videos of 8 and 16 tokens)."""
    from _vlm import QWEN_VIDEO
    batch, alone = _video_inputs([(2, 4, 4), (2, 4, 8)])
    ids = batch["input_ids"]
    model = qwen2_vl()
    ref = copy.deepcopy(model)
    rates = (0.4, 0.4)
    vtattn.patch.qwen2_vl(model, stages=[AIM(merge=(), retention=rates)])
    _check(model, batch, alone, lambda x: _reference_unmerged(ref, x, QWEN_VIDEO, rates))
    with torch.no_grad():
        model(**batch)
    assert (model._vtattn_patch.kept & (ids == QWEN_VIDEO)).sum(1).tolist() == [aim_keep(8, 0.4), aim_keep(16, 0.4)]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_pagerank_on_cuda(dtype):
    """The kernel form on CUDA (attention's LSE, key_importance with weighted LSEs) against the
    reference on the same inputs in fp32."""
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(2, 8, 300, 64, generator=g), torch.randn(2, 2, 300, 64, generator=g)
    q, k = q.to("cuda", dtype), k.to("cuda", dtype)
    ref = aim_importance(q.float(), k.float(), scale=0.125)
    torch.testing.assert_close(pagerank(q, k, 0.125, 0.1, 5), ref, atol=2e-5, rtol=2e-3)


def _qwen_merge_reference(ref, x, options, rates, token, grid):
    """One unpadded Qwen2-VL sample: layer 0's input captured from the unpatched model, each frame's
    rows merged by the reference (survivors in place, the rest leave), then the cuts."""
    lm = ref.model.language_model
    ids = x["input_ids"][0]
    h, rope = capture(ref, x)
    where = (ids == token).nonzero()[:, 0]
    survivors = torch.zeros(len(ids), dtype=torch.bool)
    survivors[ids != token] = True
    h = h.clone()
    start = 0
    for t, gh, gw in x[grid].tolist():
        for _ in range(t):
            n = gh * gw // 4
            rows = where[start:start + n]
            values, index, _ = aim_merge(h[:, rows], h[:, rows], options.merge, weights=options.weights,
                                         order="original")
            h[0, rows[index[0]]] = values[0]
            survivors[rows[index[0]]] = True
            start += n
    tokens, logits = [], []
    for _ in range(STEPS):
        full = torch.cat([ids, torch.tensor(tokens, dtype=torch.long)])
        xi = dict(x, input_ids=full[None])
        xi["mm_token_type_ids"] = torch.nn.functional.pad(x["mm_token_type_ids"], (0, len(tokens)))
        hi, rope = capture(ref, xi)
        hi = torch.cat([h, hi[:, len(ids):]], 1)
        out, _ = _layers(lm, ref.lm_head, hi, rope, full == token, rates, merged=survivors)
        logits.append(out)
        tokens.append(int(out.argmax()))
    return torch.stack(logits), torch.tensor(tokens), survivors


@pytest.mark.parametrize("weights", ["mean", "size"])
def test_qwen2vl_merge_at_the_input_then_cuts_match_the_reference(weights):
    """Qwen2-VL: each image's LLM-input tokens merge (16 -> 8 -> 6, 32 -> 16 -> 12), survivors keep
    their own M-RoPE positions, then a cut before layer 1 (n counted after the merge)."""
    grids = [(8, 8), (8, 16)]
    model = qwen2_vl()
    ref = copy.deepcopy(model)
    batch = qwen2_vl_inputs(grids)
    alone = [qwen2_vl_alone(batch, grids, b) for b in range(2)]
    options = AIM(merge=(0.5, 0.125), metric="features", order="original", weights=weights, retention=(0.5, 0.5))
    vtattn.patch.qwen2_vl(model, stages=[options])
    _check(model, batch, alone, lambda x: _qwen_merge_reference(ref, x, options, (0.5, 0.5), QWEN_IMAGE,
                                                                "image_grid_thw"))
    with torch.no_grad():
        model(**batch)
    images = batch["input_ids"] == QWEN_IMAGE
    assert (model._vtattn_patch.kept & images).sum(1).tolist() == [aim_keep(6, 0.5), aim_keep(12, 0.5)]


def test_qwen2vl_video_frames_merge_then_cut():
    """Each video frame merges on its own (frames of 8 and 16 tokens -> 4 -> 3 and 8 -> 6)."""
    from _vlm import QWEN_VIDEO
    batch, alone = _video_inputs([(2, 8, 4), (2, 8, 8)])
    model = qwen2_vl()
    ref = copy.deepcopy(model)
    options = AIM(merge=(0.5, 0.125), metric="features", order="original", retention=(0.5, 0.5))
    vtattn.patch.qwen2_vl(model, stages=[options])
    _check(model, batch, alone, lambda x: _qwen_merge_reference(ref, x, options, (0.5, 0.5), QWEN_VIDEO,
                                                                "video_grid_thw"))
    with torch.no_grad():
        model(**batch)
    videos = batch["input_ids"] == QWEN_VIDEO
    assert (model._vtattn_patch.kept & videos).sum(1).tolist() == [aim_keep(6, 0.5), aim_keep(12, 0.5)]
