"""Selection policies (pure functions), bare vision towers against eager-attention references,
and attn_implementation="vtattn"."""
import pytest
import torch

import vtattn
from vtattn import pruning
from vtattn.patch import hf_attention
from _vlm import (clip_config, eager_attentions, reference_scores, siglip_config,
                  text_config, topk, transformers)


# ---- pure policies --------------------------------------------------------------------------------

@pytest.mark.parametrize("keep", [0, 0.0, -0.5, 1.5, -3])
def test_keep_out_of_range(keep):
    with pytest.raises(ValueError, match="keep"):
        pruning.check_keep(keep)


@pytest.mark.parametrize("keep", [True, "0.5", None])
def test_keep_wrong_type(keep):
    with pytest.raises(TypeError, match="keep"):
        pruning.check_keep(keep)


def test_budget():
    assert pruning.budget(0.1, 576) == 58  # FasterVLM's 90% reduction
    assert pruning.budget(0.001, 576) == 1
    assert pruning.budget(1.0, 576) == 576
    assert pruning.budget(64, 40, full=576) == 40  # a view cut short keeps what it has
    with pytest.raises(ValueError, match="more than"):
        pruning.budget(600, 576)


def test_resolve_method():
    assert pruning.resolve_method("auto", has_cls=True) == "cls"
    assert pruning.resolve_method("auto", has_cls=False) == "mean_received"
    assert pruning.resolve_method("rows", has_cls=False) == "rows"
    with pytest.raises(ValueError, match="no \\[CLS\\]"):
        pruning.resolve_method("cls", has_cls=False)
    with pytest.raises(ValueError, match="unknown method"):
        pruning.resolve_method("fastv", has_cls=True)


def test_layers():
    assert pruning.feature_layer(-2, 24) == 22  # LLaVA-1.5 on CLIP-L
    assert pruning.feature_layer(-1, 24) == 23 and pruning.feature_layer(5, 24) == 4
    assert pruning.ensemble_layers(None, 24, 22) == list(range(16, 23))  # VTC-CLS default
    assert pruning.ensemble_layers([-1, 3, 3], 24, 22) == [3, 23]
    with pytest.raises(ValueError, match="embeddings"):
        pruning.feature_layer(0, 24)
    with pytest.raises(IndexError, match="out of range"):
        pruning.feature_layer(-26, 24)
    with pytest.raises(IndexError, match="ensemble layer 24"):
        pruning.ensemble_layers([24], 24, 22)


def test_apportion():
    assert pruning.apportion(10, [1, 1, 1], [10, 10, 10]).tolist() == [4, 3, 3]  # ties to the lower index
    assert pruning.apportion(10, [0, 0], [10, 10]).tolist() == [5, 5]
    assert pruning.apportion(10, [8, 1, 1], [4, 9, 9]).tolist() == [4, 3, 3]  # capped, rest re-split
    assert pruning.apportion(0, [1, 2], [3, 3]).tolist() == [0, 0]
    g = torch.Generator().manual_seed(1)
    for _ in range(50):
        w = torch.rand(5, generator=g)
        total = int(torch.randint(0, 40, (), generator=g))
        share = pruning.apportion(total, w, [40] * 5)
        assert int(share.sum()) == total
        assert ((share - total * w / w.sum()).abs() < 1).all()
    with pytest.raises(ValueError, match="exceeds"):
        pruning.apportion(7, [1, 1], [3, 3])


def test_hired_budgets():
    # total round(0.25 * 4 * 16) = 16: base round(0.5 * 16) = 8, crops 8 split 3:1:0:0 -> 6, 2, 0, 0
    counts = pruning.hired_budgets(0.25, 0.5, [16] * 4, torch.tensor([3.0, 1.0, 0.0]))
    assert counts.tolist() == [8, 6, 2, 0]
    # every crop capped: the base view takes the remainder
    assert pruning.hired_budgets(1.0, 0.0, [16, 4, 4], [1.0, 1.0]).tolist() == [16, 4, 4]
    with pytest.raises(ValueError, match="alpha"):
        pruning.hired_budgets(0.5, 1.5, [16, 16], [1.0])


def test_region_mass():
    s = torch.arange(9.0)
    assert pruning.region_mass(s, 3, 1, 3).tolist() == [9.0, 12.0, 15.0]
    assert pruning.region_mass(s, 3, 2, 1).tolist() == [3.0, 33.0]  # rows [0, 1) and [1, 3)


def test_rows_first():
    g = torch.Generator().manual_seed(0)
    scores = torch.rand(3, 20, generator=g)
    counts = torch.tensor([7, 10, 3])
    lifted = pruning.rows_first(scores, 5, counts)
    for b, k in enumerate(counts.tolist()):
        kept = topk(lifted[b], k)
        rows = topk(scores[b].view(4, 5).sum(1), k // 5)
        whole = (rows[:, None] * 5 + torch.arange(5)).flatten()
        rest = scores[b].clone()
        rest[whole] = -1
        expected = torch.cat([whole, topk(rest, k - len(whole))]).sort().values
        assert kept.tolist() == expected.tolist()
    marked = scores.clone()
    marked[:, :5] = -1.0  # not part of the view: never lifted
    assert (pruning.rows_first(marked, 5, counts)[:, :5] == -1).all()


# ---- bare vision towers ------------------------------------------------------------------------

def _tower(config, seed=0):
    torch.manual_seed(seed)
    cls = transformers.CLIPVisionModel if isinstance(config, transformers.CLIPVisionConfig) \
        else transformers.SiglipVisionModel
    return cls(config).eval()


@pytest.mark.parametrize("method", ["cls", "cls_ensemble", "hired"])
@pytest.mark.parametrize("keep", [0.25, 9])
def test_clip_tower_matches_eager(method, keep):
    tower = _tower(clip_config(layers=6))
    pixels = torch.randn(3, 3, 84, 84)
    attentions, hidden = eager_attentions(tower, pixels)
    budget = {"keep": keep} if isinstance(keep, float) else {"keep_tokens": keep}
    vtattn.patch.vision_tower(tower, **budget, method=method, feature_layer=-2)
    with torch.no_grad():
        out = tower(pixels)
    k = pruning.budget(keep, 36)
    expected = torch.stack([topk(s, k) for s in reference_scores(method, attentions, 4)])
    assert torch.equal(out.selection.indices, expected)
    kept = hidden[-2][:, 1:].gather(1, expected[..., None].expand(-1, -1, 32))
    torch.testing.assert_close(out.features, kept, atol=1e-5, rtol=1e-5)


def test_tower_rows():
    tower = _tower(clip_config())
    pixels = torch.randn(2, 3, 84, 84)
    attentions, _ = eager_attentions(tower, pixels)
    vtattn.patch.vision_tower(tower, keep_tokens=15, method="rows", feature_layer=-1)
    with torch.no_grad():
        out = tower(pixels)
    scores = reference_scores("cls", attentions, 3)
    for b in range(2):  # two whole rows (12 tokens), then the 3 best others
        rows = topk(scores[b].view(6, 6).sum(1), 2)
        whole = (rows[:, None] * 6 + torch.arange(6)).flatten()
        rest = scores[b].clone()
        rest[whole] = -1
        assert out.selection.indices[b].tolist() == torch.cat([whole, topk(rest, 3)]).sort().values.tolist()


def test_siglip_tower_mean_received_and_merge():
    tower = _tower(siglip_config())
    pixels = torch.randn(2, 3, 84, 84)
    attentions, hidden = eager_attentions(tower, pixels)
    layer = tower.encoder.layers[-1]
    keys = layer.self_attn.k_proj(layer.layer_norm1(hidden[-2])).detach()
    vtattn.patch.vision_tower(tower, keep=0.2, merge="mean")  # auto: no [CLS] -> mean received
    with torch.no_grad():
        out = tower(pixels)
    expected = torch.stack([topk(s, 7) for s in reference_scores("mean_received", attentions, 2, drop=0)])
    assert torch.equal(out.selection.indices, expected)
    merged = vtattn.merge_tokens(hidden[-1], out.selection, keys=keys, mode="mean")
    torch.testing.assert_close(out.features, merged, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="no \\[CLS\\]"):
        vtattn.patch.vision_tower(tower, keep=0.5, method="cls")


def test_tower_unpatch():
    tower = _tower(clip_config())
    pixels = torch.randn(1, 3, 84, 84)
    with torch.no_grad():
        before = tower(pixels).last_hidden_state
        vtattn.patch.vision_tower(tower, keep=0.5)
        assert isinstance(tower(pixels), vtattn.patch.SelectedFeatures)
        vtattn.patch.unpatch(tower)
        assert "forward" not in tower.__dict__
        assert torch.equal(tower(pixels).last_hidden_state, before)
    assert tower.config._attn_implementation != "vtattn"


@pytest.mark.parametrize("kwargs, error", [
    (dict(keep=0), ValueError), (dict(keep=1.5), ValueError), (dict(keep=0.5, method="nope"), ValueError),
    (dict(keep=1), ValueError), (dict(keep_tokens=0), ValueError), (dict(method="cls"), TypeError),
    (dict(keep=0.5, method="cls_ensemble", ensemble_layers=[4]), IndexError),
    (dict(keep=0.5, merge="max"), ValueError), (dict(keep=0.5, feature_layer=0), ValueError),
    (dict(keep=0.5, method="hired", alpha=2.0), ValueError)])
def test_tower_bad_arguments(kwargs, error):
    tower = _tower(clip_config())
    with pytest.raises(error):
        vtattn.patch.vision_tower(tower, **kwargs)
    assert "forward" not in tower.__dict__


# ---- attn_implementation="vtattn" --------------------------------------------------------------

def test_hf_attention_vision_tower(monkeypatch):
    vtattn.patch.register_hf_attention()
    torch.manual_seed(0)
    tower = transformers.CLIPVisionModel(clip_config()).eval()
    pixels = torch.randn(2, 3, 84, 84)
    _, hidden = eager_attentions(tower, pixels)
    calls = []
    op = hf_attention._ATTENTION  # the registered op's handle the entry point calls
    monkeypatch.setattr(hf_attention, "_ATTENTION", lambda *a, **k: calls.append(1) or op(*a, **k))
    tower.config._attn_implementation = "vtattn"
    with torch.no_grad():
        out = tower(pixels, output_hidden_states=True)
    assert len(calls) == 4
    torch.testing.assert_close(out.hidden_states[-1], hidden[-1], atol=1e-5, rtol=1e-5)


def test_hf_attention_language_model():
    """Masked attention falls back to SDPA; unmasked causal attention runs vtattn's kernel."""
    vtattn.patch.register_hf_attention()
    torch.manual_seed(0)
    sdpa = transformers.LlamaForCausalLM(text_config()).eval()
    ours = transformers.LlamaForCausalLM._from_config(text_config(), attn_implementation="vtattn").eval()
    ours.load_state_dict(sdpa.state_dict())
    ids = torch.randint(1, 100, (2, 9))
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    with torch.no_grad():
        for kwargs in (dict(input_ids=ids[1:]), dict(input_ids=ids, attention_mask=mask)):
            torch.testing.assert_close(ours(**kwargs).logits, sdpa(**kwargs).logits, atol=1e-5, rtol=1e-5)
        generated = [m.generate(input_ids=ids, attention_mask=mask, max_new_tokens=4, do_sample=False)
                     for m in (ours, sdpa)]
    assert torch.equal(*generated)


def test_tower_merge_keys_from_the_feature_layer():
    """Merging uses the feature layer's attention keys even where no score is probed."""
    tower = _tower(clip_config())
    pixels = torch.randn(2, 3, 84, 84)
    attentions, hidden = eager_attentions(tower, pixels)
    layer = tower.encoder.layers[2]
    keys = layer.self_attn.k_proj(layer.layer_norm1(hidden[2]))[:, 1:].detach()
    vtattn.patch.vision_tower(tower, keep=0.25, method="cls_ensemble", ensemble_layers=[0, 1],
                              feature_layer=-2, merge="weighted")
    with torch.no_grad():
        out = tower(pixels)
    scores = reference_scores("cls_ensemble", attentions, 2, layers=[0, 1])
    assert out.selection.indices.tolist() == [topk(s, 9).tolist() for s in scores]
    merged = vtattn.merge_tokens(hidden[-2][:, 1:], out.selection, keys=keys, mode="weighted")
    torch.testing.assert_close(out.features, merged, atol=1e-5, rtol=1e-5)


def test_budget_spellings():
    """keep / budget / recent take ratios, keep_tokens / budget_tokens / recent_tokens counts; an int
    ratio is the old spelling of a count (FutureWarning, pointing at the caller), except 1, which
    is ambiguous (1.0 keeps everything)."""
    from vtattn import kv
    scores = torch.randn(2, 12)
    assert vtattn.select_tokens(scores, 0.25).indices.shape == (2, 3)
    with pytest.warns(FutureWarning, match="spell it keep_tokens=5") as record:
        old = vtattn.select_tokens(scores, 5)
    assert record[0].filename == __file__
    assert torch.equal(old.indices, vtattn.select_tokens(scores, keep_tokens=5).indices)
    with pytest.warns(FutureWarning, match="keep_tokens=<tensor>"):
        vtattn.select_tokens(scores, torch.tensor([2, 3]))
    with pytest.raises(ValueError, match="keep=1 is ambiguous"):
        vtattn.select_tokens(scores, 1)
    assert vtattn.patch.FastV(keep_tokens=3).budget(10) == 3 and vtattn.patch.FastV(keep=0.5).budget(10) == 5
    assert vtattn.patch.FastV().keep == 0.5 and vtattn.patch.FastV(keep=0).budget(10) == 0
    with pytest.warns(FutureWarning, match="keep_tokens=3"):
        assert vtattn.patch.FastV(keep=3) == vtattn.patch.FastV(keep_tokens=3)
    with pytest.raises(ValueError, match="ambiguous"):
        vtattn.patch.FastV(keep=1)
    policy = kv.LookM(budget_tokens=50, recent_tokens=4)
    assert (policy.budget, policy.recent) == (50, 4)
    with pytest.warns(FutureWarning, match="budget_tokens=50"):
        assert kv.H2O(50, 0.1).budget == 50
    with pytest.raises(ValueError, match="recent=1 is ambiguous"):
        kv.H2O(0.5, 1)
    with pytest.raises(TypeError, match="budget_tokens="):
        kv.SnapKV()
    with pytest.raises(ValueError, match="not both"):
        kv.KeyNorm(0.5, budget_tokens=4)
    assert kv.pyramid(2, mean_budget_tokens=10, beta=2) == [15, 5]



def test_the_old_module_name_still_imports_with_a_deprecation_warning():
    import importlib
    import sys
    sys.modules.pop("vtattn.selection", None)
    vars(vtattn).pop("selection", None)
    with pytest.warns(DeprecationWarning, match="vtattn.pruning"):
        old = importlib.import_module("vtattn.selection")
    assert old is pruning and vtattn.selection is pruning
