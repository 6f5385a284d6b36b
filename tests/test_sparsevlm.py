"""SparseVLM (issue 17 item 1). The reference (vtattn/reference/sparsevlm.py) is checked against a
float64 naive computation; the patched models (tiny LLaVA, LLaVA-NeXT, Qwen2-VL; batched, left-padded,
ragged image counts) against the unpatched model run layer by layer on each unpadded sample, with the
reference's rule applied at every pruning layer on eager attention probabilities: the same kept
tokens, recycled slots and merged rows, prefill logits and greedy tokens. A rule that deletes one
token per layer and recycles it as itself is the unpatched model; decode steps read nothing on the
host; composition with vision-side keep and KV compression."""
import copy

import pytest
import torch

import vtattn
from vtattn import kv
from vtattn.patch.sparsevlm import _cluster
from vtattn.reference import sparsevlm as ref
from _vlm import (IMAGE, PAD, PINPOINTS, QWEN_IMAGE, capture, eager, llava, llava_next, qwen2_vl, qwen2_vl_alone,
                  qwen2_vl_inputs)
from helpers import Largest
from syncs import step_syncs

SparseVLM = vtattn.patch.SparseVLM
STEPS = 4
GREEDY = dict(max_new_tokens=STEPS, min_new_tokens=STEPS, do_sample=False, return_dict_in_generate=True,
              output_logits=True)


def _close(a, b):
    torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-5)


# ---- the reference against a naive float64 computation ------------------------------------------------

def _naive_rank(m):
    s = torch.linalg.svdvals(m.double())
    return int((s > s.max() * max(m.shape) * torch.finfo(torch.float32).eps).sum()) if len(s) else 0


def _naive_cluster(x, k):
    x = x.double()
    n, C = x.shape
    d = [[float(((x[i] - x[j]) ** 2).sum().sqrt()) / C ** 0.5 for j in range(n)] for i in range(n)]
    dens = [torch.tensor(sorted(row)[:k]).pow(2).mean().neg().exp().item() for row in d]
    dmax = max(max(row) for row in d)
    parent = [min([d[i][j] for j in range(n) if dens[j] > dens[i] or (dens[j] == dens[i] and j < i)], default=dmax)
              for i in range(n)]
    score = [p * q for p, q in zip(parent, dens)]
    centers = sorted(range(n), key=lambda i: (-score[i], i))[:k]
    assign = [centers.index(i) if i in centers else min(range(k), key=lambda c: (d[i][centers[c]], c))
              for i in range(n)]
    return centers, assign


def test_cluster_matches_naive():
    g = torch.Generator().manual_seed(0)
    for n, k in [(1, 1), (5, 1), (12, 2), (30, 4)]:
        x = torch.randn(n, 8, generator=g)
        x[n // 2] = x[0]  # a tie in density
        centers, assign = ref.cluster(x, k)
        want_c, want_a = _naive_cluster(x, k)
        assert centers.tolist() == want_c and assign.tolist() == want_a, (n, k)


def _random_layer(L, H, g):
    logits = torch.randn(H, L, L, generator=g, dtype=torch.float64)
    logits = logits.masked_fill(torch.ones(L, L, dtype=torch.bool).triu(1), float("-inf"))
    return logits.softmax(-1).float()


@pytest.mark.parametrize("scale,bias,recycle", [(2.0, 1.0, 0.3), (13.5, 0.0, 0.5), (0.4, -1.0, None), (50.0, 0, 0.3)])
def test_select_matches_naive(scale, bias, recycle):
    g = torch.Generator().manual_seed(1)
    L, H = 40, 4
    probs = _random_layer(L, H, g)
    visual = torch.zeros(L, dtype=torch.bool)
    visual[3:29] = True
    raters = torch.zeros(L, dtype=torch.bool)
    raters[[30, 33, 34, 37, 39]] = True
    probs[:, 37] = probs[:, 33]  # two equal rater rows: the rank drops to 4
    hidden = torch.randn(L, 16, generator=g)
    got = ref.select(probs, raters, visual, hidden, scale=scale, bias=bias, recycle=recycle, clusters=0.3)
    rel = probs.double().mean(0)[raters][:, visual]
    assert _naive_rank(rel.float()) == 4
    scores = rel.mean(0)
    V = int(visual.sum())
    k = max(0, min(int(4 * scale + bias), V - 1))
    order = sorted(range(V), key=lambda j: (-float(scores[j]), j))
    where = visual.nonzero()[:, 0]
    assert int(got["count"]) == k
    torch.testing.assert_close(got["scores"][visual].double(), scores)
    assert got["kept"].nonzero()[:, 0].tolist() == sorted(where[order[:k]].tolist())
    deleted = order[k:]
    if recycle is None:
        assert not got["centers"].any()
        return
    r = min(int(len(deleted) * recycle) + 1, len(deleted))
    recycled = sorted(where[deleted[:r]].tolist())
    centers, assign = _naive_cluster(hidden[recycled], min(int(r * 0.3) + 1, r))
    assert got["centers"].nonzero()[:, 0].tolist() == sorted(recycled[c] for c in centers)
    for c, center in enumerate(centers):
        members = [recycled[i] for i, a in enumerate(assign) if a == c]
        torch.testing.assert_close(got["merged"][recycled[center]].double(), hidden[members].double().mean(0))


def test_raters_match_naive():
    g = torch.Generator().manual_seed(2)
    embeds = torch.randn(20, 8, generator=g)
    images, text = torch.zeros(20, dtype=torch.bool), torch.zeros(20, dtype=torch.bool)
    images[2:10], text[11:20] = True, True
    v, t = embeds[images].double(), embeds[text].double()
    m = torch.stack([(v[i] @ t.T).softmax(0) for i in range(len(v))]).mean(0)
    want = (text.nonzero()[:, 0])[m > 1 / len(t)]
    assert ref.raters(embeds, images, text).nonzero()[:, 0].tolist() == want.tolist()
    one = torch.zeros(20, dtype=torch.bool)
    one[15] = True  # a single text token: its share is the mean, nobody exceeds it: it rates anyway
    assert ref.raters(embeds, images, one).nonzero()[:, 0].tolist() == [15]


def test_batched_cluster_matches_the_reference_per_sample():
    g = torch.Generator().manual_seed(3)
    n, k = torch.tensor([7, 1, 15]), torch.tensor([2, 1, 3])
    x = torch.randn(3, 15, 6, generator=g)
    centers, merged = _cluster(x, n, k)
    for b in range(3):
        c, assign = ref.cluster(x[b, :n[b]], int(k[b]))
        assert centers[b, :k[b]].tolist() == c.tolist() and (centers[b, k[b]:] == -1).all()
        for j in range(int(k[b])):
            _close(merged[b, j], x[b, :n[b]][assign == j].mean(0))


def _score_case(B=3, Hq=4, Hkv=2, M=50, D=16, seed=4):
    """Random attention inputs over M slots: sample b has pads[b] padding slots, then text, an image,
    and a text tail holding its raters."""
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, h, M, D, generator=g) for h in (Hq, Hkv, Hkv))
    pads, tails = [0, 5, 9], [9, 6, 12][:B]
    slot = torch.arange(M)
    real = slot >= torch.tensor(pads[:B])[:, None]
    visual = real & (slot >= torch.tensor(pads[:B])[:, None] + 3) & (slot < M - torch.tensor(tails)[:, None] - 1)
    raters = (slot >= M - torch.tensor(tails)[:, None]) & (torch.rand(B, M, generator=g) < 0.5)
    raters[:, -1] = True
    return q, k, v, raters, visual, real, max(tails)


@pytest.mark.parametrize("scale,bias", [(3.0, 1.0), (13.5, 0.0), (0.5, -2.0)])
def test_batched_scores_and_counts_match_the_reference(scale, bias):
    """The op form (attention LSE on the tail rows, key_importance, the R x V rank) on a left-padded GQA
    batch = the reference on each sample's naive probabilities."""
    from vtattn.patch.sparsevlm import score
    q, k, v, raters, visual, real, tail = _score_case()
    scores, counts = score(q, k, v, raters, visual, real, tail, None, scale, bias)
    for b in range(q.shape[0]):
        r = real[b]
        n = int(r.sum())
        kk = k[b][:, r].repeat_interleave(2, dim=0)
        logits = (q[b][:, r].double() @ kk.double().transpose(1, 2)) * q.shape[-1] ** -0.5
        probs = logits.masked_fill(torch.ones(n, n, dtype=torch.bool).triu(1), float("-inf")).softmax(-1).float()
        want = ref.select(probs, raters[b, r], visual[b, r], torch.zeros(n, 1), scale=scale, bias=bias,
                          recycle=None, clusters=0.1)
        torch.testing.assert_close(scores[b, r], want["scores"], atol=1e-6, rtol=1e-5)
        assert int(counts[b]) == int(want["count"]), b


def test_scoring_stays_under_a_cap_the_n_by_n_path_exceeds():
    """At N = 3072 (2 heads; 24 text rows after a 3000-token image) the scoring never makes a tensor of
    N * N / 50 elements; the release's eager probabilities of one layer are 2 * N * N."""
    from vtattn.patch.sparsevlm import score
    N = 3072
    g = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(1, h, N, 16, generator=g) for h in (2, 1, 1))
    slot = torch.arange(N)[None]
    visual, raters = (slot >= 48) & (slot < N - 24), (slot >= N - 24) & (slot % 3 == 0)
    with Largest() as seen:
        scores, counts = score(q, k, v, raters, visual, torch.ones(1, N, dtype=torch.bool), 24, None, 13.5, 0.0)
    assert seen.largest < N * N // 50, seen.largest
    assert int(counts[0]) == int(8 * 13.5) and scores[visual].sum() > 0


# ---- the layer-by-layer reference of a patched model ----------------------------------------------------

def _layers(model, h, rope, ids, n0, options, image):
    """One unpadded sample through the unpatched decoder, eager, layer by layer; at each pruning layer
    the reference's rule on the prompt's n0 tokens (later tokens: decoded, always kept). Returns the
    last row's logits, {exit: kept [n0] bool} and {layer: (center indices, merged rows)}."""
    lm, (cos, sin) = model.model.language_model, rope
    n = h.shape[1]
    arange = torch.arange(n)
    images = (ids == image) & (arange < n0)
    text = ~images & (arange > arange[images].max()) & (arange < n0)
    raters = ref.raters(h[0].detach(), images, text)
    index, kept, recycled, probs = arange, {}, {}, {}
    hooks = [layer.self_attn.register_forward_hook(lambda m, a, out, i=i: probs.__setitem__(i, out[1]))
             for i, layer in enumerate(lm.layers)]
    try:
        with eager(lm), torch.no_grad():
            for i, layer in enumerate(lm.layers):
                m = len(index)
                mask = torch.full((m, m), float("-inf")).triu(1)[None, None]
                h = layer(h, attention_mask=mask, position_embeddings=(cos[:, index], sin[:, index]))
                h = h[0] if isinstance(h, tuple) else h
                if i not in options.layers:
                    continue
                P = int((index < n0).sum())  # the prompt's rows come first
                sel = ref.select(probs[i][0, :, :P, :P], raters[index[:P]], images[index[:P]], h[0, :P],
                                 scale=options.scale, bias=options.bias, recycle=options.recycle,
                                 clusters=options.clusters)
                keep = torch.cat([~images[index[:P]] | sel["kept"] | sel["centers"],
                                  torch.ones(m - P, dtype=torch.bool)])
                rows = h[0].clone()
                rows[:P][sel["centers"]] = sel["merged"][sel["centers"]]
                if sel["centers"].any():
                    recycled[i] = (index[:P][sel["centers"]], sel["merged"][sel["centers"]])
                h, index = rows[keep][None], index[keep]
                kept[i + 1] = torch.zeros(n0, dtype=torch.bool).index_fill_(0, index[index < n0], True)
    finally:
        for hook in hooks:
            hook.remove()
    return model.lm_head(lm.norm(h))[0, -1], kept, recycled


def _reference(model, inputs, options, image):
    """(prefill logits, kept, recycled, greedy tokens [STEPS], per-step logits) of one unpadded sample."""
    n0, tokens, logits = inputs["input_ids"].shape[1], [], []
    for step in range(STEPS):
        ids = torch.cat([inputs["input_ids"], torch.tensor([tokens], dtype=torch.long)], 1)
        x = dict(inputs, input_ids=ids)
        if "mm_token_type_ids" in x:
            x["mm_token_type_ids"] = torch.nn.functional.pad(x["mm_token_type_ids"], (0, len(tokens)))
        out, kept, recycled = _layers(model, *capture(model, x), ids[0], n0, options, image)
        if step == 0:
            first = (out, kept, recycled)
        logits.append(out)
        tokens.append(int(out.argmax()))
    return (*first, torch.tensor(tokens), torch.stack(logits))


def _check(model, ref_model, batch, alone, options, image):
    """Prefill logits, each exit's kept tokens, recycled slots and merged rows, greedy tokens and
    per-step logits of the batched patched model equal each sample's reference."""
    mask = batch["attention_mask"]
    with torch.no_grad():
        prefill = model(**batch).logits[:, -1]
        stage = model._vtattn_patch.stages[-1]
        kept = {d.layer: d.kept.clone() for d in stage.drops}
        recycled = {k: (s.clone(), r.clone()) for k, (s, r) in stage.recycled.items()}
        out = model.generate(**batch, **GREEDY)
    for b, x in enumerate(alone):
        real = mask[b].bool()
        pad = int((~real).sum())
        logits, want_kept, want_recycled, tokens, step_logits = _reference(ref_model, x, options, image)
        _close(prefill[b], logits)
        assert {e: k[b][real] for e, k in kept.items()}.keys() == want_kept.keys()
        for e, k in want_kept.items():
            assert torch.equal(kept[e][b][real], k), (b, e)
        assert want_recycled.keys() <= recycled.keys()
        for layer, (slots, rows) in want_recycled.items():
            got_slots, got_rows = recycled[layer][0][b], recycled[layer][1][b]
            live = got_slots >= 0
            order = got_slots[live].argsort()
            assert (got_slots[live][order] - pad).tolist() == slots.tolist(), (b, layer)
            _close(got_rows[live][order], rows)
        assert torch.equal(out.sequences[b, -STEPS:], tokens), b
        _close(torch.stack(out.logits)[:, b], step_logits)
    return out


def _prompts(spans, tails):
    """Left-padded ids / mask: row b is 3 + b text tokens, its images (spans[b]) each followed by two
    text tokens, then tails[b] more text tokens (the raters' candidates: the text after the last image)."""
    g = torch.Generator().manual_seed(0)
    rows = []
    for b, (row_spans, tail) in enumerate(zip(spans, tails)):
        ids = torch.randint(1, IMAGE, (3 + b,), generator=g).tolist()
        for n in row_spans:
            ids += [IMAGE] * n + torch.randint(1, IMAGE, (2,), generator=g).tolist()
        rows.append(ids + torch.randint(1, IMAGE, (tail,), generator=g).tolist())
    width = max(map(len, rows))
    return (torch.tensor([[PAD] * (width - len(r)) + r for r in rows]),
            torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows]))


def _llava_case():
    model = llava(seed=0, layers=4)
    ids, mask = _prompts([[36], [36, 36]], [7, 4])
    pixels = torch.randn(3, 3, 84, 84, generator=torch.Generator().manual_seed(1))
    batch = dict(input_ids=ids, attention_mask=mask, pixel_values=pixels)
    alone = [dict(input_ids=ids[b:b + 1, mask[b].bool()], pixel_values=pixels[images])
             for b, images in enumerate([slice(0, 1), slice(1, 3)])]
    return model, copy.deepcopy(model), batch, alone


@pytest.mark.parametrize("options", [SparseVLM(layers=(0, 2), scale=3.0, clusters=0.3),
                                     SparseVLM(layers=(1,), recycle=None),
                                     SparseVLM(layers=(0, 1, 2), scale=4.0, bias=2.0, recycle=0.6, clusters=0.5)])
def test_llava_matches_the_layer_by_layer_reference_batched_and_ragged(options):
    model, ref_model, batch, alone = _llava_case()
    vtattn.patch.llava(model, stages=[options])
    out = _check(model, ref_model, batch, alone, options, IMAGE)
    ids = batch["input_ids"]
    kept = model._vtattn_patch.kept
    images = (kept & (ids == IMAGE)).sum(1).tolist()
    assert images[0] < 36 and images[0] != images[1]  # pruned, and the rows keep different counts
    layer = options.layers[-1] + 1
    assert out.past_key_values.get_seq_length(layer) == int(kept.sum(1).max()) + STEPS - 1


def test_one_token_recycled_as_itself_is_the_unpatched_model():
    """A huge scale keeps V - 1 tokens; the deleted one is recycled alone, its own cluster's mean in its
    own slot: the unpatched model (logits and greedy tokens)."""
    model, _, batch, _ = _llava_case()
    with torch.no_grad():
        expected = model.generate(**batch, **GREEDY)
        vtattn.patch.llava(model, stages=[SparseVLM(layers=(0, 1, 2), scale=1e6)])
        got = model.generate(**batch, **GREEDY)
    assert torch.equal(got.sequences, expected.sequences)
    _close(torch.stack(got.logits), torch.stack(expected.logits))
    stage = model._vtattn_patch.stages[-1]
    assert all(int((s >= 0).sum()) == 2 for s, _ in stage.recycled.values())  # one per sample and layer
    vtattn.patch.unpatch(model)
    assert not any(layer._forward_pre_hooks for layer in model.model.language_model.layers)


def test_llava_next_matches_the_reference():
    from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches
    model = llava_next()
    ref_model = copy.deepcopy(model)
    sizes = torch.tensor([[50, 90], [84, 30]])
    views = [image_size_to_num_patches(s, PINPOINTS, 42) for s in sizes]
    pixels = torch.randn(2, max(views), 3, 42, 42, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        spans = [len(p) for p in model.model.get_image_features(pixels, sizes).pooler_output]
    ids, mask = _prompts([[spans[0]], [spans[1]]], [5, 8])
    batch = dict(input_ids=ids, attention_mask=mask, pixel_values=pixels, image_sizes=sizes)
    alone = [dict(input_ids=ids[b:b + 1, mask[b].bool()], pixel_values=pixels[b:b + 1, :views[b]],
                  image_sizes=sizes[b:b + 1]) for b in range(2)]
    options = SparseVLM(layers=(0,), scale=6.0)
    vtattn.patch.llava(model, stages=[options])
    _check(model, ref_model, batch, alone, options, IMAGE)


@pytest.mark.parametrize("adapter", ["qwen2_vl", "llm"])
def test_qwen2vl_matches_the_reference(adapter):
    model = qwen2_vl()
    ref_model = copy.deepcopy(model)
    grids = [(8, 8), (6, 12)]  # 16 and 18 image tokens
    batch = qwen2_vl_inputs(grids)
    alone = [qwen2_vl_alone(batch, grids, b) for b in range(2)]
    options = SparseVLM(layers=(0,), scale=2.0, clusters=0.5)
    getattr(vtattn.patch, adapter)(model, stages=[options])
    _check(model, ref_model, batch, alone, options, QWEN_IMAGE)


def test_decode_steps_sync_nothing_more_than_the_unpatched_model():
    model, _, batch, _ = _llava_case()
    unpatched, _ = step_syncs(model, batch, 5)
    vtattn.patch.llava(model, stages=[SparseVLM(layers=(0, 2), scale=3.0)])
    for mine, theirs in zip(step_syncs(model, batch, 5)[0], unpatched):
        assert len(mine) <= len(theirs), mine.report()


def test_composes_with_vision_side_keep_and_kv_compression():
    """Vision-side keep (before the projector) + SparseVLM + LOOK-M: a ragged batch generates what each
    sample does alone; LOOK-M keeping everything changes nothing."""
    model, _, batch, alone = _llava_case()
    sparse = SparseVLM(layers=(0, 2), scale=3.0)
    with torch.no_grad():
        vtattn.patch.llava(model, stages=[vtattn.patch.VisionSelect(keep=0.5), sparse])
        plain = model.generate(**batch, **GREEDY)
        vtattn.patch.llava(model, stages=[vtattn.patch.VisionSelect(keep=0.5), sparse,
                                          vtattn.patch.KVCompress(kv.LookM(budget=1.0, recent=0.1))])
        full = model.generate(**batch, **GREEDY)
        assert torch.equal(full.sequences, plain.sequences)
        vtattn.patch.llava(model, stages=[vtattn.patch.VisionSelect(keep=0.5), sparse,
                                          vtattn.patch.KVCompress(kv.LookM(budget=0.3, recent=0.1))])
        batched = model.generate(**batch, **GREEDY)
        for b, x in enumerate(alone):
            single = model.generate(**x, **GREEDY)
            assert torch.equal(single.sequences[0, -STEPS:], batched.sequences[b, -STEPS:]), b


@pytest.mark.parametrize("stages", [lambda: [vtattn.patch.FastV(layer=1, keep=0.5), SparseVLM(layers=(1,), scale=3.0)],
                                    lambda: [SparseVLM(layers=(0,), scale=3.0), vtattn.patch.VisualExit(layer=3)]])
def test_composes_with_fastv_and_visual_exit(stages):
    """FastV below SparseVLM's layer, or a visual exit after it: a ragged batch generates what each sample
    does alone."""
    model, _, batch, alone = _llava_case()
    vtattn.patch.llava(model, stages=stages())
    with torch.no_grad():
        batched = model.generate(**batch, **GREEDY)
        for b, x in enumerate(alone):
            single = model.generate(**x, **GREEDY)
            assert torch.equal(single.sequences[0, -STEPS:], batched.sequences[b, -STEPS:]), b
            _close(torch.stack(single.logits)[:, 0], torch.stack(batched.logits)[:, b])


def test_qwen2vl_composes_with_vision_side_keep():
    """Qwen2-VL keep=0.5 (the ViT-scored tokens leave at the LLM input: an exit at 0), then SparseVLM at
    layer 0 on what is left: the raters rate the kept image tokens; batched = alone."""
    model = qwen2_vl()
    grids = [(8, 8), (6, 12)]
    batch = qwen2_vl_inputs(grids)
    vtattn.patch.qwen2_vl(model, stages=[vtattn.patch.VisionSelect(keep=0.5), SparseVLM(layers=(0,), scale=2.0)])
    with torch.no_grad():
        batched = model.generate(**batch, **GREEDY)
        drops = model._vtattn_patch.stages[-1].drops
        left = (drops[0].kept & (batch["input_ids"] == QWEN_IMAGE)).sum(1).tolist()
        assert all(n < half for n, half in zip(left, [8, 9])), left  # fewer than the vision side kept
        for b in range(2):
            single = model.generate(**qwen2_vl_alone(batch, grids, b), **GREEDY)
            assert torch.equal(single.sequences[0, -STEPS:], batched.sequences[b, -STEPS:]), b
            _close(torch.stack(single.logits)[:, 0], torch.stack(batched.logits)[:, b])


@pytest.mark.gpu
def test_on_cuda_bf16():
    """On CUDA in bf16 (LLM head dim 64): the one-token identity setting matches the unpatched model and
    a pruned, recycled, ragged batch generates."""
    model = llava(seed=0, layers=4, hidden=256).to("cuda", torch.bfloat16)
    ids, mask = _prompts([[36], [36, 36]], [7, 4])
    pixels = torch.randn(3, 3, 84, 84, generator=torch.Generator().manual_seed(1))
    inputs = dict(input_ids=ids.cuda(), attention_mask=mask.cuda(), pixel_values=pixels.cuda().bfloat16())
    with torch.no_grad():
        before = model(**inputs).logits.float()
        vtattn.patch.llava(model, stages=[SparseVLM(layers=(0, 1, 2), scale=1e6)])
        after = model(**inputs).logits.float()
        real = mask.cuda().bool()
        torch.testing.assert_close(after[real], before[real], atol=5e-2, rtol=5e-2)
        vtattn.patch.llava(model, stages=[SparseVLM(layers=(0, 2), scale=3.0)])
        out = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    assert out.shape == (2, ids.shape[1] + 4)
    assert bool(model._vtattn_patch.stages[-1].recycled)


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(layers=3), TypeError, "layers"), (dict(layers=(1.0,)), TypeError, "layers"),
    (dict(layers=()), ValueError, "layers"), (dict(layers=(1, 1)), ValueError, "layers"),
    (dict(layers=(-1,)), ValueError, "layers"), (dict(scale=-1.0), ValueError, "scale"),
    (dict(recycle=1.5), ValueError, "recycle"), (dict(clusters="x"), TypeError, "clusters")])
def test_bad_options(kwargs, error, match):
    with pytest.raises(error, match=match):
        SparseVLM(**kwargs)


def test_refusals_leave_the_model_unpatched():
    model = llava(seed=0, layers=4)
    with pytest.raises(ValueError, match="layers"):
        vtattn.patch.llava(model, stages=[SparseVLM(layers=(1, 3))])  # tokens would leave at layer 4 of 4
    with pytest.raises(ValueError, match="already"):
        vtattn.patch.llava(model, stages=[SparseVLM(layers=(1,)), vtattn.patch.VisualExit(layer=2)])
    assert "forward" not in model.__dict__
    assert not any(layer._forward_pre_hooks for layer in model.model.language_model.layers)
