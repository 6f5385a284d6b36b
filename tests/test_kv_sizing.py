"""How a dynamic CompressedCache is sized: pages of one token by default (no slot wasted to page
rounding), and, under a patched model's `generate`, each head's first layout holds the tokens
generate will append (up to what a growth would give it), so a short decode never relayouts and
its cache holds the kept tokens plus the new ones. A caller's `room` wins; unpatching removes the hook."""
import numpy as np
import pytest
import torch

import vtattn
from vtattn import kv
from vtattn.kv import pages
from test_kv_model_syncs import MODELS

pytest.importorskip("transformers")
from vtattn.kv.cache import CompressedCache  # noqa: E402  (needs transformers)

NEW = 6


def _generate(model, inputs, **options):
    options = {"max_new_tokens": NEW, **options}  # (max_new_tokens=None: max_length decides)
    with torch.no_grad():
        out = model.generate(**inputs, min_new_tokens=NEW, do_sample=False, pad_token_id=0,
                             return_dict_in_generate=True, **options)
    return out.sequences, (out.cache if "cache" in out else out.past_key_values)


@pytest.fixture
def grows(monkeypatch):
    """The growths (relayouts) of every Pages, as the n each was asked for."""
    calls = []
    grow = pages.Pages._grow
    monkeypatch.setattr(pages.Pages, "_grow", lambda self, n: (calls.append(n), grow(self, n))[1])
    return calls


@pytest.mark.parametrize("family", MODELS)
@pytest.mark.parametrize("stages", ["kv", "keep+kv", "fastv+kv"])
def test_generate_sizes_each_head_for_the_new_tokens(family, stages, grows):
    """Each head ends exactly full (its kept tokens plus generate's NEW - 1 appended), none grew, and
    the tokens are those of a cache that starts with one free slot and grows."""
    model, patch, inputs = MODELS[family]()
    policy = kv.LookM(0.2, 0.1)
    extra = {"kv": {}, "keep+kv": dict(keep=0.5), "fastv+kv": dict(fastv=vtattn.patch.FastV(layer=1, keep=0.5))}
    patch(model, kv=policy, **extra[stages])
    sized, cache = _generate(model, inputs)
    assert isinstance(cache, CompressedCache) and cache.upcoming == NEW - 1 and not grows
    for layer in cache.layers:
        p = layer.pages
        assert np.array_equal(p.capacity, p.host_lengths)
        assert layer.nbytes == int(p.host_lengths.sum()) * 2 * p.k.shape[-1] * p.k.element_size()
    grown, mine = _generate(model, inputs, **{_name(model): CompressedCache(policy, room=1)})
    assert mine.room == 1 and grows  # a caller's room wins: one free slot, then growth
    assert torch.equal(sized, grown)


@pytest.mark.parametrize("options", [{"max_length": "prompt+NEW"}, {"num_beams": 2}], ids=["max_length", "beams"])
def test_generate_sizes_heads_for_max_length_and_beams(options, grows):
    """generate's length from max_length (no max_new_tokens), and beam search (rows reordered each
    step): no growth, every head full at the end, the tokens of a growing cache."""
    model, patch, inputs = MODELS["llava"]()
    policy = kv.LookM(0.2, 0.1)
    patch(model, kv=policy)
    length = {"max_new_tokens": NEW}
    if "max_length" in options:
        length, options = {"max_length": inputs["input_ids"].shape[1] + NEW, "max_new_tokens": None}, {}
    sized, cache = _generate(model, inputs, **options, **length)
    assert cache.upcoming == NEW - 1 and not grows
    for layer in cache.layers:
        assert np.array_equal(layer.pages.capacity, layer.pages.host_lengths)
    grown, _ = _generate(model, inputs, **options, **length, **{_name(model): CompressedCache(policy, room=1)})
    assert grows and torch.equal(sized, grown)


def _name(model):
    from helpers import cache_name
    return cache_name(model)


def test_decode_h2o_keeps_its_own_room(grows):
    """A DecodeH2O layer evicts back to its prompt's count every `every` tokens: its heads keep room
    for `every`, however many tokens generate will append."""
    model, patch, inputs = MODELS["llava"]()
    patch(model, kv=kv.DecodeH2O(kv.LookM(0.2, 0.1), every=2, recent=1))
    _, cache = _generate(model, inputs)
    assert cache.upcoming == NEW - 1 and not grows
    for layer in cache.layers:
        assert np.array_equal(layer.pages.capacity, layer.base.numpy() + 2)


def test_unpatch_removes_the_generate_hook():
    model, patch, _ = MODELS["llava"]()
    own = model._prepare_cache_for_generation
    patch(model, kv=kv.LookM(0.2, 0.1))
    assert "_prepare_cache_for_generation" in model.__dict__
    vtattn.patch.unpatch(model)
    assert "_prepare_cache_for_generation" not in model.__dict__
    def mine(generation_config, model_kwargs, generation_mode, batch_size, max_cache_length):  # the caller's own
        return own(generation_config, model_kwargs, generation_mode, batch_size, max_cache_length)
    model._prepare_cache_for_generation = mine
    patch(model, kv=kv.LookM(0.2, 0.1))
    assert model._prepare_cache_for_generation is not mine
    vtattn.patch.unpatch(model)
    assert model.__dict__["_prepare_cache_for_generation"] is mine


def test_upcoming_room_stops_at_a_growth():
    """upcoming sizes a head for the tokens to come, at most what its first growth would add (a
    quarter of its length, at least GROWTH): a long generate holds no more than growth would. A
    fixed layout has exactly its room."""
    k = torch.randn(1, 3, 80, 4)
    counts = np.array([[80, 40, 3]])
    positions = torch.arange(80).expand(1, 3, 80)
    for upcoming, room in ((5, [5, 5, 5]), (1000, [20, 16, 16]), (0, [1, 1, 1])):
        p = pages.Pages(k, k, positions, counts, 1, 1, upcoming=upcoming)
        assert p.capacity.tolist() == [(counts[0] + room).tolist()], upcoming
    p = pages.Pages(k, k, positions, counts, 4, 1, upcoming=5)
    assert p.capacity.tolist() == [[88, 48, 8]]  # rounded up to whole pages
    p = pages.Pages(k, k, positions, counts, 1, 2, fixed=True, upcoming=1000)
    assert p.capacity.tolist() == [(counts[0] + 2).tolist()]


@pytest.mark.parametrize("counts", [[[9, 9, 9], [9, 9, 9]], [[9, 4, 9], [0, 7, 9]]], ids=["uniform", "ragged"])
@pytest.mark.parametrize("page_size", [1, 4])
def test_pages_store_and_grow_each_heads_rows(counts, page_size):
    """A layout holds each head's first counts[b, h] rows, in order, with their positions and scores,
    before and after growing (heads of one length and capacity move by one strided copy a pool,
    others slot by slot); the free slots' positions stay -1."""
    B, H, K, D = 2, 3, 9, 5
    g = torch.Generator().manual_seed(0)
    k, v = torch.randn(B, H, K, D, generator=g), torch.randn(B, H, K, D, generator=g)
    positions, scores = torch.randint(0, 100, (B, H, K), generator=g), torch.rand(B, H, K, generator=g)
    counts = np.array(counts)
    p = pages.Pages(k.half(), v.half(), positions, counts, page_size, 2, scores)
    for grown in (False, True):
        if grown:
            p.reserve(p.room + 1)  # one token past the room: a relayout
            p.host_lengths = counts  # (nothing appended: only the moved rows are checked)
        slots = p.slots()
        for b in range(B):
            for h in range(H):
                n, s = counts[b, h], slots[b, h]
                assert (s[:n] >= 0).all() and (s[n:] == -1).all()
                assert torch.equal(p.k.view(-1, D)[s[:n]], k[b, h, :n].half())
                assert torch.equal(p.v.view(-1, D)[s[:n]], v[b, h, :n].half())
                assert torch.equal(p.pos.view(-1)[s[:n]], positions[b, h, :n])
                assert torch.equal(p.score.view(-1)[s[:n]], scores[b, h, :n])
        assert (p.pos >= 0).sum() == counts.sum()


def test_a_cache_without_weak_references_is_left_unsized():
    """generate's cache is noted by a weak reference; an object that takes none (a legacy tuple) is
    left unsized, never an error inside generate."""
    model, patch, _ = MODELS["llava"]()
    patch(model, kv=kv.LookM(0.2, 0.1))
    stage = next(s for s in model._vtattn_patch.stages if hasattr(s, "limits"))
    stage._note({"model_kwargs": {_name(model): ((torch.zeros(1),),)}, "max_cache_length": 9})
    assert not stage.limits
