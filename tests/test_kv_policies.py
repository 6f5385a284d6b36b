"""KV keep-set policies and budgets against reference rules computed from float64 eager attention
probabilities (helpers.naive_probs), with plain-Python top-k."""
import pytest
import torch

import vtattn
from vtattn import kv
from helpers import naive_probs

B, HKV, D = 2, 2, 16


def make(L, group, seed):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, HKV * group, L, D, generator=g)
    k = torch.randn(B, HKV, L, D, generator=g)
    image = torch.zeros(B, L, dtype=torch.bool)
    for b in range(B):  # three image spans, text around and between them
        for start in torch.randperm(L - 8, generator=g)[:3].tolist():
            image[b, start + 1:start + 1 + int(torch.randint(3, 8, (1,), generator=g))] = True
    return q, k, image


def ref_scores(q, k, rows, reduce="mean"):
    """float64 [B, Hkv, L]: attention mass from `rows` (causal), reduced over each GQA group."""
    s = naive_probs(q, k, True, D ** -0.5)[:, :, rows].sum(2)
    s = s.view(B, k.shape[1], -1, k.shape[2])
    return s.mean(2) if reduce == "mean" else s.amax(2)


def top(score, candidates, n):
    return set(sorted(candidates, key=lambda j: (-float(score[j]), j))[:max(n, 0)])


def check(keep, ref, scores, ref_s):
    """keep (KeepSet) equals the reference sets {(b, h): set}; positions the two disagree on must be
    float64 near-ties (fp32 kernel scores can swap them)."""
    assert keep.indices.dtype == torch.int64 and keep.scores.dtype == torch.float32
    torch.testing.assert_close(keep.scores.double(), scores, atol=1e-5, rtol=1e-4)
    for b in range(B):
        for h in range(keep.counts.shape[1]):
            n = int(keep.counts[b, h])
            got = keep.indices[b, h, :n].tolist()
            assert got == sorted(got) and (keep.indices[b, h, n:] == -1).all()
            assert n == len(ref[b, h]), (b, h)
            diff = set(got) ^ ref[b, h]
            if diff:
                vals = [float(ref_s[b, h, j]) for j in diff]
                assert max(vals) - min(vals) < 1e-5, (b, h, sorted(diff))
    H = keep.counts.shape[1]
    assert [[set(torch.nonzero(m).flatten().tolist()) for m in row] for row in keep.mask] == \
        [[set(keep.indices[b, h, :int(keep.counts[b, h])].tolist()) for h in range(H)] for b in range(B)]


CASES = [(37, 1, 1), (37, 2, 2), (101, 4, 3), (101, 1, 4)]


@pytest.mark.parametrize("L,group,seed", CASES)
@pytest.mark.parametrize("budget,recent", [(0.3, 0.1), (0.5, 3), (0.05, 0.0)])
def test_lookm(L, group, seed, budget, recent):
    q, k, image = make(L, group, seed)
    s = ref_scores(q, k, slice(None))
    hh, rc = int(budget * L), recent if isinstance(recent, int) else int(recent * L)
    ref = {}
    for b in range(B):
        window = set(range(L - rc, L))
        text = {j for j in range(L) if not image[b, j]}
        for h in range(HKV):
            imgs = [j for j in range(L) if image[b, j] and j not in window]
            ref[b, h] = window | text | top(s[b, h], imgs, hh - len(text - window))
    window = {"recent_tokens": recent} if isinstance(recent, int) else {"recent": recent}
    check(kv.LookM(budget, merge="pivotal", **window).select(q, k, modality=image), ref, s, s)


@pytest.mark.parametrize("L,group,seed", CASES)
@pytest.mark.parametrize("pool,reduce", [("max", "mean"), ("avg", "mean"), ("max", "max")])
def test_snapkv(L, group, seed, pool, reduce):
    q, k, _ = make(L, group, seed)
    W, kernel, budget = 8, 5, 0.4
    raw = ref_scores(q, k, slice(L - W, L), reduce)
    s = raw.clone()
    for j in range(L - W):  # same padding; avg counts the padding (count_include_pad), as SnapKV
        win = raw[..., max(j - 2, 0):min(j + 3, L - W)]
        s[..., j] = win.amax(-1) if pool == "max" else win.sum(-1) / kernel
    ref = {(b, h): set(range(L - W, L)) | top(s[b, h], range(L - W), int(budget * L) - W)
           for b in range(B) for h in range(HKV)}
    check(kv.SnapKV(budget, window=W, kernel=kernel, pool=pool, reduce=reduce).select(q, k), ref, s, s)


@pytest.mark.parametrize("L,group,seed", CASES)
def test_h2o_with_lse(L, group, seed):
    q, k, _ = make(L, group, seed)
    q, k = (t.transpose(1, 2).contiguous().transpose(1, 2) for t in (q, k))  # transformers' [B, L, H, D] layout
    _, lse = vtattn.attention(q, k, k, causal=True, return_lse=True)
    s = ref_scores(q, k, slice(None))
    rc, hh = int(0.1 * L), int(0.2 * L)
    ref = {(b, h): set(range(L - rc, L)) | top(s[b, h], range(L - rc), hh) for b in range(B) for h in range(HKV)}
    check(kv.H2O(0.2, 0.1).select(q, k, lse=lse), ref, s, s)


@pytest.mark.parametrize("L,group,seed", CASES[:2])
def test_keynorm_and_streaming(L, group, seed):
    q, k, _ = make(L, group, seed)
    s = -k.double().norm(dim=-1)
    ref = {(b, h): top(s[b, h], range(L), int(0.3 * L)) for b in range(B) for h in range(HKV)}
    check(kv.KeyNorm(0.3).select(q, k), ref, s, s)
    keep = kv.StreamingLLM(4, 6).select(q, k)
    assert (keep.counts == 10).all() and keep.indices[0, 0].tolist() == [0, 1, 2, 3] + list(range(L - 6, L))


@pytest.mark.parametrize("L,group,seed", CASES)
@pytest.mark.parametrize("floor", [0.0, 0.2, 0.5, 1.0])
def test_adakv_snapkv(L, group, seed, floor):
    q, k, _ = make(L, group, seed)
    W, budget = 4, 0.3
    raw = ref_scores(q, k, slice(L - W, L))
    s = raw.clone()
    for j in range(L - W):
        s[..., j] = raw[..., max(j - 3, 0):min(j + 4, L - W)].amax(-1)
    free = int(budget * L) - W
    f = int(floor * free)
    ref = {}
    for b in range(B):
        base = {h: top(s[b, h], range(L - W), f) for h in range(HKV)}
        rest = [(h, j) for h in range(HKV) for j in range(L - W) if j not in base[h]]
        extra = sorted(rest, key=lambda hj: (-float(s[b, hj[0], hj[1]]), hj[0] * L + hj[1]))[:HKV * (free - f)]
        for h in range(HKV):
            ref[b, h] = set(range(L - W, L)) | base[h] | {j for hh, j in extra if hh == h}
    keep = kv.AdaKV(kv.SnapKV(budget, window=W), floor=floor).select(q, k)
    assert (keep.counts.sum(1) == HKV * (free + W)).all()  # the layer total is exact
    assert (keep.counts >= W + f).all()  # the per-head floor
    if floor == 1.0:  # no sharing: plain SnapKV
        assert torch.equal(keep.mask, kv.SnapKV(budget, window=W).select(q, k).mask)
    check(keep, ref, s, s)


def test_adakv_h2o_modality_caps():
    L, cap = 101, 2
    q, k, image = make(L, 2, 7)
    s = ref_scores(q, k, slice(None))
    spans = kv.budgets.image_spans(image)
    rc, hh = int(0.1 * L), int(0.4 * L)
    ref = {}
    for b in range(B):
        window = set(range(L - rc, L))
        text = {j for j in range(L) if not image[b, j]}
        for h in range(HKV):
            allowed = set()
            for sid in set(spans[b].tolist()) - {-1}:
                allowed |= top(s[b, h], [j for j in range(L) if spans[b, j] == sid and j not in window], cap)
            ref[b, h] = window | text | top(s[b, h], allowed, hh - len(text - window))
    check(kv.Modality(kv.H2O(0.4, 0.1), max_per_image=cap).select(q, k, modality=image), ref, s, s)
    ada = kv.AdaKV(kv.Modality(kv.H2O(0.4, 0.1), max_per_image=cap)).select(q, k, modality=image)
    assert torch.equal(ada.mask, kv.Modality(kv.AdaKV(kv.H2O(0.4, 0.1)), max_per_image=cap).select(
        q, k, modality=image).mask)  # the wrappers compose either way round
    no_text = kv.Modality(kv.H2O(0.4, 0.1), keep_text=False, max_per_image=0).select(q, k, modality=image)
    assert not (no_text.mask & image[:, None] & (torch.arange(L) < L - rc)).any()  # only text chosen by score
    assert (no_text.counts == rc + hh).all()
    text = ~image[:, None] | (torch.arange(L) >= L - rc)
    assert (ada.mask | ~text).all()  # text and the recent window always kept


def test_image_spans():
    image = torch.tensor([[False, True, True, False, True, False], [True, True, True, True, False, False]])
    assert kv.budgets.image_spans(image).tolist() == [[-1, 0, 0, -1, 1, -1], [0, 0, 0, 0, -1, -1]]
    ids = torch.tensor([[-1, 0, 0, 1, 1, -1]])  # adjacent images need explicit ids
    assert torch.equal(kv.budgets.image_spans(ids), ids)


@pytest.mark.parametrize("make_policy", [lambda: kv.LookM(1.0, 0.0), lambda: kv.SnapKV(1.0, window=5),
                                         lambda: kv.H2O(1.0, 0.0), lambda: kv.KeyNorm(1.0),
                                         lambda: kv.AdaKV(kv.SnapKV(1.0, window=5), floor=0.3),
                                         lambda: kv.AdaKV(kv.Modality(kv.H2O(1.0, recent_tokens=3), max_per_image=100))])
def test_budget_one_keeps_everything(make_policy):
    q, k, image = make(37, 2, 11)
    keep = make_policy().select(q, k, modality=image)
    assert (keep.counts == 37).all() and torch.equal(keep.indices, torch.arange(37).expand(B, HKV, 37))


def test_pyramid():
    ratios = kv.pyramid(8, 0.25)
    assert ratios == sorted(ratios, reverse=True) and abs(sum(ratios) / 8 - 0.25) < 1e-12
    counts = kv.pyramid(7, mean_budget_tokens=100)
    assert counts == sorted(counts, reverse=True) and sum(counts) == 700 and all(isinstance(c, int) for c in counts)
    assert kv.pyramid(1, 0.6) == [0.6]
    with pytest.raises(ValueError, match="exceeds 1"):
        kv.pyramid(4, 0.8)
    with pytest.raises(ValueError, match="num_layers"):
        kv.pyramid(0, 0.5)


@pytest.mark.parametrize("budget", [0, 0.0, -0.5, 1.5, -3])
@pytest.mark.parametrize("ctor", [lambda b: kv.LookM(b, 0.1), lambda b: kv.SnapKV(b), lambda b: kv.H2O(b, 0.1),
                                  kv.KeyNorm])
def test_bad_budget(ctor, budget):
    with pytest.raises(ValueError, match="budget"):
        ctor(budget)


def test_bad_inputs():
    q, k, image = make(37, 2, 5)
    with pytest.raises(ValueError, match="window=40 is larger than the prompt"):
        kv.SnapKV(0.5, window=40).select(q, k)
    with pytest.raises(ValueError, match="multiple of the kv head count"):
        kv.H2O(0.5, 0.1).select(q[:, :3], k)
    with pytest.raises(ValueError, match="modality must be a tensor of shape"):
        kv.LookM(0.5, 0.1).select(q, k, modality=image[:, :-1])
    with pytest.raises(ValueError, match="LookM needs modality"):
        kv.LookM(0.5, 0.1).select(q, k)
    with pytest.raises(ValueError, match="agree in B, L and D"):
        kv.H2O(0.5, 0.1).select(q[:, :, :-1], k)
    for bad in (lambda: kv.LookM(0.5, 1.5), lambda: kv.LookM(0.5, 0.1, merge="sum"),
                lambda: kv.SnapKV(0.5, kernel=4), lambda: kv.SnapKV(0.5, window=0), lambda: kv.SnapKV(0.5, pool="min"),
                lambda: kv.H2O(0.5, 0.1, reduce="sum"), lambda: kv.AdaKV(kv.SnapKV(0.5), floor=1.5),
                lambda: kv.StreamingLLM(0, 0), lambda: kv.Modality(kv.H2O(0.5, 0.1), max_per_image=-1)):
        with pytest.raises(ValueError):
            bad()


FIXED = {
    "lookm": kv.LookM(0.2, 0.1), "snapkv": kv.SnapKV(0.3, window=3), "h2o": kv.H2O(0.2, 0.1),
    "keynorm": kv.KeyNorm(0.3), "streaming": kv.StreamingLLM(2, 5),
    "modality-cap": kv.Modality(kv.SnapKV(0.4, window=2), max_per_image=3),
    "modality-text": kv.Modality(kv.H2O(0.2, 0.1)), "decode-h2o": kv.DecodeH2O(kv.LookM(0.2, 0.1), every=2),
}


@pytest.mark.parametrize("name", FIXED)
def test_fixed_size_policies_keep_as_many_whatever_the_scores(name):
    """A `fixed_size` policy's keep-set sizes follow from the prompt alone (a cache reads them once
    per prompt, not per layer): other queries and keys, same sizes, and given those sizes `chosen`
    keeps what it keeps when it reads them. AdaKV (sizes by score) is not fixed-size."""
    policy = FIXED[name]
    assert policy.fixed_size and not kv.AdaKV(kv.SnapKV(0.3, window=3)).fixed_size
    B, Hkv, L, D = 2, 3, 41, 16
    modality = torch.zeros(B, L, dtype=torch.bool)
    modality[0, 4:20] = modality[0, 24:33] = modality[1, 1:30] = True
    sizes = None
    for seed in range(4):
        g = torch.Generator().manual_seed(seed)
        q, k = torch.randn(B, 2 * Hkv, L, D, generator=g), torch.randn(B, Hkv, L, D, generator=g) * (1 + seed)
        keep = policy.select(q, k, modality=modality)
        assert torch.equal(keep.counts, torch.from_numpy(keep.host_counts))
        if sizes is None:
            sizes = keep.host_counts
        assert (keep.host_counts == sizes).all(), seed
        given = policy.chosen(q, k, modality, None, sizes=sizes)
        assert torch.equal(given.indices, keep.indices) and torch.equal(given.counts, keep.counts)


def test_adakv_sizes_follow_the_scores():
    """The control: AdaKV's per-head sizes change with the scores (so it must not be fixed-size)."""
    policy = kv.AdaKV(kv.SnapKV(0.3, window=3))
    counts = set()
    for seed in range(4):
        g = torch.Generator().manual_seed(seed)
        q, k = torch.randn(1, 6, 41, 16, generator=g), torch.randn(1, 3, 41, 16, generator=g) * (1 + seed)
        counts.add(tuple(policy.select(q, k).host_counts.ravel().tolist()))
    assert len(counts) > 1
