"""Faithful-to-the-release options (issue 17 item 6), beside vtattn's own rules (the defaults):
HiRED's budget split over LLaVA-NeXT's views as the authors' code computes it
(`hired_split="release"`), and LOOK-M's release merges (`merge_filter="release"`), each against a
reference written from the release's steps and on the issue's example."""
import pytest
import torch

import vtattn
from vtattn import pruning
from _vlm import (IMAGE, clip_config, eager_attentions, manual_logits, positions, prompts, text_config, topk,
                  transformers)

# ---- HiRED ------------------------------------------------------------------------------------------

# The issue's example: an image of (168, 168) on 84-pixel views with 14-pixel patches (6 x 6 = 36
# tokens a view) is the base view + 2 x 2 crops; rate 0.3, alpha 0.5. This base-view layer-0 [CLS]
# row puts 6, 3, 3, 6 of its top 18 tokens in the release's row-major chunks of 9 tokens, and
# region masses of 7.03, 6.35, 6.51, 5.78 in the four 3 x 3 quadrants vtattn uses.
EXAMPLE_ROW = torch.tensor([
    [1.18, 0.39, 1.37, 1.31, 1.06, 1.10], [0.22, 0.19, 1.11, 0.15, 0.32, 0.27],
    [0.13, 1.21, 1.23, 0.38, 0.39, 1.37], [0.07, 0.11, 1.21, 0.18, 0.24, 0.30],
    [1.30, 0.22, 1.16, 0.17, 1.03, 1.38], [1.26, 0.06, 1.12, 0.34, 1.09, 1.05]], dtype=torch.float64).flatten()


def _release_budgets(views, n, keep, alpha, early):
    """The release's HiRED_token_selection / HiRED_sub_img_budgets budget arithmetic, step by step
    (the crop chunks by reshape: n must divide by the crop count, as there)."""
    total = int(views * n * keep)
    base = min(int(total * alpha), n)
    share = min(total - base, (views - 1) * n)
    marked = torch.zeros(n, dtype=torch.bool)
    marked[topk(early, int(n * (1 - alpha)))] = True
    counts = marked.reshape(views - 1, -1).sum(-1)
    ratio = counts / counts.sum()
    return [base] + torch.clamp((ratio * share).int(), max=n).tolist()


def test_hired_release_split_on_the_issue_example():
    release = pruning.hired_budgets_release(0.3, 0.5, 5, EXAMPLE_ROW)
    assert release.tolist() == [27, 9, 4, 4, 9] == _release_budgets(5, 36, 0.3, 0.5, EXAMPLE_ROW)
    mass = pruning.region_mass(EXAMPLE_ROW, 6, 2, 2)
    assert pruning.hired_budgets(0.3, 0.5, [36] * 5, mass).tolist() == [27, 7, 7, 7, 6]  # vtattn's (default)


@pytest.mark.parametrize("keep, alpha, views", [(0.2, 0.5, 3), (0.45, 0.3, 4), (0.9, 0.5, 5), (0.05, 0.8, 5)])
def test_hired_release_split_matches_the_release_arithmetic(keep, alpha, views):
    g = torch.Generator().manual_seed(views)
    early = torch.rand(36, generator=g, dtype=torch.float64)
    assert pruning.hired_budgets_release(keep, alpha, views, early).tolist() == _release_budgets(
        views, 36, keep, alpha, early)


def test_hired_release_split_edges():
    early = torch.rand(36, dtype=torch.float64)
    assert pruning.hired_budgets_release(0.5, 1.0, 5, early).tolist() == [36, 0, 0, 0, 0]  # release: 0 / 0
    assert pruning.hired_budgets_release(20, 0.5, 3, early).tolist()[0] == 10  # a count: the total itself
    assert pruning.hired_budgets_release(0.5, 0.5, 1, early).tolist() == [9]  # one view: its alpha share only
    with pytest.raises(ValueError, match="alpha"):
        pruning.hired_budgets_release(0.5, 1.5, 3, early)
    with pytest.raises(ValueError, match="hired_split"):
        vtattn.patch.VisionSelect(keep=0.5, method="hired", hired_split="paper")


PINPOINTS = [[84, 168], [168, 84], [168, 168], [84, 252]]
SIZES = torch.tensor([[168, 168], [100, 180], [84, 230]])  # 2 x 2 crops; 2 x 2 and 1 x 3 with unpadding


def _llava_next():
    config = transformers.LlavaNextConfig(vision_config=clip_config(image_size=84), text_config=text_config(),
                                          image_token_index=IMAGE, image_grid_pinpoints=PINPOINTS,
                                          vision_feature_layer=-2, vision_feature_select_strategy="default")
    torch.manual_seed(0)
    return transformers.LlavaNextForConditionalGeneration(config).eval()


def _release_keeps(model, views, pixels, keep, alpha):
    """Per image, the packed positions the release keeps: its budgets, the base view's top tokens by
    the feature layer's [CLS] row (heads summed), each crop's top tokens among all 36 of its slots
    (padding too) of which unpadding leaves the real ones; a grid row's newline with its row
    (vtattn's layout; the release drops newlines)."""
    flat = torch.cat([p[:v] for p, v in zip(pixels, views)])
    attentions, _ = eager_attentions(model.model.vision_tower, flat)
    n = 36
    ids = (torch.arange(len(flat) * n) + 1.0).view(len(flat), n, 1)
    packed_ids = model.model.pack_image_features(list(ids.split(views)), SIZES, "default",
                                                 image_newline=torch.zeros(1))[0]
    select = attentions[2][:, :, 0, 1:].sum(1)
    early = attentions[0][:, :, 0, 1:].sum(1)
    keeps, first = [], 0
    for v, pid in zip(views, packed_ids):
        pid = pid[:, 0].long() - 1  # -1: newline
        budgets = _release_budgets(v, n, keep, alpha, early[first])
        kept = {(first + j) * n + t for j in range(v) for t in topk(select[first + j], budgets[j]).tolist()}
        keep_pos, row = [], []
        for pos, t in enumerate(pid.tolist()):
            if t >= 0 and t in kept:
                keep_pos.append(pos)
                row.append(pos)
            elif t < 0:
                if any(p >= n for p in row):
                    keep_pos.append(pos)
                row = []
        keeps.append(torch.tensor(keep_pos))
        first += v
    return keeps


def test_llava_next_hired_release_split_matches_the_release():
    from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches
    model = _llava_next()
    views = [image_size_to_num_patches(s, PINPOINTS, 84) for s in SIZES]
    pixels = torch.randn(3, max(views), 3, 84, 84, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        packed = model.model.get_image_features(pixels, SIZES).pooler_output
    spans = [len(p) for p in packed]
    ids, mask = prompts([[spans[0]], [spans[1], spans[2]]])
    keeps = _release_keeps(model, views, pixels, 0.3, 0.5)
    expected, short = manual_logits(model, ids, mask, spans, [p[k] for p, k in zip(packed, keeps)])
    inputs = dict(input_ids=ids, attention_mask=mask, pixel_values=pixels, image_sizes=SIZES)
    vtattn.patch.llava(model, keep=0.3, method="hired", hired_split="release")
    with torch.no_grad():
        out = model(**inputs, position_ids=positions(mask))
    assert out.logits.shape == expected.shape
    real = short.bool()
    torch.testing.assert_close(out.logits[real], expected[real], atol=2e-5, rtol=1e-5)
    vtattn.patch.llava(model, keep=0.3, method="hired")  # the default split keeps other tokens here
    with torch.no_grad():
        default = model(**inputs, position_ids=positions(mask)).logits
    assert default.shape != expected.shape or not torch.allclose(default[real], expected[real])


# ---- LOOK-M ------------------------------------------------------------------------------------------

def _release_merge(k, v, kept, mode):
    """LOOK-M's release (TextAVGMerge / TextWeightedMerge, batch 1), step by step with its own ops,
    its avg indexing fixed (the filtered rows as src): k, v [1, H, L, D]; kept [H, L] bool (the same
    count per head, as there); every other token is evicted."""
    H, L = kept.shape
    D = k.shape[-1]
    k_kept, v_kept = k[0][kept].view(1, H, -1, D), v[0][kept].view(1, H, -1, D)
    k_out, v_out = k[0][~kept].view(1, H, -1, D), v[0][~kept].view(1, H, -1, D)
    sim = (k_out / k_out.norm(dim=-1, keepdim=True)) @ (k_kept / k_kept.norm(dim=-1, keepdim=True)).transpose(-1, -2)
    max_values, max_indices = sim.max(dim=-1)
    filtered = (max_values.mean(1) >= max_values.mean()).squeeze(0)
    index = max_indices[..., filtered].unsqueeze(-1).repeat(1, 1, 1, D)
    weights = max_values[..., filtered].unsqueeze(-1) if mode == "weighted" else 1.0
    k_new = torch.scatter_reduce(k_kept, 2, index, weights * k_out[..., filtered, :], reduce="mean", include_self=True)
    v_new = torch.scatter_reduce(v_kept, 2, index, weights * v_out[..., filtered, :], reduce="mean", include_self=True)
    return k_new, v_new


def _kept_sets(H, L, K, g):
    """[H, L] bool, K kept per head, and the kept positions ascending [1, H, K]."""
    kept = torch.zeros(H, L, dtype=torch.bool)
    for h in range(H):
        kept[h, torch.randperm(L, generator=g)[:K]] = True
    return kept, torch.stack([kept[h].nonzero()[:, 0] for h in range(H)])[None]


@pytest.mark.parametrize("mode", ["avg", "weighted"])
def test_lookm_release_merge_matches_the_release_steps(mode):
    g = torch.Generator().manual_seed(0)
    H, L, K, D = 4, 40, 12, 16
    k, v = torch.randn(1, H, L, D, generator=g, dtype=torch.float64), torch.randn(1, H, L, D, generator=g,
                                                                                  dtype=torch.float64)
    kept, indices = _kept_sets(H, L, K, g)
    expected = _release_merge(k, v, kept, mode)
    got = vtattn.kv.merge_kv(k, v, indices, torch.ones(1, H, L, dtype=torch.bool), mode, "release")
    torch.testing.assert_close(got, expected)
    default = vtattn.kv.merge_kv(k, v, indices, torch.ones(1, H, L, dtype=torch.bool), mode)
    assert not torch.allclose(default[0], expected[0])  # the filter (and, weighted, the weights) differ


def test_lookm_release_merge_per_sample_and_only_mergeable_tokens():
    """Samples of a batch are filtered on their own, and tokens that may not merge stay out of the
    filter's means: sample 1's first 5 tokens are text, kept by every head (LOOK-M keeps all text),
    which is the release's setting (it evicts image tokens only)."""
    g = torch.Generator().manual_seed(1)
    B, H, L, K, D = 2, 2, 30, 10, 8
    k, v = torch.randn(B, H, L, D, generator=g, dtype=torch.float64), torch.randn(B, H, L, D, generator=g,
                                                                                  dtype=torch.float64)
    kept0, indices0 = _kept_sets(H, L, K, g)
    kept1, _ = _kept_sets(H, L - 5, K, g)
    kept1 = torch.cat([torch.ones(H, 5, dtype=torch.bool), kept1], 1)
    indices1 = torch.stack([kept1[h].nonzero()[:, 0] for h in range(H)])[None]
    indices = torch.cat([torch.cat([indices0, indices0.new_full((1, H, 5), -1)], 2), indices1])
    mergeable = torch.ones(B, H, L, dtype=torch.bool)
    mergeable[1, :, :5] = False
    both = vtattn.kv.merge_kv(k, v, indices, mergeable, "weighted", "release")
    for b, kept in enumerate([kept0, kept1]):
        expected = _release_merge(k[b:b + 1], v[b:b + 1], kept, "weighted")
        K_b = expected[0].shape[2]
        torch.testing.assert_close(both[0][b:b + 1, :, :K_b], expected[0])
        torch.testing.assert_close(both[1][b:b + 1, :, :K_b], expected[1])
        assert not both[0][b, :, K_b:].any()  # padding slots: zero rows


def test_lookm_release_option_checks_and_model():
    from _vlm import llava
    with pytest.raises(ValueError, match="merge_rule"):
        vtattn.kv.LookM(0.2, 0.1, merge="pivotal", merge_rule="release")
    with pytest.raises(ValueError, match="merge_rule"):
        vtattn.kv.LookM(0.2, 0.1, merge="avg", merge_rule="paper")
    policy = vtattn.kv.LookM(0.2, 0.1, merge="avg", merge_rule="release")
    assert vtattn.kv.DecodeH2O(policy, every=4, recent=4).merge_rule == "release"
    ids, mask = prompts([[36], [36, 36]])
    pixels = torch.randn(3, 3, 84, 84, generator=torch.Generator().manual_seed(1))
    options = dict(max_new_tokens=4, do_sample=False, return_dict_in_generate=True)
    model = vtattn.patch.llava(llava(), kv=vtattn.kv.LookM(0.2, 0.1, merge="avg"))
    with torch.no_grad():
        default = model.generate(input_ids=ids, attention_mask=mask, pixel_values=pixels, **options)
        vtattn.patch.llava(model, kv=policy)
        out = model.generate(input_ids=ids, attention_mask=mask, pixel_values=pixels, **options)
        for b, images in enumerate([slice(0, 1), slice(1, 3)]):  # batched = each sample alone
            alone = model.generate(input_ids=ids[b:b + 1, mask[b].bool()], pixel_values=pixels[images], **options)
            assert torch.equal(alone.sequences[0, -4:], out.sequences[b, -4:]), b
    # the same keep-sets, other merged rows
    assert torch.equal(out.past_key_values.kept_positions(0), default.past_key_values.kept_positions(0))
