"""`attn_implementation="vtattn"` call by call: the mask function (which patterns it recognises, the
LazyMask standing in for SDPA's mask, when a padded mask runs varlen_attention), SDPA's rules
without a mask (static caches), and how every keyword is honoured, sent to a fallback or refused."""
import sys
import warnings

import pytest
import torch

import vtattn
from vtattn.patch import core, hf_attention, hf_masks

transformers = pytest.importorskip("transformers")
mu = transformers.masking_utils
from transformers.integrations.sdpa_attention import sdpa_attention_forward  # noqa: E402

import _hf_models as M  # noqa: E402

vtattn.patch.register_hf_attention()


class Attn(torch.nn.Module):
    """An attention module of no transformers model (its module has no eager_attention_forward)."""

    def __init__(self, groups=2, causal=True):
        super().__init__()
        self.num_key_value_groups, self.is_causal = groups, causal


def qkv(B=2, Hq=4, Hkv=2, Nq=7, Nk=7, D=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, Nq, Hq, D, generator=g).transpose(1, 2) * 2  # transformers' strides
    k, v = (torch.randn(B, Nk, Hkv, D, generator=g).transpose(1, 2) for _ in range(2))
    return q, k, v


def sdpa(module, q, k, v, mask, **kwargs):
    return sdpa_attention_forward(module, q, k, v, mask, **kwargs)[0]


def ours(module, q, k, v, mask, **kwargs):
    with hf_attention.counting() as calls:
        out, weights = hf_attention.attention_forward(module, q, k, v, mask, **kwargs)
    assert weights is None or kwargs.get("output_attentions")
    return out, dict(calls)


def test_mask_function_recognises_the_standard_patterns():
    assert hf_masks.structure(mu.causal_mask_function) == ("causal", None)
    assert hf_masks.structure(mu.bidirectional_mask_function) == ("bidirectional", None)
    assert hf_masks.structure(mu.sliding_window_causal_mask_function(5)) == ("causal", 5)
    others = [mu.chunked_causal_mask_function(4, torch.zeros(2, dtype=torch.long)),
              mu.sliding_window_bidirectional_mask_function(3),
              mu.or_masks(mu.causal_mask_function, mu.bidirectional_mask_function),
              mu.and_masks(mu.causal_mask_function, mu.padding_mask_function(torch.ones(1, 4, dtype=torch.bool))),
              mu.and_masks(mu.sliding_window_overlay(3), mu.bidirectional_mask_function),
              lambda b, h, q, kv: kv <= q]
    assert all(hf_masks.structure(f) is None for f in others)


def _mask(padding, Nq, Nk, q_offset=0, kv_offset=0, function=mu.causal_mask_function):
    return hf_masks.mask_function(batch_size=padding.shape[0], q_length=Nq, kv_length=Nk, q_offset=q_offset,
                                  kv_offset=kv_offset, mask_function=function, attention_mask=padding,
                                  allow_is_causal_skip=True, dtype=torch.float32, device="cpu")


def test_lazy_mask_is_sdpa_mask_when_read():
    padding = torch.tensor([[0, 0, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1, 1]], dtype=torch.bool)
    mask = _mask(padding, 7, 7, function=mu.sliding_window_causal_mask_function(3))
    assert isinstance(mask, hf_masks.LazyMask) and mask.shape == (2, 1, 7, 7) and mask.dtype == torch.bool
    assert mask.contiguous() is mask and mask.to("cpu") is mask  # what generate does keeps it lazy
    dense = mu.sdpa_mask(batch_size=2, q_length=7, kv_length=7, mask_function=mu.sliding_window_causal_mask_function(3),
                         attention_mask=padding, allow_is_causal_skip=False)
    assert torch.equal(mask[:, :, :, :], dense) and torch.equal(torch.where(mask, 1, 0), dense.long())
    assert type(mask[0]) is torch.Tensor


PADDINGS = {  # (padding over all keys, q_offset): the mask of Nq = 4 queries at the end
    "none": ([[1] * 9, [1] * 9], 5),
    "left": ([[0, 0, 0, 1, 1, 1, 1, 1, 1], [1] * 9], 5),
    "left, into the queries": ([[0] * 7 + [1, 1], [1] * 9], 5),
    "holes before the queries": ([[1, 0, 1, 0, 0, 1, 1, 1, 1], [0, 1, 1, 1, 0, 1, 1, 1, 1]], 5),
    "right": ([[1] * 7 + [0, 0], [1] * 9], 5),
    "static cache slots": ([[0, 1, 1, 1, 1, 1, 1, 0, 0], [1] * 7 + [0, 0]], 3),
}


@pytest.mark.parametrize("pattern", PADDINGS)
@pytest.mark.parametrize("window", [None, 3])
def test_padded_masks_run_exactly_or_fall_back(pattern, window):
    """Every row (padding rows too) equals SDPA with SDPA's dense mask: on vtattn's kernels where
    the padding allows it, else through SDPA."""
    rows, q_offset = PADDINGS[pattern]
    padding = torch.tensor(rows, dtype=torch.bool)
    function = mu.causal_mask_function if window is None else mu.sliding_window_causal_mask_function(window)
    module, (q, k, v) = Attn(), qkv(Nq=4, Nk=9)
    mask = _mask(padding, 4, 9, q_offset=q_offset, function=function)
    got, calls = ours(module, q, k, v, mask, scaling=0.5)
    torch.testing.assert_close(got, sdpa(module, q, k, v, mask.spec.full(), scaling=0.5), atol=1e-5, rtol=1e-5)
    kernel = pattern in ("none", "left", "left, into the queries", "static cache slots") or (
        pattern == "holes before the queries" and window is None)
    expected = "attention" if pattern == "none" else "varlen_attention" if kernel else "sdpa: padding"
    assert len(calls) == 1 and next(iter(calls)).startswith(expected), calls


def test_bidirectional_padding_and_offsets():
    padding = torch.tensor([[1, 0, 1, 1, 0, 1], [1] * 6], dtype=torch.bool)
    module, (q, k, v) = Attn(causal=False), qkv(Nq=3, Nk=6)
    mask = _mask(padding, 3, 6, function=mu.bidirectional_mask_function)
    got, calls = ours(module, q, k, v, mask)
    torch.testing.assert_close(got, sdpa(module, q, k, v, mask.spec.full()), atol=1e-5, rtol=1e-5)
    assert calls == {"varlen_attention": 1}
    # a static cache's tensor offset is read once, when the first layer needs the plan
    mask = _mask(torch.ones(2, 2, dtype=torch.bool), 2, 6, q_offset=torch.tensor(0))
    assert mask.spec.plan() == hf_masks.Plan(2)


@pytest.mark.parametrize("Nq", [1, 3])
def test_no_mask_follows_sdpa_static_cache(Nq):
    """No mask and keys of a static cache's whole capacity: causal over the first Nq keys (SDPA's
    top-left rule), and a single query attends to every key (non-causal), as SDPA does."""
    module, (q, k, v) = Attn(), qkv(Nq=Nq, Nk=8)
    got, calls = ours(module, q, k, v, None)
    torch.testing.assert_close(got, sdpa(module, q, k, v, None), atol=1e-5, rtol=1e-5)
    assert calls == {"attention" if Nq > 1 else "sdpa: a decode row": 1}


def test_a_decode_row_runs_sdpa_unless_a_backend_is_forced():
    """One query row without a probe wants no LSE: SDPA runs it (GQA, a static cache's slots past the
    mask's end left out); a forced backend gets the attention op."""
    module, (q, k, v) = Attn(), qkv(Nq=1, Nk=9, Hq=4, Hkv=2)
    mask = _mask(torch.tensor([[1] * 7 + [0, 0]] * 2, dtype=torch.bool), 1, 9, q_offset=6)  # 7 of 9 slots filled
    want = sdpa(module, q, k[:, :, :7], v[:, :, :7], None)
    for backend, key in ((None, "sdpa: a decode row"), ("cpp", "attention")):
        with vtattn.use_backend(backend):
            got, calls = ours(module, q, k, v, mask)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
        assert calls == {key: 1}, backend


def test_fallback_reasons():
    module, (q, k, v) = Attn(), qkv(Nq=4, Nk=4)
    dense = torch.ones(2, 1, 4, 4, dtype=torch.bool).tril()
    bias = torch.randn(1, 4, 4, 4)
    for kwargs, mask, reason in [(dict(position_bias=bias), None, "sdpa: position_bias"),
                                 (dict(cu_seq_lens_q=torch.tensor([0, 4])), None, "sdpa: packed"),
                                 ({}, dense, "sdpa: an explicit mask")]:
        got, calls = ours(module, q, k, v, mask, **kwargs)
        torch.testing.assert_close(got, sdpa(module, q, k, v, mask, **kwargs), atol=1e-5, rtol=1e-5)
        assert list(calls) == [reason] or next(iter(calls)).startswith(reason), calls
    module.train()
    _, calls = ours(module, q, k, v, None, dropout=0.5)
    assert calls == {"sdpa: dropout": 1}
    _, calls = ours(module, q.double(), k.double(), v.double(), None)
    assert next(iter(calls)).startswith("sdpa: dtypes")


def test_softcap_and_sinks_need_eager_where_sdpa_would_run():
    """A Gemma2 layer with a dense mask runs Gemma2's own eager attention (SDPA has no softcap)."""
    model = M.gemma2()
    module = model.model.layers[0].self_attn
    q, k, v = qkv(Hq=4, Hkv=2, Nq=5, Nk=5)
    dense = torch.ones(2, 1, 5, 5, dtype=torch.bool).tril()
    got, calls = ours(module, q, k, v, dense, scaling=0.3, softcap=1.5)
    eager = sys.modules[type(module).__module__].eager_attention_forward
    expected = eager(module, q, k, v, torch.zeros(()).masked_fill(~dense, torch.finfo(q.dtype).min), scaling=0.3,
                     softcap=1.5)[0]
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    assert calls == {"eager: an explicit mask with softcap": 1}
    with pytest.raises(NotImplementedError, match="Attn with an explicit mask with s_aux"):
        ours(Attn(), q, k, v, dense, s_aux=torch.zeros(4))


def test_output_attentions_returns_eager_weights():
    model = M.lm("LlamaForCausalLM", "LlamaConfig")()
    eager = M.with_attention(model, "eager")
    model.set_attn_implementation("vtattn")
    x = M.text(2)
    with torch.no_grad(), hf_attention.counting() as calls:
        got = model(**x, output_attentions=True)
        expected = eager(**x, output_attentions=True)
    assert len(got.attentions) == 2 and calls == {"eager: output_attentions": 2}
    for a, b in zip(got.attentions, expected.attentions):
        torch.testing.assert_close(a, b)


def test_unknown_keywords_run_eager_or_are_refused():
    model = M.lm("LlamaForCausalLM", "LlamaConfig")()
    module = model.model.layers[0].self_attn
    q, k, v = qkv(Nq=3, Nk=3)
    with pytest.warns(UserWarning, match="keyword 'new_feature'"):
        got, calls = ours(module, q, k, v, None, scaling=0.5, new_feature=torch.ones(1))
    eager = sys.modules[type(module).__module__].eager_attention_forward
    tril = torch.zeros(()).masked_fill(~torch.ones(3, 3, dtype=torch.bool).tril(), torch.finfo(q.dtype).min)
    torch.testing.assert_close(got, eager(module, q, k, v, tril[None, None], scaling=0.5)[0])
    assert calls == {"eager: keyword 'new_feature'": 1}
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # harmless keywords and None values pass silently
        ours(module, q, k, v, None, position_ids=torch.arange(3), use_cache=True, new_feature=None)
    with pytest.raises(NotImplementedError, match="Attn with keyword 'new_feature'"):
        ours(Attn(), q, k, v, None, new_feature=1)
    with pytest.raises(NotImplementedError, match="Attn with head_mask"):
        ours(Attn(), q, k, v, None, head_mask=torch.ones(4))


def test_compressed_cache_refuses_what_it_cannot_attend():
    q, k, v = qkv(Nq=3, Nk=3)
    with core.forward_context():
        core.publish(object(), k)  # as if a CompressedCache layer had just returned k
        with pytest.raises(NotImplementedError, match="CompressedCache cannot attend with softcap"):
            hf_attention.attention_forward(Attn(), q, k, v, None, softcap=2.0)


def test_a_stages_own_attention_refuses_what_it_cannot_take():
    """A stage's hook that computes a layer's attention (FastV's pruned layers, VAR, CMAI) has no weights,
    dropout, softcap or sinks: a call asking for one is refused by name; harmless keywords pass."""
    module, (q, k, v) = Attn(), qkv(Nq=3, Nk=3)
    out = torch.zeros(2, 3, 4, 8)
    with core.forward_context() as ctx:
        ctx.hook(module, lambda *args: out)
        assert hf_attention.attention_forward(module, q, k, v, None, position_ids=None, use_cache=True,
                                              output_attentions=False, softcap=None)[0] is out
        for kwargs, name in [(dict(output_attentions=True), "output_attentions"), (dict(softcap=30.0), "softcap"),
                             (dict(dropout=0.1), "dropout"), (dict(head_mask=torch.ones(4)), "head_mask")]:
            with pytest.raises(NotImplementedError, match=f"Attn: a vtattn stage .* cannot take {name}"):
                hf_attention.attention_forward(module, q, k, v, None, **kwargs)


def test_probes_need_unpadded_masks():
    module, (q, k, v) = Attn(causal=False), qkv(Nq=4, Nk=4)
    padding = torch.tensor([[0, 1, 1, 1], [1, 1, 1, 1]], dtype=torch.bool)
    mask = _mask(padding, 4, 4, function=mu.bidirectional_mask_function)
    with hf_attention.probing({module: hf_attention.Probe(rows=0)}), pytest.raises(NotImplementedError, match="probes"):
        hf_attention.attention_forward(module, q, k, v, mask)
    probe = hf_attention.Probe(rows=0, reduce="mean")
    with hf_attention.probing({module: probe}):
        hf_attention.attention_forward(module, q, k, v, _mask(torch.ones(2, 4, dtype=torch.bool), 4, 4,
                                                              function=mu.bidirectional_mask_function))
    expected = vtattn.key_importance(q, k, rows=0, reduce_heads="mean")
    torch.testing.assert_close(probe.scores, expected)


def test_models_attending_without_the_interface_are_refused(monkeypatch):
    """A modeling file without transformers' attention interface (Falcon in transformers 5.17)
    would add vtattn's boolean mask to its own eager logits: its mask is refused by name."""
    import types
    config_cls = type("FooConfig", (), {"__module__": "fake.models.foo.configuration_foo"})
    monkeypatch.setitem(sys.modules, "fake.models.foo.modeling_foo", types.ModuleType("fake.models.foo.modeling_foo"))
    with pytest.raises(NotImplementedError, match="modeling_foo does not"):
        hf_masks.mask_function(batch_size=1, q_length=3, kv_length=3, config=config_cls())
    sys.modules["fake.models.foo.modeling_foo"].ALL_ATTENTION_FUNCTIONS = {}
    assert isinstance(hf_masks.mask_function(batch_size=1, q_length=3, kv_length=3, config=config_cls()),
                      hf_masks.LazyMask)
