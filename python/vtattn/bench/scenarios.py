"""Model-level cases on random-weight transformers models built in code (nothing downloaded):
vision towers with token selection, and a LLaVA-1.5-7B-shaped model's time to first token.

Random weights give real timings and memory; they say nothing of accuracy. Real configs on a GPU
(built directly in bf16 on the device); on CPU the models are scaled down (see SCALE) and the
rows say so. Peak memory (CUDA only) is torch.cuda.max_memory_allocated over the first, untimed
call: `peak_gib` in all, `peak_extra_gib` above what was allocated before it (activations)."""
import contextlib

import torch

import vtattn

from .cases import LEVELS, SHAPES, Case, Impl, scaled_shape

NOTE = ("vision_tower / e2e: random-weight models: the timings and memory are real, they say nothing of "
        "accuracy.")
KEEPS = (1.0, 0.5, 0.25, 0.1, 0.05)
TOWER_KEEP = 0.1
E2E_BATCHES = (1, 8)
PROMPT = 64  # text tokens beside the image
FEATURE_LAYER = -2  # LLaVA-1.5's vision_feature_layer; FasterVLM scores the same layer

TOWERS = {  # name -> (transformers config class, kwargs)
    "clip-l336": ("CLIPVisionConfig", dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                                           num_attention_heads=16, image_size=336, patch_size=14)),
    "siglip-so400m": ("SiglipVisionConfig", dict(hidden_size=1152, intermediate_size=4304, num_hidden_layers=27,
                                                 num_attention_heads=16, image_size=384, patch_size=14)),
}
LLAMA7B = dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
               num_key_value_heads=32, vocab_size=32064, max_position_embeddings=4096)
# Per run level: layers kept (None: all; at least 2: the features are layer -2), divisors of the
# width and of the image side, tower batch.
SCALE = {"full": dict(layers=None, width=1, side=1, batch=32),
         "cpu": dict(layers=2, width=4, side=2, batch=1),
         "cpu-quick": dict(layers=2, width=8, side=3, batch=1),
         "tiny": dict(layers=2, width=16, side=6, batch=1)}


def level_of(name, s):
    """The run level a scaled attention shape came from (builders get the shape, not the level)."""
    return next(lv for lv in LEVELS if scaled_shape(SHAPES[name], lv) == s)


def _scaled(kw, sc):
    """Config kwargs at a run level: fewer layers, width and heads divided (head dim kept), the
    image side divided."""
    kw = dict(kw)
    if sc["layers"]:
        kw["num_hidden_layers"] = sc["layers"]
    w = sc["width"]
    for key in ("hidden_size", "intermediate_size"):
        kw[key] //= w
    kw["num_attention_heads"] = max(1, kw["num_attention_heads"] // w)
    if "image_size" in kw:  # whole patches: a multiple of the patch size
        kw["image_size"] = kw["image_size"] // kw["patch_size"] // sc["side"] * kw["patch_size"]
    return kw


def _build(cls, config, device, dtype):
    """Random init straight in `dtype` on `device` (as AutoModel.from_config): a 7B model is built
    in seconds on a GPU, never in fp32 on the host first."""
    torch.manual_seed(0)
    with torch.device(device):
        return cls._from_config(config, dtype=dtype).eval()


_slot = {}  # the one model alive: {"key": ..., "model": ...}


def _model(key, build, device, dtype):
    """The model for `key`, built on first use. One at a time: building another drops the previous
    (a run, and pytest even more, goes through many cases; a 7B model is 14 GB on a GPU). Calls
    fetch the model here rather than holding it, so a dropped model is freed at once."""
    key = (key, device, dtype)
    if _slot.get("key") != key:
        _slot.clear()
        if device.type == "cuda":
            torch.cuda.empty_cache()
        _slot.update(key=key, model=build(device, dtype))
    return _slot["model"]


def _with_memory(impl):
    """Record peak memory (CUDA) over the impl's first call: the runner's untimed probe."""
    call, seen = impl.call, []

    def first_measured(x):
        dev = x["pixel_values"].device
        if seen or dev.type != "cuda":
            return call(x)
        seen.append(True)
        torch.cuda.synchronize(dev)
        before = torch.cuda.memory_allocated(dev)
        torch.cuda.reset_peak_memory_stats(dev)
        out = call(x)
        torch.cuda.synchronize(dev)
        peak = torch.cuda.max_memory_allocated(dev)
        impl.stats.update(peak_gib=peak / 2**30, peak_extra_gib=(peak - before) / 2**30)
        impl.note = " ".join(filter(None, [impl.note, f"peak {peak / 2**30:.2f} GiB (+{(peak - before) / 2**30:.2f})"]))
        return out

    impl.call = first_measured
    return impl


@contextlib.contextmanager
def _on(model, inner):
    """Enter inner(); on CPU with one thread: the scaled models are too small to split, and on a
    shared machine OpenMP barriers dominate multi-threaded runs (small ops measured 100x slower)."""
    threads = torch.get_num_threads()
    if next(model.parameters()).device.type == "cpu":
        torch.set_num_threads(1)
    try:
        with inner():
            yield
    finally:
        torch.set_num_threads(threads)


@contextlib.contextmanager
def _attn(model, name):
    """Every sub-config of `model` on attention implementation `name` for the block."""
    configs = [m.config for m in model.modules() if hasattr(m, "config")]
    previous = [c._attn_implementation for c in configs]
    for c in configs:
        c._attn_implementation = name
    try:
        yield
    finally:
        for c, p in zip(configs, previous):
            c._attn_implementation = p


@contextlib.contextmanager
def _patched(patch, model, **kw):
    patch(model, **kw)
    try:
        yield
    finally:
        vtattn.patch.unpatch(model)


def _pixels(B, image):
    def make(device, dtype, seed):
        g = torch.Generator(device=device).manual_seed(seed)
        return {"pixel_values": torch.randn(B, 3, image, image, device=device, dtype=dtype, generator=g)}
    return make


def _eager_topk(tower, keep, has_cls):
    """What the reference pruning code does: eager attention with output_attentions=True, scores
    from the feature layer (FasterVLM: the head-mean [CLS] row; no [CLS], as SigLIP: the mean
    attention each token receives), torch top-k, gather the kept features."""
    def call(x):
        out = tower(x["pixel_values"], output_attentions=True, output_hidden_states=True, return_dict=True)
        probs = out.attentions[FEATURE_LAYER]
        scores = probs[:, :, 0, 1:].mean(1) if has_cls else probs.mean(1).mean(1)
        feats = out.hidden_states[FEATURE_LAYER][:, int(has_cls):]
        k = max(1, round(keep * scores.shape[1]))
        idx = scores.topk(k, dim=1).indices.sort(dim=1).values
        return feats.gather(1, idx[..., None].expand(-1, -1, feats.shape[2]))
    return call


def _transformers():
    """transformers, or None where it is not installed (an optional dependency: no model cases)."""
    try:
        import transformers
        return transformers
    except ImportError:
        return None


def tower_cases(name, s, backends):
    transformers = _transformers()
    if name not in TOWERS or transformers is None:
        return []

    level = level_of(name, s)
    sc = SCALE[level]
    cls_name, kw = TOWERS[name]
    kw = _scaled(kw, sc)
    config = getattr(transformers, cls_name)(**kw)
    model_cls = transformers.CLIPVisionModel if cls_name.startswith("CLIP") else transformers.SiglipVisionModel
    B, has_cls = sc["batch"], cls_name.startswith("CLIP")
    shape = {"B": B, "layers": kw["num_hidden_layers"], "width": kw["hidden_size"],
             "heads": kw["num_attention_heads"], "image": kw["image_size"], "keep": TOWER_KEEP,
             "scaled": None if level == "full" else level,
             "cpu_threads": None if level == "full" else 1}
    at = {}  # device and dtype: make_inputs is the first to know them
    tower = lambda: _model(("vision_tower", name, level), lambda d, t: _build(model_cls, config, d, t), *at["dt"])

    def make(device, dtype, seed):
        at["dt"] = device, dtype
        return _pixels(B, kw["image_size"])(device, dtype, seed)

    c = Case("vision_tower", f"{name}:keep-{TOWER_KEEP}", shape, make)
    impl = lambda name, call, inner, **kw: _with_memory(Impl(name, call, ctx=lambda: _on(tower(), inner), **kw))
    # vtattn's dispatch picks the kernels; forcing a backend per model row would time the same tower.
    c.impls = [impl("vtattn", lambda x: tower()(x["pixel_values"]), lambda: _patched(
        vtattn.patch.vision_tower, tower(), keep=TOWER_KEEP, feature_layer=FEATURE_LAYER))]
    c.impls += [impl("eager-attn+topk", lambda x: _eager_topk(tower(), TOWER_KEEP, has_cls)(x),
                     lambda: _attn(tower(), "eager"), role="baseline")]
    c.impls.append(impl("sdpa-tower", lambda x: tower()(x["pixel_values"]).last_hidden_state,
                        lambda: _attn(tower(), "sdpa"), role="reference", note="no selection"))
    return [c]


def e2e_cases(name, s, backends):
    """LLaVA-1.5-7B-shaped: CLIP-L/336 + 32-layer 4096-wide Llama; one image and a PROMPT-token
    prompt per sample; time to first token = the prefill forward that yields the first logits."""
    transformers = _transformers()
    if name != "llava7b-prefill" or transformers is None:
        return []

    level = level_of(name, s)
    sc = SCALE[level]
    vision = transformers.CLIPVisionConfig(**_scaled(TOWERS["clip-l336"][1], sc))
    text_kw = _scaled(LLAMA7B, sc)
    text_kw["num_key_value_heads"] = text_kw["num_attention_heads"]
    if level != "full":
        text_kw["vocab_size"] = 1024
    image_token = text_kw["vocab_size"] - 1
    config = transformers.LlavaConfig(vision_config=vision, text_config=transformers.LlamaConfig(**text_kw),
                                      image_token_index=image_token, vision_feature_layer=FEATURE_LAYER,
                                      vision_feature_select_strategy="default")
    at = {}  # device and dtype: make_inputs is the first to know them
    build = lambda device, dtype: _build(transformers.LlavaForConditionalGeneration, config, device, dtype)
    llava = lambda: _model(("e2e", level), build, *at["dt"])
    n_image = (vision.image_size // vision.patch_size) ** 2
    prompt = max(1, PROMPT // sc["side"] ** 2)  # keeps the image : text ratio of the real case
    cases = []
    for B in E2E_BATCHES:
        def make(device, dtype, seed, B=B):
            at["dt"] = device, dtype
            g = torch.Generator(device=device).manual_seed(seed)
            text = torch.randint(1, image_token, (B, prompt), device=device, generator=g)
            image = torch.full((B, n_image), image_token, device=device)
            ids = torch.cat([text[:, :1], image, text[:, 1:]], 1)  # <s> <image> prompt, as LLaVA's template
            return {"input_ids": ids, "attention_mask": torch.ones_like(ids),
                    **_pixels(B, vision.image_size)(device, dtype, seed)}

        def prefill(x):
            llava()(**x, use_cache=True, logits_to_keep=1)
            # None: logits at different keeps are not comparable, so the runner computes no max_err.

        shape = {"B": B, "image_tokens": n_image, "prompt": prompt, "llm_layers": text_kw["num_hidden_layers"],
                 "llm_width": text_kw["hidden_size"], "tower_layers": vision.num_hidden_layers,
                 "scaled": None if level == "full" else level,
                 "cpu_threads": None if level == "full" else 1}
        c = Case("e2e", f"llava7b-ttft:B{B}", shape, make)
        impl = lambda name, inner, **kw: _with_memory(Impl(name, prefill, ctx=lambda: _on(llava(), inner), **kw))
        c.impls = [impl("unpatched-sdpa", lambda: _attn(llava(), "sdpa"), role="baseline")]
        patched = lambda keep: lambda: _patched(vtattn.patch.llava, llava(), keep=keep)
        # keep=1.0 is a reference: the TTFT targets are ratios to it.
        c.impls += [impl(f"keep-{keep}", patched(keep), role="reference" if keep == 1.0 else "vtattn")
                    for keep in KEEPS]
        cases.append(c)
    return cases


BUILDERS = {"vision_tower": tower_cases, "e2e": e2e_cases}
