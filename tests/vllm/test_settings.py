"""vtattn.vllm.overrides / check_settings (the hf_overrides contract) and the settings' part in the
multimodal hashes; no engine."""
import json

import pytest

import vtattn.vllm
from vtattn.vllm import check_settings, digest


def test_overrides_is_the_hf_overrides_json():
    o = vtattn.vllm.overrides(keep=0.25, method="cls")
    assert o == json.loads(json.dumps(o)) == {"vtattn": {"keep": 0.25, "method": "cls", "merge": None, "alpha": 0.5,
                                                         "ensemble_layers": None}}
    assert vtattn.vllm.overrides(keep_tokens=8)["vtattn"]["keep_tokens"] == 8
    # `vllm serve --hf-overrides '{"vtattn": {"keep": 1}}'`: JSON's 1 is the ratio 1.0
    assert check_settings({"keep": 1})["keep"] == 1.0


@pytest.mark.parametrize("settings, exc, match", [
    ({"keep": 0.5, "bogus": 1}, ValueError, "unknown vtattn settings"),
    ({}, ValueError, "need keep"),
    ({"keep": 0.5, "method": "nope"}, ValueError, "unknown method"),
    ({"keep": 0.5, "alpha": 2}, ValueError, "alpha must be"),
    ({"keep": 0.5, "ensemble_layers": "x"}, TypeError, "ensemble_layers"),
    ([0.5], TypeError, "must be a dict"),
])
def test_bad_settings_raise(settings, exc, match):
    with pytest.raises(exc, match=match):
        check_settings(settings)


def test_overrides_needs_a_budget():
    with pytest.raises(ValueError, match="pass keep"):
        vtattn.vllm.overrides(method="cls")


def test_settings_change_every_multimodal_hash():
    from vtattn.vllm.hashing import SettingsHash

    class Base:
        def _get_mm_hashes(self, inputs):
            return {"image": ["a", "b"]}

    def processor(settings):
        class Config:
            vtattn = settings

        class Info:
            def get_hf_config(self):
                return Config

        p = type("P", (SettingsHash, Base), {})()
        p.info = Info()
        return p._get_mm_hashes(None)["image"]

    one, two = processor({"keep": 0.25}), processor({"keep": 0.5})
    assert one[0].startswith("a-vtattn-") and one != two and len(set(one)) == 2
    assert digest(check_settings({"keep": 0.25})) == digest(check_settings({"keep": 0.25, "method": "auto"}))
