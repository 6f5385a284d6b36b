"""A second chat turn on a filled cache: `generate` restarted with the whole conversation and the first
turn's cache slices input_ids by the cache's length. Where a stage shortened the prefill at the LLM
input (LLaVA's vision-side keep and AIM's merge; Qwen2-VL's keep), that length is shorter than the
conversation so far, so the slice would feed tokens the cache already holds: refused by name (it was
a wrong result). Where the stages keep the first layer whole (VisualExit, CMAI), the second turn is
the whole conversation run from scratch. Assisted decoding's several-token forwards on a shortened
cache continue it (prompt lookup gives the greedy tokens)."""
import pytest
import torch

import vtattn
from vtattn.patch import vision
from vtattn.patch.core import output_cache
from _vlm import llava, prompts, qwen2_vl, qwen2_vl_inputs
from helpers import cache_name

pytest.importorskip("transformers")
TURN = dict(do_sample=False, return_dict_in_generate=True, output_logits=True, max_new_tokens=3, min_new_tokens=3)


def _llava_turn():
    ids, mask = prompts([[36]])
    pixels = torch.randn(1, 3, 84, 84, generator=torch.Generator().manual_seed(1))
    return dict(input_ids=ids, attention_mask=mask, pixel_values=pixels)


def _turns(model, first, images=("pixel_values",)):
    """(the second turn generated on the first turn's cache, the same conversation from scratch)."""
    with torch.no_grad():
        out = model.generate(**first, **TURN)
        ids = torch.cat([out.sequences, torch.tensor([[5, 6, 7]])], 1)
        second = {k: v for k, v in first.items() if k not in images}
        second.update(input_ids=ids, attention_mask=torch.ones_like(ids))
        continued = model.generate(**second, **{cache_name(model): output_cache(out)}, **TURN)
        scratch = model.generate(**dict(first, input_ids=ids, attention_mask=torch.ones_like(ids)), **TURN)
    return continued, scratch


@pytest.mark.parametrize("options", [dict(keep=0.25), dict(stages=[vtattn.patch.AIM(retention=(1.0,) * 4)])],
                         ids=["keep", "aim-merge"])
def test_llava_shortened_prefill_refuses_a_restarted_generate(options):
    model = llava(layers=4)
    vtattn.patch.llava(model, **options)
    with pytest.raises(NotImplementedError, match="restarted from a filled cache"):
        _turns(model, _llava_turn())


def test_qwen2_vl_keep_refuses_a_restarted_generate():
    model = qwen2_vl()
    vtattn.patch.qwen2_vl(model, keep=0.25)
    with pytest.raises(NotImplementedError, match="restarted from a filled cache"):
        _turns(model, qwen2_vl_inputs([(4, 6)]), images=("pixel_values", "image_grid_thw"))


@pytest.mark.parametrize("stage", ["visual-exit", "cmai"])
def test_second_turn_is_the_conversation_from_scratch(stage):
    model = llava(layers=4)
    if stage == "cmai":
        vtattn.patch.llava(model, stages=[vtattn.patch.CMAI(keep=0.3)])
    else:
        vtattn.patch.llava(model, visual_exit=vtattn.patch.VisualExit(layer=2))
    continued, scratch = _turns(model, _llava_turn())
    assert torch.equal(continued.sequences[:, -3:], scratch.sequences[:, -3:])
    torch.testing.assert_close(torch.stack(continued.logits), torch.stack(scratch.logits), atol=2e-5, rtol=1e-5)


def test_assisted_decoding_continues_a_shortened_cache(monkeypatch):
    """Prompt lookup's candidates (forwards of several tokens, then crops) on LLaVA's vision-side keep:
    the greedy tokens."""
    seen, run = [], vision.Shrink.continue_call
    monkeypatch.setattr(vision.Shrink, "continue_call", lambda self, call, cache: (
        seen.append(call.new_tokens()), run(self, call, cache))[1])
    ids, mask = prompts([[36]], seed=4)
    x = dict(input_ids=ids, attention_mask=mask, pixel_values=torch.randn(1, 3, 84, 84))
    model = vtattn.patch.llava(llava(layers=4, seed=4), keep=0.25)
    options = dict(do_sample=False, max_new_tokens=24, min_new_tokens=24)
    with torch.no_grad():
        greedy = model.generate(**x, **options)
        assisted = model.generate(**x, **options, prompt_lookup_num_tokens=3)
    assert torch.equal(assisted, greedy)
    assert max(seen) > 1
