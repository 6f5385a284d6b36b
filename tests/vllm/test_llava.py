"""vLLM + vtattn.vllm gives the same greedy tokens as transformers + vtattn.patch.llava on tiny
random-weight LLaVA-1.5 (CLIP, SigLIP) and LLaVA-NeXT models saved in code (fp32, CPU): single
images, several images per prompt, several prompts batched by the engine; keep=1.0 and plain vLLM
(vtattn installed) give the unpruned model's tokens."""
import pytest
import transformers

import vtattn
import vtattn.vllm
from _compare import hf_tokens, load, processor, vllm_tokens
import _models


def _requests(sizes=((112, 112),) * 4):
    im = [_models.image(i, s) for i, s in enumerate(sizes)]
    return [(f"{_models.text(0, 2)} <image> {_models.text(1, 3)}", [im[0]]),
            (f"{_models.text(2, 1)} <image> {_models.text(3, 2)} <image> {_models.text(4, 1)}", [im[1], im[2]]),
            (f"{_models.text(5, 4)} <image> {_models.text(6, 1)}", [im[3]])]


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("llava-clip")
    _models.llava(path, tower="clip")
    return path


@pytest.fixture(scope="module")
def siglip_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("llava-siglip")
    _models.llava(path, tower="siglip")
    return path


@pytest.fixture(scope="module")
def next_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("llava-next")
    _models.llava_next(path)
    return path


def _transformers(path, cls, requests, **settings):
    model = load(cls, path)
    if settings:
        vtattn.patch.llava(model, **settings)
    return hf_tokens(model, processor(path), requests)


@pytest.mark.parametrize("tower, settings", [
    ("clip", dict(keep=0.25, method="cls")),
    ("clip", dict(keep=0.3, method="cls", merge="weighted")),
    ("clip", dict(keep=0.25, method="cls_ensemble")),
    ("siglip", dict(keep=0.25, method="auto")),
    ("siglip", dict(keep=0.5, method="rows")),
])
def test_llava_matches_transformers(engines, clip_dir, siglip_dir, tower, settings):
    path = clip_dir if tower == "clip" else siglip_dir
    requests = _requests()
    llm = engines(path, hf_overrides=vtattn.vllm.overrides(**settings), limit_mm_per_prompt={"image": 2})
    assert llm.llm_engine.model_config.architectures == ["VtattnLlavaForConditionalGeneration"]
    got = vllm_tokens(llm, requests)
    assert got == _transformers(path, transformers.LlavaForConditionalGeneration, requests, **settings)


def test_llava_keep_one_and_plain_runs_are_the_unpruned_model(engines, clip_dir):
    requests = _requests()
    expected = _transformers(clip_dir, transformers.LlavaForConditionalGeneration, requests)
    llm = engines(clip_dir, limit_mm_per_prompt={"image": 2})  # vtattn's plugin is loaded, nothing asked
    assert llm.llm_engine.model_config.architectures == ["LlavaForConditionalGeneration"]
    assert vllm_tokens(llm, requests) == expected
    llm = engines(clip_dir, hf_overrides=vtattn.vllm.overrides(keep=1.0), limit_mm_per_prompt={"image": 2})
    assert vllm_tokens(llm, requests) == expected


# Sizes with unpadded crops (the grid of 112x56, 56x168 pinpoints cut to the aspect ratio).
NEXT_SIZES = ((112, 112), (150, 70), (60, 150), (112, 80))


@pytest.mark.parametrize("settings", [dict(keep=0.5, method="cls"), dict(keep=0.5, method="hired")])
def test_llava_next_matches_transformers(engines, next_dir, settings):
    requests = _requests(NEXT_SIZES)
    llm = engines(next_dir, hf_overrides=vtattn.vllm.overrides(**settings), limit_mm_per_prompt={"image": 2})
    assert llm.llm_engine.model_config.architectures == ["VtattnLlavaNextForConditionalGeneration"]
    got = vllm_tokens(llm, requests)
    assert got == _transformers(next_dir, transformers.LlavaNextForConditionalGeneration, requests, **settings)
