"""Greedy generation with vLLM and with transformers (+ vtattn.patch) on the same saved model."""
from __future__ import annotations

import torch
import transformers

STEPS = 6


def vllm_tokens(llm, requests: list[tuple[str, list]]) -> list[list[int]]:
    """Greedy continuations (STEPS tokens, EOS ignored) of (prompt, images) requests, batched by the engine."""
    from vllm import SamplingParams
    params = SamplingParams(max_tokens=STEPS, temperature=0.0, ignore_eos=True)
    inputs = [{"prompt": p, "multi_modal_data": {"image": imgs if len(imgs) > 1 else imgs[0]}} for p, imgs in requests]
    return [list(o.outputs[0].token_ids) for o in llm.generate(inputs, params, use_tqdm=False)]


def hf_tokens(model, processor, requests: list[tuple[str, list]], image_processor=None) -> list[list[int]]:
    """The same with transformers' generate, one request at a time. image_processor: Qwen's (no
    Qwen2VLProcessor without torchvision): the prompt's image pads are expanded here."""
    out = []
    for prompt, images in requests:
        if image_processor is None:
            inputs = processor(text=[prompt], images=images, return_tensors="pt")
        else:
            inputs = dict(image_processor(images=images, return_tensors="pt"))
            merge = image_processor.merge_size ** 2
            counts = iter((inputs["image_grid_thw"].prod(-1) // merge).tolist())
            text = "".join(part + ("<|image_pad|>" * next(counts) if i < len(images) else "")
                           for i, part in enumerate(prompt.split("<|image_pad|>")))
            inputs.update(processor(text=[text], return_tensors="pt"))
        n = inputs["input_ids"].shape[1]
        with torch.no_grad():
            ids = model.generate(**inputs, max_new_tokens=STEPS, min_new_tokens=STEPS, do_sample=False)
        out.append(ids[0, n:].tolist())
    return out


def load(cls, path):
    return cls.from_pretrained(path, dtype=torch.float32).eval()


def processor(path):
    return transformers.AutoProcessor.from_pretrained(path)
