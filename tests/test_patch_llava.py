"""vtattn.patch.llava on tiny random-weight LLaVA / LLaVA-NeXT models: the kept tokens follow the
published rules (from eager attentions), the logits equal the manual pipeline (features -> kept ->
projector -> LLM on the shortened sequence), generate continues the shortened cache, keep=1.0 and
unpatch give the unpatched model."""
import pytest
import torch

import vtattn
from vtattn import pruning
from vtattn.patch import hf_attention
from _vlm import (IMAGE, PINPOINTS, clip_config, eager_attentions, llava, llava_next, manual_logits,
                  positions, prompts, reference_scores, shortened, siglip_config, topk)


def _images(n=3, size=84, seed=1):
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def _close(a, b, mask=None):
    assert a.shape == b.shape
    if mask is not None:
        a, b = a[mask.bool()], b[mask.bool()]
    torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-5)


def _kept_features(model, hidden, kept, drop):
    return [model.model.multi_modal_projector(h[drop:][k]) for h, k in zip(hidden, kept)]


# ---- LLaVA-1.5 (CLIP) and LLaVA with SigLIP ------------------------------------------------------

@pytest.mark.parametrize("method, strategy, options", [
    ("cls", "default", {}), ("cls", "full", {}), ("hired", "default", {}),
    ("cls_ensemble", "default", dict(ensemble_layers=[0, -2])), ("cls_ensemble", "default", {})])
def test_llava_matches_manual_pipeline(method, strategy, options):
    model = llava(strategy=strategy)
    n = 36 + (strategy == "full")
    ids, mask = prompts([[n], [n, n]])
    pixels = _images()
    attentions, hidden = eager_attentions(model.model.vision_tower, pixels)
    drop = int(strategy == "default")
    layers = [0, 2] if options else None
    kept = [topk(s, pruning.budget(0.25, n)) for s in reference_scores(method, attentions, 2, drop, layers)]
    features = _kept_features(model, hidden[-2], kept, drop)
    expected, short = manual_logits(model, ids, mask, [n] * 3, features)
    vtattn.patch.llava(model, keep=0.25, method=method, **options)
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, pixel_values=pixels, position_ids=positions(mask))
    _close(out.logits, expected, short)
    # no position_ids: the language model's own, counted on the shortened rows
    expected, short = manual_logits(model, ids, mask, [n] * 3, features, implicit=True)
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, pixel_values=pixels)
    _close(out.logits, expected, short)


def test_llava_keep_gradients_are_the_manual_pipelines():
    """Training through the pruned model: the gradients of every weight the kept tokens reach (tower,
    projector, language model) are the manual pipeline's (the same kept tokens gathered from the
    unpatched tower's hidden states, the LLM run on the shortened embeddings), the ranking detached."""
    model = llava()
    ids, mask = prompts([[36], [36, 36]])
    pixels = _images()
    attentions, _ = eager_attentions(model.model.vision_tower, pixels)
    kept = [topk(s, 9) for s in reference_scores("cls", attentions, 2)]
    hidden = model.model.vision_tower(pixels, output_hidden_states=True).hidden_states
    embeds, short, _ = shortened(model, ids, mask, [36] * 3, _kept_features(model, hidden[-2], kept, 1))
    weights = [p for p in model.parameters() if p.requires_grad]
    logits = type(model).forward(model, inputs_embeds=embeds, attention_mask=short,
                                 position_ids=positions(short)).logits
    expected = torch.autograd.grad((logits * short[..., None]).sum(), weights, allow_unused=True)
    vtattn.patch.llava(model, keep=0.25)
    logits = model(input_ids=ids, attention_mask=mask, pixel_values=pixels, position_ids=positions(mask)).logits
    got = torch.autograd.grad((logits * short[..., None]).sum(), weights, allow_unused=True)
    reached = [(g, e) for g, e in zip(got, expected) if e is not None]
    assert len(reached) > len(weights) // 2 and all(g is not None for g, _ in reached)
    for g, e in reached:
        torch.testing.assert_close(g, e, atol=1e-4, rtol=1e-4)


def test_llava_siglip_mean_received(monkeypatch):
    model = llava(vision=siglip_config(), strategy="full", layer=-1)
    ids, mask = prompts([[36, 36], [36]])
    pixels = _images()
    attentions, hidden = eager_attentions(model.model.vision_tower, pixels)
    kept = [topk(s, 9) for s in reference_scores("mean_received", attentions, 2, drop=0)]
    expected, short = manual_logits(model, ids, mask, [36] * 3, _kept_features(model, hidden[-1], kept, 0))
    vtattn.patch.llava(model, keep_tokens=9)  # auto: SigLIP has no [CLS]
    calls = []
    for name in ("attention", "key_importance"):  # the tower runs on vtattn's ops, one layer probed
        handle = f"_{name.upper()}"  # the registered ops' handles (never the re-validating public functions)
        op = getattr(hf_attention, handle)
        monkeypatch.setattr(hf_attention, handle, lambda *a, op=op, name=name, **k: calls.append(name) or op(*a, **k))
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, pixel_values=pixels, position_ids=positions(mask))
    _close(out.logits, expected, short)
    assert sorted(calls) == ["attention"] * 3 + ["key_importance"]


def test_llava_merge_and_labels():
    model = llava()
    ids, mask = prompts([[36], [36, 36]])
    pixels = _images()
    attentions, hidden = eager_attentions(model.model.vision_tower, pixels)
    layer = model.model.vision_tower.encoder.layers[2]
    keys = layer.self_attn.k_proj(layer.layer_norm1(hidden[2]))[:, 1:].detach()
    scores = reference_scores("cls", attentions, 2)
    selection = vtattn.select_tokens(scores, keep_tokens=torch.full((3,), 9))
    merged = vtattn.merge_tokens(hidden[-2][:, 1:], selection, keys=keys, mode="weighted")
    features = list(model.model.multi_modal_projector(merged))
    expected, short = manual_logits(model, ids, mask, [36] * 3, features)
    short_labels = shortened(model, ids, mask, [36] * 3, features, return_labels=True)[3]
    loss = torch.nn.functional.cross_entropy(expected[:, :-1].flatten(0, 1), short_labels[:, 1:].flatten())
    labels = torch.where(mask.bool() & (ids != IMAGE), ids, -100)
    vtattn.patch.llava(model, keep=0.25, merge="weighted")
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, pixel_values=pixels, position_ids=positions(mask),
                    labels=labels)
    _close(out.logits, expected, short)
    torch.testing.assert_close(out.loss, loss, atol=1e-5, rtol=1e-5)


def test_llava_keep_all_is_identity_and_unpatch():
    model = llava()
    ids, mask = prompts([[36], [36, 36]])
    pixels = _images()
    inputs = dict(input_ids=ids, attention_mask=mask, pixel_values=pixels)
    with torch.no_grad():
        before = model(**inputs).logits
        tokens = model.generate(**inputs, max_new_tokens=5, do_sample=False)
        vtattn.patch.llava(model, keep=1.0)
        _close(model(**inputs).logits, before, mask)
        assert torch.equal(model.generate(**inputs, max_new_tokens=5, do_sample=False), tokens)
        assert vtattn.patch.unpatch(model) is model
        assert "forward" not in model.__dict__ and "_vtattn_patch" not in model.__dict__
        assert torch.equal(model(**inputs).logits, before)
    assert model.config.vision_config._attn_implementation != "vtattn"


def test_llava_model_with_siglip_keep_all():
    """The bare LlavaModel patches too; a SigLIP tower ("full" features, no [CLS])."""
    model = llava(vision=siglip_config(), strategy="full", layer=-1)
    ids, mask = prompts([[36], [36]])
    inputs = dict(input_ids=ids, attention_mask=mask, pixel_values=_images(2))
    with torch.no_grad():
        before = model.model(**inputs).last_hidden_state
        vtattn.patch.llava(model.model, keep=1.0)
        _close(model.model(**inputs).last_hidden_state, before, mask)


@pytest.mark.parametrize("num_beams, spans", [(1, [[36], [36, 36]]), (2, [[36], [36]])])
def test_llava_generate_continues_shortened_cache(num_beams, spans):
    # beams expand pixel_values row by row (transformers 5.17): one image per prompt there
    model = llava()
    ids, mask = prompts(spans)
    pixels = _images(sum(map(len, spans)))
    attentions, hidden = eager_attentions(model.model.vision_tower, pixels)
    kept = [topk(s, 9) for s in reference_scores("cls", attentions, 2)]
    features = _kept_features(model, hidden[-2], kept, 1)
    embeds, short, _ = shortened(model, ids, mask, [36] * len(pixels), features)
    options = dict(max_new_tokens=6, do_sample=False, num_beams=num_beams)
    with torch.no_grad():
        expected = model.generate(inputs_embeds=embeds, attention_mask=short, **options)
        vtattn.patch.llava(model, keep=0.25)
        out = model.generate(input_ids=ids, attention_mask=mask, pixel_values=pixels, **options)
    assert torch.equal(out[:, ids.shape[1]:], expected[:, -6:])


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(keep=0), ValueError, "keep"), (dict(keep=1.5), ValueError, "keep"),
    (dict(keep=1), ValueError, "ambiguous"), (dict(keep=0.5, keep_tokens=9), ValueError, "not both"),
    (dict(keep=0.5, method="cls_ensemble", ensemble_layers=[7]), IndexError, "ensemble layer 7"),
    (dict(method="unknown"), ValueError, "unknown method .*'fastv'"),
    (dict(keep=0.5, merge="sum"), ValueError, "merge"), (dict(), ValueError, "nothing to do"),
    (dict(method="cls"), ValueError, "nothing to do")])
def test_llava_bad_arguments(kwargs, error, match):
    model = llava()
    with pytest.raises(error, match=match):
        vtattn.patch.llava(model, **kwargs)
    assert "forward" not in model.__dict__


def test_llava_bad_inputs():
    with pytest.raises(ValueError, match="no \\[CLS\\]"):
        vtattn.patch.llava(llava(vision=siglip_config(), strategy="full"), keep=0.5, method="cls")
    with pytest.raises(TypeError, match="Llava"):
        vtattn.patch.llava(torch.nn.Linear(2, 2))
    model = vtattn.patch.llava(llava(), keep=0.5)
    ids, mask = prompts([[30]])
    with pytest.raises(ValueError, match="image tokens"):
        model(input_ids=ids, attention_mask=mask, pixel_values=_images(1))
    with pytest.raises(NotImplementedError, match="input_ids"):
        model(inputs_embeds=torch.zeros(1, 4, 32), pixel_values=_images(1))


# ---- LLaVA-NeXT (anyres) -------------------------------------------------------------------------

SIZES = torch.tensor([[50, 90], [84, 30], [40, 40]])  # different crop grids, unpadding on both axes


def _next_inputs(model):
    from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches
    views = [image_size_to_num_patches(s, PINPOINTS, 42) for s in SIZES]
    pixels = torch.randn(3, max(views), 3, 42, 42, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        packed = model.model.get_image_features(pixels, SIZES).pooler_output
    spans = [len(p) for p in packed]
    ids, mask = prompts([[spans[0]], [spans[1], spans[2]]])
    return views, pixels, packed, spans, ids, mask


def _largest_remainder(total, weights):
    quota = total * weights / weights.sum()
    share = quota.floor().long()
    for i in sorted(range(len(share)), key=lambda i: (-(quota[i] - share[i]), i))[:total - int(share.sum())]:
        share[i] += 1
    return share


def _next_reference(model, views, pixels, method, keep, alpha=0.5):
    """Per image, the packed positions kept by the rule (tokens of each view among those that
    survive unpadding; a row's newline with its row), found with transformers' own packing."""
    from transformers.models.llava_next.modeling_llava_next import get_anyres_image_grid_shape
    flat = torch.cat([p[:v] for p, v in zip(pixels, views)])
    attentions, _ = eager_attentions(model.model.vision_tower, flat)
    ids = (torch.arange(len(flat) * 9) + 1.0).view(len(flat), 9, 1)
    packed_ids = model.model.pack_image_features(list(ids.split(views)), SIZES, "default",
                                                 image_newline=torch.zeros(1))[0]
    select = reference_scores("hired" if method == "hired" else "cls", attentions, 2)
    early = attentions[0][:, :, 0, 1:].sum(1)
    keeps, first = [], 0
    for size, v, pid in zip(SIZES, views, packed_ids):
        pid = pid[:, 0].long() - 1  # -1: newline
        valid = [sorted(t % 9 for t in pid.tolist() if t // 9 == first + j) for j in range(v)]
        tokens = torch.tensor([len(t) for t in valid])
        if method == "hired":
            nh, nw = get_anyres_image_grid_shape(size, PINPOINTS, 42)
            total = round(keep * int(tokens.sum()))
            base = round(alpha * total)
            grid = early[first].view(3, 3)
            mass = torch.stack([grid[i * 3 // nh:(i + 1) * 3 // nh, j * 3 // nw:(j + 1) * 3 // nw].sum()
                                for i in range(nh) for j in range(nw)])
            counts = [base] + _largest_remainder(total - base, mass.double()).tolist()
            assert all(c <= t for c, t in zip(counts, tokens.tolist()))  # no cap in this case
        else:
            counts = [max(1, round(keep * t)) for t in tokens.tolist()]
        kept = set()
        for j, (toks, k) in enumerate(zip(valid, counts)):
            toks = torch.tensor(toks)
            kept |= {(first + j) * 9 + t for t in toks[topk(select[first + j][toks], k)].tolist()}
        keep_pos, row = [], []
        for pos, t in enumerate(pid.tolist()):
            if t >= 0 and t in kept:
                keep_pos.append(pos)
                row.append(pos)
            elif t < 0:  # newline: kept with a row that keeps any token
                if any(p >= 9 for p in row):
                    keep_pos.append(pos)
                row = []
        keeps.append(torch.tensor(keep_pos))
        first += v
    return keeps


@pytest.mark.parametrize("method", ["cls", "hired"])
def test_llava_next_matches_manual_pipeline(method):
    model = llava_next()
    views, pixels, packed, spans, ids, mask = _next_inputs(model)
    keeps = _next_reference(model, views, pixels, method, 0.4)
    expected, short = manual_logits(model, ids, mask, spans, [p[k] for p, k in zip(packed, keeps)])
    vtattn.patch.llava(model, keep=0.4, method=method)
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, pixel_values=pixels, image_sizes=SIZES,
                    position_ids=positions(mask))
    _close(out.logits, expected, short)


def test_llava_next_keep_all_generate_merge_and_kv():
    model = llava_next()
    views, pixels, packed, spans, ids, mask = _next_inputs(model)
    inputs = dict(input_ids=ids, attention_mask=mask, pixel_values=pixels, image_sizes=SIZES)
    with torch.no_grad():
        before = model(**inputs).logits
        tokens = model.generate(**inputs, max_new_tokens=4, do_sample=False)
        vtattn.patch.llava(model, keep=1.0)
        _close(model(**inputs).logits, before, mask)
        assert torch.equal(model.generate(**inputs, max_new_tokens=4, do_sample=False), tokens)
        for method in ("rows", "hired"):
            vtattn.patch.llava(model, keep=0.3, method=method, merge="mean")
            out = model.generate(**inputs, max_new_tokens=4, do_sample=False)
            assert out.shape == (2, ids.shape[1] + 4)
        # KV compression on the anyres sequence: budget 1.0 keeps the tokens; with pruning and
        # decode-time eviction it generates
        vtattn.patch.llava(model, kv=vtattn.kv.LookM(budget=1.0, recent=0.1))
        assert torch.equal(model.generate(**inputs, max_new_tokens=4, do_sample=False), tokens)
        vtattn.patch.llava(model, keep=0.5, method="hired", kv=vtattn.kv.DecodeH2O(
            vtattn.kv.LookM(budget=0.3, recent=0.1, merge="weighted"), every=2, recent=2))
        out = model.generate(**inputs, max_new_tokens=4, do_sample=False)
        assert out.shape == (2, ids.shape[1] + 4)


@pytest.mark.gpu
def test_patched_models_on_cuda_bf16():
    """keep=1.0 matches the unpatched model and pruned generate runs, on CUDA in bf16 (head dim 64)."""
    for model in (llava(vision=clip_config(hidden=128, heads=2)),
                  llava_next(vision=clip_config(image_size=42, hidden=128, heads=2))):
        if hasattr(model.model, "image_newline"):
            _, pixels, _, _, ids, mask = _next_inputs(model)
            inputs = dict(input_ids=ids, attention_mask=mask, pixel_values=pixels, image_sizes=SIZES)
        else:
            ids, mask = prompts([[36], [36, 36]])
            inputs = dict(input_ids=ids, attention_mask=mask, pixel_values=_images())
        model.to("cuda", torch.bfloat16)
        inputs = {k: v.to("cuda", torch.bfloat16 if v.is_floating_point() else None)
                  for k, v in inputs.items()}
        with torch.no_grad():
            before = model(**inputs).logits.float()
            vtattn.patch.llava(model, keep=1.0)
            after = model(**inputs).logits.float()
            real = mask.cuda().bool()
            torch.testing.assert_close(after[real], before[real], atol=5e-2, rtol=5e-2)
            vtattn.patch.llava(model, keep=0.3, method="hired", merge="mean")
            out = model.generate(**inputs, max_new_tokens=4, do_sample=False)
        assert out.shape == (2, ids.shape[1] + 4)


def test_llava_tower_calls_from_threads_restore_the_attention_implementation():
    """Concurrent patched calls (a pre-hook sleeps to make them overlap) run and leave the tower's
    config untouched: its attention modules are routed once, at install."""
    import threading
    import time
    model = vtattn.patch.llava(llava(), keep=0.5)
    tower = model.model.vision_tower
    tower.encoder.layers[0].register_forward_pre_hook(lambda *a: time.sleep(0.02))
    ids, mask = prompts([[36]])
    errors = []

    def run():
        try:
            for _ in range(3):
                with torch.no_grad():
                    model(input_ids=ids, attention_mask=mask, pixel_values=_images(1))
        except Exception as e:  # noqa: BLE001  (reported below)
            errors.append(e)

    threads = [threading.Thread(target=run) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and tower.config._attn_implementation != "vtattn"
