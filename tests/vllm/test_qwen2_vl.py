"""vLLM + vtattn.vllm gives the same greedy tokens as transformers + vtattn.patch.qwen2_vl on tiny
random-weight Qwen2-VL and Qwen2.5-VL (window attention) models saved in code (fp32, CPU): images of
prompt, several prompts batched by the engine (kept tokens keep their M-RoPE positions); keep=1.0
and plain vLLM give the unpruned model's tokens."""
import pytest
import transformers

import vtattn
import vtattn.vllm
from _compare import hf_tokens, load, processor, vllm_tokens
import _models

IMAGE = "<|vision_start|><|image_pad|><|vision_end|>"


def _requests():
    im = [_models.image(i, s) for i, s in enumerate([(112, 112), (84, 112), (112, 56), (140, 84)])]
    return [(f"{_models.text(0, 2)} {IMAGE} {_models.text(1, 3)}", [im[0]]),
            (f"{_models.text(2, 1)} {IMAGE} {_models.text(3, 2)} {IMAGE} {_models.text(4, 1)}", [im[1], im[2]]),
            (f"{_models.text(5, 4)} {IMAGE} {_models.text(6, 1)}", [im[3]])]


@pytest.fixture(scope="module")
def qwen_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("qwen2-vl")
    _models.qwen2_vl(path)
    return path


def _transformers(path, requests, **settings):
    model = load(transformers.Qwen2VLForConditionalGeneration, path)
    if settings:
        vtattn.patch.qwen2_vl(model, **settings)
    image_processor = transformers.Qwen2VLImageProcessor.from_pretrained(path)
    return hf_tokens(model, processor(path), requests, image_processor=image_processor)


@pytest.mark.parametrize("settings", [dict(keep=0.25), dict(keep=0.5), dict(keep_tokens=3)])
def test_qwen2_vl_matches_transformers(engines, qwen_dir, settings):
    requests = _requests()
    llm = engines(qwen_dir, hf_overrides=vtattn.vllm.overrides(**settings), limit_mm_per_prompt={"image": 2})
    assert llm.llm_engine.model_config.architectures == ["VtattnQwen2VLForConditionalGeneration"]
    assert vllm_tokens(llm, requests) == _transformers(qwen_dir, requests, **settings)


def test_qwen2_vl_keep_one_and_plain_runs_are_the_unpruned_model(engines, qwen_dir):
    requests = _requests()
    expected = _transformers(qwen_dir, requests)
    llm = engines(qwen_dir, limit_mm_per_prompt={"image": 2})
    assert llm.llm_engine.model_config.architectures == ["Qwen2VLForConditionalGeneration"]
    assert vllm_tokens(llm, requests) == expected
    llm = engines(qwen_dir, hf_overrides=vtattn.vllm.overrides(keep=1.0), limit_mm_per_prompt={"image": 2})
    assert vllm_tokens(llm, requests) == expected


@pytest.fixture(scope="module")
def qwen25_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("qwen2.5-vl")
    _models.qwen2_5_vl(path)
    return path


def test_qwen2_5_vl_matches_transformers(engines, qwen25_dir):
    # windows of 2x2 merge units: the full-attention block sees the tokens in window order (140x84: 5x3
    # units, cut unevenly)
    im = [_models.image(i, s) for i, s in enumerate([(168, 112), (112, 168), (140, 84)])]
    requests = [(f"{_models.text(0, 2)} {IMAGE} {_models.text(1, 3)}", [im[0]]),
                (f"{_models.text(2, 1)} {IMAGE} {_models.text(3, 2)} {IMAGE}", [im[1], im[2]])]
    llm = engines(qwen25_dir, hf_overrides=vtattn.vllm.overrides(keep=0.3), limit_mm_per_prompt={"image": 2})
    assert llm.llm_engine.model_config.architectures == ["VtattnQwen2_5_VLForConditionalGeneration"]
    got = vllm_tokens(llm, requests)
    model = load(transformers.Qwen2_5_VLForConditionalGeneration, qwen25_dir)
    vtattn.patch.qwen2_vl(model, keep=0.3)
    image_processor = transformers.Qwen2VLImageProcessor.from_pretrained(qwen25_dir)
    assert got == hf_tokens(model, processor(qwen25_dir), requests, image_processor=image_processor)
