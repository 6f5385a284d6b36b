"""vtattn.kv.CompressedCache, LOOK-M merging and the `kv=` drop-in: keep-sets against the rules on
eager attention, merge formulas against float64 loops, decode reads against attention over the
kept rows, paging (growth, beams), memory accounting, and generate against the unpatched model."""
import inspect

import pytest
import torch

import vtattn
from vtattn import kv
from _vlm import llava, lookm_reference, prompts
from helpers import backend_params

transformers = pytest.importorskip("transformers")
from vtattn.kv.cache import CompressedCache, CompressedLayer  # noqa: E402  (needs transformers)
from vtattn.patch.core import routed  # noqa: E402

# The cache argument of forward / generate: `cache` in newer transformers (5.25, where the old name warns),
# `past_key_values` in older ones (5.17).
CACHE = "cache" if "cache" in inspect.signature(transformers.LlamaForCausalLM.forward).parameters else "past_key_values"


def _images(n, seed=1):
    return torch.randn(n, 3, 84, 84, generator=torch.Generator().manual_seed(seed))


# ---- merging ---------------------------------------------------------------------------------

def naive_merge(k, v, indices, mergeable, mode):
    """float64 loops over LOOK-M's formulas."""
    B, H, L, D = k.shape
    k, v = k.double(), v.double()
    out_k = torch.zeros(B, H, indices.shape[-1], D, dtype=torch.float64)
    out_v = torch.zeros_like(out_k)
    for b in range(B):
        for h in range(H):
            kept = [int(i) for i in indices[b, h] if i >= 0]
            groups = {c: [] for c in kept}
            for e in range(L):
                if e in kept or not mergeable[b, h, e]:
                    continue
                cos = [float(torch.nn.functional.cosine_similarity(k[b, h, e], k[b, h, c], dim=0, eps=1e-12))
                       for c in kept]
                best = max(range(len(kept)), key=lambda i: (cos[i], -kept[i]))
                groups[kept[best]].append((e, max(cos[best], 0.0)))
            for slot, c in enumerate(kept):
                for src, dst in ((k, out_k), (v, out_v)):
                    own, n = src[b, h, c], len(groups[c])
                    if mode == "avg":
                        dst[b, h, slot] = (own + sum(src[b, h, e] for e, _ in groups[c])) / (1 + n)
                    elif mode == "pivotal":
                        dst[b, h, slot] = (own + sum((src[b, h, e] + own) / 2 for e, _ in groups[c])) / (1 + n)
                    else:
                        w = sum(w for _, w in groups[c])
                        dst[b, h, slot] = (own + sum(w * src[b, h, e] for e, w in groups[c])) / (1 + w)
    return out_k, out_v


@pytest.mark.parametrize("backend", backend_params("merge_tokens"))
@pytest.mark.parametrize("mode", ["avg", "pivotal", "weighted"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_merge_kv_matches_formulas(backend, mode, dtype):
    device, name = backend
    g = torch.Generator().manual_seed(3)
    B, H, L, D, K = 2, 3, 29, 16, 7
    k = torch.randn(B, H, L, D, generator=g)
    v = torch.randn(B, H, L, D, generator=g)
    indices = torch.stack([torch.stack([torch.randperm(L, generator=g)[:K].sort().values for _ in range(H)])
                           for _ in range(B)])
    indices[1, 2, 5:] = -1  # a head that keeps fewer
    mergeable = torch.rand(B, H, L, generator=g) < 0.7
    ek, ev = naive_merge(k.to(dtype), v.to(dtype), indices, mergeable, mode)
    kd, vd = (t.to(device, dtype).transpose(2, 3).contiguous().transpose(2, 3) for t in (k, v))  # strided
    before = kd.clone()
    with vtattn.use_backend(name):
        gk, gv = kv.merge_kv(kd, vd, indices.to(device), mergeable.to(device), mode)
    assert torch.equal(kd, before)
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(gk.double().cpu(), ek.masked_fill(indices[..., None] < 0, 0), **tol)
    torch.testing.assert_close(gv.double().cpu(), ev.masked_fill(indices[..., None] < 0, 0), **tol)


def test_merge_kv_bad_mode():
    k = torch.randn(1, 1, 4, 8)
    with pytest.raises(ValueError, match="merge"):
        kv.merge_kv(k, k, torch.tensor([[[0, 1]]]), torch.ones(1, 1, 4, dtype=torch.bool), "sum")


# ---- one layer: compression and reads ----------------------------------------------------------

def _layer(policy, page_size=4, room=3, modality=None):
    cache = CompressedCache(policy, page_size=page_size, room=room)
    cache.modality = modality
    return cache, CompressedLayer(cache, 0, policy)


def _attend_ref(q, k, v, positions, q_pos):
    """float64 attention of q over the listed rows with original-position causality."""
    s = (q.double() @ k.double().transpose(-1, -2)) * q.shape[-1] ** -0.5
    s = s.masked_fill(positions[..., None, :] > q_pos[:, None], float("-inf"))
    return s.softmax(-1) @ v.double()


DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("policy", [None, kv.SnapKV(0.4, window=3), kv.H2O(budget_tokens=5, recent_tokens=2)])
def test_layer_compresses_then_appends_and_reads(policy, device):
    g = torch.Generator().manual_seed(0)
    B, Hq, Hkv, L, D = 2, 4, 2, 23, 16 if device == "cpu" else 64
    q, k, v = (torch.randn(B, h, L, D, generator=g).to(device) for h in (Hq, Hkv, Hkv))
    cache, layer = _layer(policy)
    assert layer.update(k, v) == (k, v)
    out = layer.attend(q, k, v, None, D ** -0.5)
    tol = dict(atol=1e-5, rtol=1e-5) if device == "cpu" else dict(atol=2e-3, rtol=2e-3)  # tf32 on GPU
    torch.testing.assert_close(out.double(), _attend_ref(q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1),
                                                         torch.arange(L, device=device),
                                                         torch.arange(L, device=device)), **tol)
    keep = policy.select(q, k) if policy is not None else None
    kept = layer.pages.positions()
    if keep is not None:
        assert torch.equal(kept, keep.indices)
    else:
        assert torch.equal(kept, torch.arange(L, device=device).expand(B, Hkv, L))
    allk, allv = k, v  # every token's k/v in original positions
    for step in range(7):  # past the headroom: pages grow
        n = 2 if step == 3 else 1  # a two-token step reads with causality among the new tokens
        qn, kn, vn = (torch.randn(B, h, n, D, generator=g).to(device) for h in (Hq, Hkv, Hkv))
        allk, allv = torch.cat([allk, kn], 2), torch.cat([allv, vn], 2)
        layer.update(kn, vn)
        out = layer.attend(qn, None, None, None, D ** -0.5)
        pos = layer.pages.positions()
        new = torch.arange(layer.seen - n, layer.seen, device=device)
        for b in range(B):
            for h in range(Hkv):
                p = pos[b, h][pos[b, h] >= 0]
                assert p.tolist() == sorted(p.tolist()) and torch.equal(p[-n:], new)
                ref = _attend_ref(qn[b, 2 * h:2 * h + 2], allk[b, h, p], allv[b, h, p], p, new)
                torch.testing.assert_close(out[b, 2 * h:2 * h + 2].double(), ref, **tol)
    assert layer.get_seq_length() == L + 8 and layer.keys is None


def test_layer_padding_is_never_kept_and_samples_are_independent():
    g = torch.Generator().manual_seed(1)
    Hq, Hkv, L, D = 2, 2, 19, 8
    q, k, v = (torch.randn(2, h, L, D, generator=g) for h in (Hq, Hkv, Hkv))
    valid = torch.ones(2, L, dtype=torch.bool)
    valid[1, :6] = False
    mask = (torch.ones(L, L, dtype=torch.bool).tril() & valid[:, None, :])[:, None]
    policy = kv.SnapKV(0.5, window=3)
    cache, layer = _layer(policy)
    layer.update(k, v)
    out = layer.attend(q, k, v, mask, D ** -0.5)
    alone = policy.select(q[1:, :, 6:], k[1:, :, 6:])
    pos = layer.pages.positions()
    assert torch.equal(pos[0, :, :int(policy.select(q[:1], k[:1]).counts.max())], policy.select(q[:1], k[:1]).indices[0])
    assert torch.equal(pos[1][pos[1] >= 0].view(Hkv, -1), alone.indices[0] + 6)
    ref = _attend_ref(q[1:, :, 6:], k[1:, :, 6:], v[1:, :, 6:], torch.arange(L - 6), torch.arange(L - 6))
    torch.testing.assert_close(out[1:, :, 6:].double(), ref, atol=1e-5, rtol=1e-5)


def test_pages_memory_follows_the_kept_fraction():
    g = torch.Generator().manual_seed(2)
    B, Hkv, L, D = 2, 4, 200, 16
    q, k, v = (torch.randn(B, Hkv, L, D, generator=g) for _ in range(3))
    for budget in (1.0, 0.5, 0.1):
        cache = CompressedCache(kv.AdaKV(kv.SnapKV(budget, window=4)), page_size=8, room=8)
        cache.update(k, v, 0)
        cache.layers[0].attend(q, k, v, None, D ** -0.5)
        counts = (cache.kept_positions(0) >= 0).sum(-1)
        pages = (counts + 8 + 7) // 8  # each head: its kept tokens plus the headroom, in whole pages
        assert cache.kv_bytes() == int(pages.sum()) * 8 * D * 2 * 4
        assert cache.kv_bytes() <= (budget * L + 16) / L * (B * Hkv * L * D * 2 * 4)


def test_cache_beam_reorder_copies_pages():
    g = torch.Generator().manual_seed(4)
    B, H, L, D = 2, 2, 9, 8
    k, v = torch.randn(B, H, L, D, generator=g), torch.randn(B, H, L, D, generator=g)
    cache, layer = _layer(None)
    layer.update(k, v)
    layer.attend(torch.randn(B, H, L, D, generator=g), k, v, None, D ** -0.5)
    layer.reorder_cache(torch.tensor([1, 1]))
    pos = layer.pages.positions()
    assert torch.equal(pos, torch.arange(L).expand(B, H, L))
    k1, v1 = torch.randn(B, H, 1, D, generator=g), torch.randn(B, H, 1, D, generator=g)
    keys, values = layer.update(k1, v1)  # each beam writes its own copy (a decode step: when it attends)
    q1 = torch.randn(B, H, 1, D, generator=g)
    out = layer.attend(q1, keys, values, None, D ** -0.5)
    slots = layer.pages.slots()
    stored = layer.pages.k.view(-1, D)[slots.clamp(min=0)]
    assert torch.equal(stored[0, :, :L], k[1]) and torch.equal(stored[1, :, :L], k[1])
    assert torch.equal(stored[:, :, L], k1[:, :, 0])
    want = vtattn.reference.attention(q1, torch.cat([k[[1, 1]], k1], 2), torch.cat([v[[1, 1]], v1], 2), False,
                                      D ** -0.5, 0.0, -1, None)[0]
    torch.testing.assert_close(out, want)


def test_cache_bad_arguments_and_wrong_attention():
    with pytest.raises(TypeError, match="policy"):
        CompressedCache("lookm")
    with pytest.raises(ValueError, match="page_size"):
        CompressedCache(page_size=0)
    with pytest.raises(ValueError, match="budget"):
        kv.LookM(0.0, 0.1)
    cache = CompressedCache(kv.SnapKV(0.5, window=8))
    k = torch.randn(1, 2, 6, 8)
    cache.update(k, k, 0)
    with pytest.raises(ValueError, match="window=8 is larger than the prompt"):
        cache.layers[0].attend(torch.randn(1, 2, 6, 8), k, k, None, 8 ** -0.5)
    cache = CompressedCache(None)
    cache.update(k, k, 0)  # read by another attention implementation: the next layer says so
    with pytest.raises(RuntimeError, match="attn_implementation='vtattn'"):
        cache.update(k, k, 1)
    cache = CompressedCache(kv.LookM(0.5, 0.1))
    cache.modality = torch.zeros(1, 5, dtype=torch.bool)
    cache.update(k, k, 0)
    with pytest.raises(ValueError, match="modality"):
        cache.layers[0].attend(torch.randn(1, 2, 6, 8), k, k, None, 8 ** -0.5)


# ---- the drop-in on a tiny LLaVA ------------------------------------------------------------------

def test_llava_kv_lookm_kept_sets_match_eager_rule():
    model = llava()
    ids, mask = prompts([[36], [36, 36]])
    pixels = _images(3)
    with torch.no_grad():
        lm = model.model.language_model
        lm.config._attn_implementation = "eager"
        eager = model(input_ids=ids, attention_mask=mask, pixel_values=pixels, output_attentions=True)
        lm.config._attn_implementation = "sdpa"
        vtattn.patch.llava(model, kv=kv.LookM(budget=0.3, recent=0.1))
        out = model(input_ids=ids, attention_mask=mask, pixel_values=pixels)
    cache = out.past_key_values
    assert isinstance(cache, CompressedCache)
    for layer, attn in enumerate(eager.attentions):
        ref = lookm_reference(attn.double(), ids == 100, mask.bool(), 0.3, 0.1)
        got = cache.kept_positions(layer)
        for b in range(2):
            for h in range(2):
                p = got[b, h][got[b, h] >= 0].tolist()
                assert len(p) == len(ref[b][h]) and len(set(p) ^ set(ref[b][h])) <= 2, (layer, b, h)
    torch.testing.assert_close(out.logits[:, -1], eager.logits[:, -1], atol=0.5, rtol=0)  # compressed, not equal


@pytest.mark.parametrize("num_beams", [1, 2])
def test_llava_kv_budget_one_gives_the_unpatched_tokens(num_beams):
    model = llava()
    ids, mask = prompts([[36], [36, 36]])
    inputs = dict(input_ids=ids, attention_mask=mask, pixel_values=_images(3))
    options = dict(max_new_tokens=6, do_sample=False, num_beams=num_beams)
    if num_beams > 1:  # one image per prompt with beams (transformers expands pixel_values per row)
        ids, mask = prompts([[36], [36]])
        inputs = dict(input_ids=ids, attention_mask=mask, pixel_values=_images(2))
    with torch.no_grad():
        expected = model.generate(**inputs, **options)
        vtattn.patch.llava(model, kv=kv.LookM(budget=1.0, recent=0.1, merge="pivotal"))
        got = model.generate(**inputs, **options, return_dict_in_generate=True)
    assert torch.equal(got.sequences, expected)
    assert isinstance(got.past_key_values, CompressedCache)
    vtattn.patch.unpatch(model)
    assert model.model.language_model.config._attn_implementation != "vtattn"


def test_llava_kv_without_a_cache_warns_and_attends_to_every_token():
    """generate(use_cache=False): no cache, nothing to compress: each step attends to every token, as the
    unpatched model's (warned once; before, the second step failed with a misleading error)."""
    model = llava()
    ids, mask = prompts([[36], [36, 36]])
    inputs = dict(input_ids=ids, attention_mask=mask, pixel_values=_images(3))
    options = dict(max_new_tokens=4, do_sample=False, use_cache=False, output_logits=True, return_dict_in_generate=True)
    with torch.no_grad():
        expected = model.generate(**inputs, **options)
        vtattn.patch.llava(model, kv=kv.LookM(budget=0.2, recent=0.1))
        with pytest.warns(UserWarning, match="use_cache=False keeps no cache") as seen:
            got = model.generate(**inputs, **options)
    assert len([w for w in seen if "use_cache=False" in str(w.message)]) == 1
    assert torch.equal(got.sequences, expected.sequences)
    torch.testing.assert_close(torch.stack(got.logits), torch.stack(expected.logits), atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("merge", [None, "avg", "pivotal", "weighted"])
def test_llava_kv_generate_batch_equals_each_sample_alone(merge):
    model = vtattn.patch.llava(llava(), keep=0.5, kv=kv.LookM(budget=0.2, recent=0.1, merge=merge))
    ids, mask = prompts([[36], [36, 36]])
    pixels = _images(3)
    options = dict(max_new_tokens=5, do_sample=False)
    with torch.no_grad():
        both = model.generate(input_ids=ids, attention_mask=mask, pixel_values=pixels, **options)
        for b, imgs in ((0, pixels[:1]), (1, pixels[1:])):
            real = mask[b].bool()
            alone = model.generate(input_ids=ids[b:b + 1, real], pixel_values=imgs, **options)
            assert torch.equal(alone[0, -5:], both[b, -5:]), b


def test_llava_kv_memory_and_positions():
    model = vtattn.patch.llava(llava(), kv=kv.LookM(budget=0.1, recent=0.1))
    ids, mask = prompts([[36, 36, 36, 36]])
    given = CompressedCache(kv.LookM(budget=0.1, recent=0.1), page_size=4, room=4)  # the caller's cache is used
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=mask, pixel_values=_images(4), max_new_tokens=3,
                             do_sample=False, return_dict_in_generate=True, **{CACHE: given})
    cache = out.past_key_values
    assert cache is given
    L = ids.shape[1]
    assert cache.get_seq_length() == L + 2  # the uncompressed length: positions continue from it
    pos = cache.kept_positions(0)
    assert pos[0, 0, (pos[0, 0] >= 0).sum() - 2:].tolist() == [L, L + 1]
    cfg = model.config.text_config
    full = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * (L + 2) * (cfg.hidden_size // cfg.num_attention_heads) * 4
    assert cache.kv_bytes() < 0.35 * full


def test_llava_kv_bad_arguments():
    with pytest.raises(TypeError, match="policy"):
        vtattn.patch.llava(llava(), kv="lookm")
    windowed = llava()
    windowed.config.text_config.sliding_window = 16
    for kw in (dict(kv=kv.LookM(0.2, 0.1)), dict(method="fastv", layer=1, keep=0.5)):
        with pytest.raises(NotImplementedError, match="sliding_window=16"):
            vtattn.patch.llava(windowed, **kw)
    model = vtattn.patch.llava(llava(), kv=kv.SnapKV(0.5, window=500))
    ids, mask = prompts([[36]])
    with pytest.raises(ValueError, match="window=500"), torch.no_grad():
        model(input_ids=ids, attention_mask=mask, pixel_values=_images(1))


@pytest.mark.gpu
def test_llava_kv_on_cuda_fp16():
    """The drop-in on CUDA (LLM head dim 64, GQA): budget 1.0 matches the unpatched logits; LOOK-M
    generates from a cache a fraction of the size."""
    from _vlm import _seeded, clip_config
    text = transformers.LlamaConfig(hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                                    num_attention_heads=4, num_key_value_heads=2, vocab_size=128,
                                    max_position_embeddings=1024, pad_token_id=0)
    config = transformers.LlavaConfig(vision_config=clip_config(), text_config=text, image_token_index=100,
                                      vision_feature_layer=-2, vision_feature_select_strategy="default")
    model = _seeded(transformers.LlavaForConditionalGeneration, config, 0).to("cuda", torch.float16)
    ids, mask = prompts([[36, 36], [36, 36, 36]])
    inputs = dict(input_ids=ids.cuda(), attention_mask=mask.cuda(), pixel_values=_images(5).cuda().half())
    with torch.no_grad():
        before = model(**inputs).logits[:, -1].float()
        vtattn.patch.llava(model, kv=kv.LookM(budget=1.0, recent=0.1))
        torch.testing.assert_close(model(**inputs).logits[:, -1].float(), before, atol=5e-2, rtol=5e-2)
        vtattn.patch.llava(model, kv=kv.LookM(budget=0.2, recent=0.1, merge="pivotal"))
        cache = CompressedCache(kv.LookM(budget=0.2, recent=0.1, merge="pivotal"), room=8)
        out = model.generate(**inputs, max_new_tokens=20, do_sample=False, **{CACHE: cache})
    assert out.shape == (2, ids.shape[1] + 20)  # 20 steps: past the headroom, pages grew
    full = 2 * 2 * 2 * 2 * (ids.shape[1] + 20) * 64 * 2  # k and v, batch, layers, kv heads, tokens, D, fp16
    assert cache.kv_bytes() < 0.7 * full
    with torch.no_grad():  # with FastV from layer 1: its pruned layer compresses its own kept tokens
        vtattn.patch.llava(model, fastv=vtattn.patch.FastV(layer=1, keep=0.5), kv=kv.LookM(budget=0.2, recent=0.1))
        out = model.generate(**inputs, max_new_tokens=20, do_sample=False, return_dict_in_generate=True)
    held = [int((out.past_key_values.kept_positions(i) >= 0).sum()) for i in range(2)]
    assert out.sequences.shape == (2, ids.shape[1] + 20) and held[1] < held[0]


def test_lookm_budget_01_on_the_4_image_prompt_takes_under_a_quarter_of_the_cache():
    """Issue 5's memory target is token accounting, the same on any device: LOOK-M(0.1, 0.1) on
    4 x 576 image tokens + 200 text tokens, before and after 64 decode steps."""
    config = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=2, num_key_value_heads=2, vocab_size=101)
    config._attn_implementation = "vtattn"
    vtattn.patch.register_hf_attention()
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).eval()
    image = torch.tensor(([False] * 40 + [True] * 576) * 4 + [False] * 40)[None]
    ids = torch.where(image, 100, torch.randint(1, 100, image.shape))
    cache = CompressedCache(kv.LookM(budget=0.1, recent=0.1))
    cache.modality = image
    L, per_token = ids.shape[1], 2 * 2 * 2 * 32 * 4  # k and v, layers, kv heads, D, fp32
    with torch.no_grad():
        out = model(ids, use_cache=True, **{CACHE: cache})
        assert cache.kv_bytes() <= 0.25 * L * per_token
        token = out.logits[:, -1:].argmax(-1)
        for _ in range(64):
            token = model(token, use_cache=True, **{CACHE: cache}).logits.argmax(-1)
    assert cache.get_seq_length() == L + 64
    assert cache.kv_bytes() <= 0.25 * (L + 64) * per_token


def test_llava_kv_repatch_keeps_vtattn_and_unpatch_restores():
    """Patching kv= twice in a row: the second patch still routes the LLM's attention to vtattn's (the
    first one's unpatch must not unroute it afterwards), and unpatch restores the original."""
    model = llava()
    lm = model.model.language_model
    ids, mask = prompts([[36], [36, 36]])
    inputs = dict(input_ids=ids, attention_mask=mask, pixel_values=_images(3), max_new_tokens=3, do_sample=False)
    with torch.no_grad():
        expected = model.generate(**inputs)
        vtattn.patch.llava(model, kv=kv.LookM(budget=0.3, recent=0.1))
        vtattn.patch.llava(model, kv=kv.LookM(budget=1.0, recent=0.1))
        assert all(routed(layer.self_attn) for layer in lm.layers)
        assert torch.equal(model.generate(**inputs), expected)
    vtattn.patch.unpatch(model)
    assert lm.config._attn_implementation == "sdpa" and not any(routed(layer.self_attn) for layer in lm.layers)


def test_llava_kv_reusing_a_replaced_cache_raises():
    """A manual decode loop that keeps passing its own (replaced, empty) DynamicCache would decode
    with no context: it raises; the returned cache continues as the unpatched model does."""
    model = llava()
    ids, mask = prompts([[36]])
    pixels = _images(1)

    def loop(own):
        cache = transformers.DynamicCache(config=model.config.text_config) if own else None
        with torch.no_grad():
            out = model(input_ids=ids, attention_mask=mask, pixel_values=pixels, **{CACHE: cache})
            cache = cache if own else out.past_key_values
            token, m = out.logits[:, -1:].argmax(-1), mask
            tokens = [token]
            for _ in range(3):
                m = torch.cat([m, torch.ones_like(m[:, :1])], 1)
                token = model(input_ids=token, attention_mask=m, **{CACHE: cache}).logits[:, -1:].argmax(-1)
                tokens.append(token)
        return torch.cat(tokens, 1)

    expected = loop(own=True)
    vtattn.patch.llava(model, kv=kv.LookM(budget=1.0, recent=0.1))
    assert torch.equal(loop(own=False), expected)
    with pytest.raises(ValueError, match="outputs.past_key_values"):
        loop(own=True)


def test_llava_kv_an_empty_cache_reused_for_new_prompts():
    """The same empty DynamicCache passed to generate twice (it is replaced, so it stays empty): both
    are new prompts and run."""
    model = vtattn.patch.llava(llava(), kv=kv.LookM(budget=0.3, recent=0.1))
    ids, mask = prompts([[36]])
    cache = transformers.DynamicCache(config=model.config.text_config)
    options = dict(input_ids=ids, attention_mask=mask, pixel_values=_images(1), max_new_tokens=3, do_sample=False)
    with torch.no_grad():
        first = model.generate(**options, **{CACHE: cache})
        assert torch.equal(model.generate(**options, **{CACHE: cache}), first)
