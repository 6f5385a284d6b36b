"""Decode-time eviction (`vtattn.kv.DecodeH2O`): the cache's batched scoring and eviction against
H2O's rule run one token at a time on float64 per-head lists, beams, memory over a long
generation, bad arguments, and generate on a tiny LLaVA."""
import pytest
import torch

import vtattn
from vtattn import kv
from _vlm import llava, prompts
from helpers import naive_probs

transformers = pytest.importorskip("transformers")
from vtattn.kv.cache import CompressedCache  # noqa: E402  (needs transformers)

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]
INNER = [kv.H2O(budget_tokens=6, recent_tokens=2), kv.SnapKV(0.4, window=3)]  # the prefill policies DecodeH2O wraps


class StepwiseH2O:
    """H2O on one (batch, kv head): float64 keys, values, original positions and accumulated mass;
    each decode step adds its attention rows (GQA mean) to the scores, every `every` tokens the
    lowest-scored tokens outside the last `recent` go until the head is back to its prefill length."""

    def __init__(self, k, v, pos, score, every, recent, scale):
        self.k, self.v, self.pos, self.score = k.double(), v.double(), pos, score.double()
        self.base, self.every, self.recent, self.scale, self.pending = len(pos), every, recent, scale, 0

    def step(self, q, k, v, pos):
        """q [G, n, D] at positions pos [n]; returns the output [G, n, D] and, on an eviction
        step, the positions it evicts (else None)."""
        self.k, self.v = torch.cat([self.k, k.double()]), torch.cat([self.v, v.double()])
        self.pos, self.score = torch.cat([self.pos, pos]), torch.cat([self.score, self.score.new_zeros(len(pos))])
        s = q.double() @ self.k.T * self.scale
        p = s.masked_fill(self.pos[None, None] > pos[None, :, None], float("-inf")).softmax(-1)
        self.score += p.sum((0, 1)) / q.shape[0]
        self.pending += len(pos)
        if self.pending < self.every:
            return p @ self.v, None
        self.pending = 0
        L = len(self.pos)
        drop = max(0, min(L - self.base, L - self.recent))
        order = sorted(range(max(L - self.recent, 0)), key=lambda i: (float(self.score[i]), i))
        return p @ self.v, self.pos[sorted(order[:drop])]

    def keep(self, positions):
        """Follow the cache's choice (checked by the caller) so later steps compare like with like."""
        at = torch.isin(self.pos, positions)
        self.k, self.v, self.pos, self.score = self.k[at], self.v[at], self.pos[at], self.score[at]


def _prefill(policy, q, k, v, valid, scale):
    """Per (b, h) StepwiseH2O states after the prefill policy ran on each sample's real tokens
    (policies score with the default scale: q is rescaled for them, as the cache does)."""
    B, Hq, L, D = q.shape
    Hkv = k.shape[1]
    heads = []
    for b in range(B):
        r = valid[b].nonzero()[:, 0]
        keep = policy.policy.select(q[b:b + 1, :, r] * (scale * D ** 0.5), k[b:b + 1, :, r])
        mass = naive_probs(q[b:b + 1, :, r], k[b:b + 1, :, r], True, scale).sum(2)
        mass = mass.view(Hkv, Hq // Hkv, -1).mean(1)
        heads.append([])
        for h in range(Hkv):
            i = keep.indices[0, h][keep.indices[0, h] >= 0]
            heads[b].append(StepwiseH2O(k[b, h, r[i]], v[b, h, r[i]], r[i], mass[h, i], policy.every, policy.recent,
                                         scale))
    return heads


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("padded", [False, True])
# recent 10: more than the prefill keeps; scale 0.4: not the default (the cache rescales q)
@pytest.mark.parametrize("every,recent,scale", [(1, 2, None), (3, 2, 0.4), (3, 10, None)])
@pytest.mark.parametrize("inner", INNER, ids=["h2o", "snapkv"])
def test_decode_h2o_matches_stepwise_h2o(inner, every, recent, scale, padded, device):
    g = torch.Generator().manual_seed(5)
    B, Hq, Hkv, L, D = 2, 4, 2, 21, 16
    q, k, v = (torch.randn(B, h, L, D, generator=g, dtype=torch.float64).float() for h in (Hq, Hkv, Hkv))
    scale = scale or D ** -0.5
    valid = torch.ones(B, L, dtype=torch.bool)
    if padded:
        valid[1, :5] = False
    mask = (torch.ones(L, L, dtype=torch.bool).tril() & valid[:, None, :])[:, None] if padded else None
    policy = kv.DecodeH2O(inner, every=every, recent=recent)
    cache = CompressedCache(policy, page_size=4, room=3)
    cache.update(k.to(device), v.to(device), 0)
    layer = cache.layers[0]
    layer.attend(q.to(device), k.to(device), v.to(device), None if mask is None else mask.to(device), scale)
    heads = _prefill(policy, q, k, v, valid, scale)
    tol = 1e-5 if device == "cpu" else 2e-3  # tf32 kernels on the GPU
    for step in range(10):
        n = 2 if step == 4 else 1
        qn, kn, vn = (torch.randn(B, h, n, D, generator=g) for h in (Hq, Hkv, Hkv))
        new = torch.arange(layer.seen, layer.seen + n)
        layer.update(kn.to(device), vn.to(device))
        out = layer.attend(qn.to(device), None, None, None, scale).cpu()
        kept = layer.pages.positions().cpu()
        for b in range(B):
            for h in range(Hkv):
                ref, gone = heads[b][h].step(qn[b, 2 * h:2 * h + 2], kn[b, h], vn[b, h], new)
                torch.testing.assert_close(out[b, 2 * h:2 * h + 2].double(), ref, atol=tol, rtol=tol)
                got = kept[b, h][kept[b, h] >= 0]
                state = heads[b][h]
                if gone is not None:  # the evicted are the lowest-scored candidates (up to rounding)
                    lost = state.pos[~torch.isin(state.pos, got)]
                    older = state.pos[:max(len(state.pos) - recent, 0)]
                    assert len(lost) == len(gone) and torch.isin(lost, older).all()
                    if device == "cpu":
                        assert torch.equal(lost, gone), (step, b, h)
                    survivors = state.score[:len(older)][torch.isin(older, got)]
                    if len(lost) and len(survivors):
                        assert state.score[torch.isin(state.pos, lost)].max() <= survivors.min() + tol
                    state.keep(got)
                assert torch.equal(got, state.pos), (step, b, h)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.parametrize("every,recent,scale", [(1, 2, None), (3, 2, 0.4), (3, 10, None)])
@pytest.mark.parametrize("inner", INNER, ids=["h2o", "snapkv"])
def test_static_decode_h2o_decodes_as_the_dynamic_cache(inner, every, recent, scale, padded, device):
    """A static cache evicts on device counts (`decode.StaticEviction`: per-step mass, a device step
    counter, freed slots refilled from the tail): each step the dynamic cache's output and kept
    positions (already checked against StepwiseH2O above), and each head's capacity is its floor plus
    `every` (pages rounded), however many tokens max_new_tokens allows."""
    g = torch.Generator().manual_seed(8)
    B, Hq, Hkv, L, D = 2, 4, 2, 21, 16
    q, k, v = (torch.randn(B, h, L, D, generator=g).to(device) for h in (Hq, Hkv, Hkv))
    scale = scale or D ** -0.5
    valid = torch.ones(B, L, dtype=torch.bool)
    if padded:
        valid[1, :5] = False
    mask = (torch.ones(L, L, dtype=torch.bool).tril() & valid[:, None, :])[:, None].to(device) if padded else None
    policy = kv.DecodeH2O(inner, every=every, recent=recent)
    caches = [CompressedCache(policy, page_size=4, room=3), CompressedCache(policy, page_size=4, max_new_tokens=99)]
    for cache in caches:
        cache.update(k, v, 0)
        cache.layers[0].attend(q, k, v, mask, scale)
    tol = 1e-5 if device == "cpu" else 2e-3
    for step in range(13):
        qn, kn, vn = (torch.randn(B, h, 1, D, generator=g).to(device) for h in (Hq, Hkv, Hkv))
        dynamic, static = (c.layers[0] for c in caches)
        outs = [(layer.update(kn, vn), layer.attend(qn, None, None, None, scale))[1] for layer in (dynamic, static)]
        torch.testing.assert_close(outs[1], outs[0], atol=tol, rtol=tol)
        assert torch.equal(caches[1].kept_positions(0), caches[0].kept_positions(0)), step
        assert torch.equal(static.pages.lengths, dynamic.pages.lengths)
    assert int(static.pages.pos.ge(0).sum()) == int(static.pages.lengths.sum())  # freed slots hold -1
    floor = torch.maximum(static.base, torch.tensor(recent))
    assert static.nbytes == int(((floor + every + 3) // 4 * 4).sum()) * 2 * D * 4  # k and v, fp32
    with pytest.raises(NotImplementedError, match="one token per step"):
        static.update(kn.expand(-1, -1, 2, -1), vn.expand(-1, -1, 2, -1))


def test_decode_h2o_holds_the_cache_at_its_prefill_size():
    g = torch.Generator().manual_seed(6)
    B, Hq, Hkv, L, D = 2, 4, 2, 64, 8
    q, k, v = (torch.randn(B, h, L, D, generator=g) for h in (Hq, Hkv, Hkv))
    cache = CompressedCache(kv.DecodeH2O(kv.AdaKV(kv.SnapKV(0.25, window=4)), every=8, recent=4), page_size=4, room=8)
    cache.update(k, v, 0)
    layer = cache.layers[0]
    layer.attend(q, k, v, None, 0.3)  # a non-default scale
    base = (layer.pages.positions() >= 0).sum(-1)
    pools = layer.pages.k.data_ptr(), layer.pages.v.data_ptr(), layer.pages.table.data_ptr()
    peak = 0
    for _ in range(200):
        kn, vn = torch.randn(B, Hkv, 1, D, generator=g), torch.randn(B, Hkv, 1, D, generator=g)
        layer.update(kn, vn)
        layer.attend(torch.randn(B, Hq, 1, D, generator=g), None, None, None, 0.3)
        lengths = (layer.pages.positions() >= 0).sum(-1)
        assert (lengths <= base + 8).all() and (lengths >= base).all()
        assert int((layer.pages.pos >= 0).sum()) == int(lengths.sum())  # freed slots hold position -1
        peak = max(peak, cache.kv_bytes())
    assert torch.equal(lengths, base)  # 200 = 25 evictions of 8: back at the prefill's lengths
    last = layer.pages.positions().gather(-1, lengths[..., None] - 4 + torch.arange(4))
    assert (last == torch.arange(L + 196, L + 200)).all()  # the recent window is never evicted
    assert peak <= int(((base + 8 + 8 + 3) // 4).sum()) * 4 * D * 2 * 4  # pages of kept + every + room
    # evictions compact each head within its own pages: room for `every` tokens, never a new layout
    assert (layer.pages.k.data_ptr(), layer.pages.v.data_ptr(), layer.pages.table.data_ptr()) == pools


def test_decode_h2o_beams_take_their_pending_queries():
    g = torch.Generator().manual_seed(7)
    B, Hq, Hkv, L, D = 2, 2, 1, 15, 8
    q, k, v = (torch.randn(B, h, L, D, generator=g) for h in (Hq, Hkv, Hkv))
    steps = [tuple(torch.randn(B, h, 1, D, generator=g) for h in (Hq, Hkv, Hkv)) for _ in range(5)]
    policy = kv.DecodeH2O(kv.H2O(budget_tokens=4, recent_tokens=1), every=4, recent=1)

    def run(rows, reorder_at):
        cache = CompressedCache(policy, page_size=4, room=2)
        cache.update(k[rows], v[rows], 0)
        layer = cache.layers[0]
        layer.attend(q[rows], k[rows], v[rows], None, D ** -0.5)
        for i, (qn, kn, vn) in enumerate(steps):
            if i == reorder_at:  # two queries are pending: both beams continue sample 1
                layer.reorder_cache(torch.tensor([1, 1]))
                rows = [1, 1]
            layer.update(kn[rows], vn[rows])
            out = layer.attend(qn[rows], None, None, None, D ** -0.5)
        return out, layer.pages.positions()

    out, pos = run([0, 1], reorder_at=2)
    alone, alone_pos = run([1], reorder_at=None)
    torch.testing.assert_close(out, alone.expand(2, -1, -1, -1), atol=1e-6, rtol=1e-6)
    assert torch.equal(pos, alone_pos.expand(2, -1, -1))


def test_decode_h2o_bad_arguments():
    with pytest.raises(TypeError, match="policy"):
        kv.DecodeH2O("h2o")
    with pytest.raises(ValueError, match="every"):
        kv.DecodeH2O(kv.H2O(budget_tokens=4, recent_tokens=1), every=0)
    with pytest.raises(ValueError, match="recent"):
        kv.DecodeH2O(kv.H2O(budget_tokens=4, recent_tokens=1), recent=-1)
    with pytest.raises(TypeError, match="outermost"):
        kv.AdaKV(kv.DecodeH2O(kv.H2O(budget_tokens=4, recent_tokens=1)))
    with pytest.raises(TypeError, match="outermost"):
        kv.DecodeH2O(kv.DecodeH2O(kv.H2O(budget_tokens=4, recent_tokens=1)))


@pytest.mark.parametrize("fastv", [None, 1], ids=["kv", "fastv+kv"])
def test_llava_decode_h2o_batch_equals_each_sample_alone_and_stays_bounded(fastv):
    policy = kv.DecodeH2O(kv.LookM(budget=0.3, recent=0.1, merge="avg"), every=2, recent=2)
    fastv = None if fastv is None else vtattn.patch.FastV(layer=fastv, keep=0.5)
    model = vtattn.patch.llava(llava(), keep=0.5, kv=policy, fastv=fastv)
    ids, mask = prompts([[36], [36, 36]])
    pixels = torch.randn(3, 3, 84, 84, generator=torch.Generator().manual_seed(1))
    options = dict(max_new_tokens=9, min_new_tokens=9, do_sample=False, return_dict_in_generate=True)
    with torch.no_grad():
        both = model.generate(input_ids=ids, attention_mask=mask, pixel_values=pixels, **options)
        for b, imgs in ((0, pixels[:1]), (1, pixels[1:])):
            alone = model.generate(input_ids=ids[b:b + 1, mask[b].bool()], pixel_values=imgs, **options)
            assert torch.equal(alone.sequences[0, -9:], both.sequences[b, -9:]), b
    newest = both.past_key_values.layers[0].seen - 1  # in the (vision-pruned) prompt's frame
    for layer in both.past_key_values.layers:  # 8 decode tokens stored (not the last): 4 evictions of 2
        lengths = (layer.pages.positions() >= 0).sum(-1)
        assert torch.equal(lengths, layer.base)
        last = layer.pages.positions().gather(-1, lengths[..., None] - 1)
        assert (last == newest).all()  # FastV's layers too
