"""Model-level cases on random-weight transformers models built in code (nothing downloaded):
vision towers with token selection here, the LLaVA end-to-end scenarios in scenarios_llm.py.

Random weights give real timings and memory; they say nothing of accuracy. Real configs on a GPU
(built directly in bf16 on the device); on CPU the models are scaled down (see SCALE) and the
rows say so. Peak memory (CUDA only; none on CPU) is torch.cuda.max_memory_allocated over the
first, untimed call: `peak_gib` in all, `peak_extra_gib` above what was allocated before it."""
import contextlib
from typing import Any, Callable, ContextManager, Iterator, Mapping, TypedDict

import torch

import vtattn

from .cases import LEVELS, SHAPES, Builder, Case, Impl, Inputs, Maker, Shape, Skip, scaled_shape

NOTE = ("vision_tower / e2e: random-weight models: the timings and memory are real, they say nothing of "
        "accuracy.")
TOWER_KEEP = 0.1
FEATURE_LAYER = -2  # LLaVA-1.5's vision_feature_layer; FasterVLM scores the same layer

TOWERS: dict[str, tuple[str, dict[str, int]]] = {  # name -> (transformers config class, kwargs)
    "clip-l336": ("CLIPVisionConfig", dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                                           num_attention_heads=16, image_size=336, patch_size=14)),
    "siglip-so400m": ("SiglipVisionConfig", dict(hidden_size=1152, intermediate_size=4304, num_hidden_layers=27,
                                                 num_attention_heads=16, image_size=384, patch_size=14)),
}


class Scale(TypedDict):  # SCALE's entries
    layers: int | None
    width: int
    side: int
    batch: int


# Per run level: layers kept (None: all; at least 2: the features are layer -2), divisors of the
# width and of the image side, tower batch.
SCALE: dict[str, Scale] = {"full": dict(layers=None, width=1, side=1, batch=32),
                           "cpu": dict(layers=2, width=4, side=2, batch=1),
                           "cpu-quick": dict(layers=2, width=8, side=3, batch=1),
                           "tiny": dict(layers=2, width=16, side=6, batch=1)}


def level_of(name: str, s: Shape) -> str:
    """The run level a scaled attention shape came from (builders get the shape, not the level)."""
    return next(lv for lv in LEVELS if scaled_shape(SHAPES[name], lv) == s)


def scaled_config(kw: Mapping[str, int], sc: Scale) -> dict[str, Any]:
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


def build_model(cls: Any, config: Any, device: torch.device, dtype: torch.dtype) -> Any:
    """Random init straight in `dtype` on `device` (as AutoModel.from_config): a 7B model is built
    in seconds on a GPU, never in fp32 on the host first."""
    torch.manual_seed(0)
    with torch.device(device):
        return cls._from_config(config, dtype=dtype).eval()


_slot: dict[str, Any] = {}  # the one model alive: {"key": ..., "model": ...}


def shared_model(key: object, build: Callable[[torch.device, torch.dtype], Any], device: torch.device,
                 dtype: torch.dtype) -> Any:
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


def with_memory(impl: Impl) -> Impl:
    """Record peak memory (CUDA) over the impl's first call: the runner's untimed probe. None on CPU."""
    call = impl.call
    seen: list[bool] = []

    impl.stats.update(peak_gib=None, peak_extra_gib=None)

    def first_measured(x: Inputs) -> Any:
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
def single_thread(model: Any, inner: Callable[[], ContextManager[Any]]) -> Iterator[None]:
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
def attn_impl(model: Any, name: str) -> Iterator[None]:
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
def patched(patch: Callable[..., Any], model: Any, pending: str | None = None, **kw: Any) -> Iterator[None]:
    """patch(model, **kw) for the block. `pending` names a variant whose API this vtattn may not
    have yet (built in parallel): its refusal, TypeError (an unknown argument) or
    NotImplementedError, becomes a Skip that the row shows instead of an error."""
    try:
        patch(model, **kw)
    except (TypeError, NotImplementedError) as e:
        if pending is None:
            raise
        raise Skip(f"{pending} not in this vtattn ({type(e).__name__}: {e})") from e
    try:
        yield
    finally:
        vtattn.patch.unpatch(model)


def pixels(B: int, image: int) -> Maker:
    def make(device: torch.device, dtype: torch.dtype, seed: int) -> Inputs:
        g = torch.Generator(device=device).manual_seed(seed)
        return {"pixel_values": torch.randn(B, 3, image, image, device=device, dtype=dtype, generator=g)}
    return make


def _eager_topk(tower: Any, keep: float, has_cls: bool) -> Callable[[Inputs], torch.Tensor]:
    """What the reference pruning code does: eager attention with output_attentions=True, scores
    from the feature layer (FasterVLM: the head-mean [CLS] row; no [CLS], as SigLIP: the mean
    attention each token receives), torch top-k, gather the kept features."""
    def call(x: Inputs) -> torch.Tensor:
        out = tower(x["pixel_values"], output_attentions=True, output_hidden_states=True, return_dict=True)
        probs: torch.Tensor = out.attentions[FEATURE_LAYER]
        scores = probs[:, :, 0, 1:].mean(1) if has_cls else probs.mean(1).mean(1)
        feats: torch.Tensor = out.hidden_states[FEATURE_LAYER][:, int(has_cls):]
        k = max(1, round(keep * scores.shape[1]))
        idx = scores.topk(k, dim=1).indices.sort(dim=1).values
        return feats.gather(1, idx[..., None].expand(-1, -1, feats.shape[2]))
    return call


def transformers_or_none() -> Any:
    """transformers, or None where it is not installed (an optional dependency: no model cases)."""
    try:
        import transformers
        return transformers
    except ImportError:
        return None


def tower_cases(name: str, s: Shape, backends: list[str]) -> list[Case]:
    transformers = transformers_or_none()
    if name not in TOWERS or transformers is None:
        return []

    level = level_of(name, s)
    sc = SCALE[level]
    cls_name, kw = TOWERS[name]
    kw = scaled_config(kw, sc)
    config = getattr(transformers, cls_name)(**kw)
    model_cls = transformers.CLIPVisionModel if cls_name.startswith("CLIP") else transformers.SiglipVisionModel
    B, has_cls = sc["batch"], cls_name.startswith("CLIP")
    shape = {"B": B, "layers": kw["num_hidden_layers"], "width": kw["hidden_size"],
             "heads": kw["num_attention_heads"], "image": kw["image_size"], "keep": TOWER_KEEP,
             "scaled": None if level == "full" else level,
             "cpu_threads": None if level == "full" else 1}
    at: dict[str, tuple[torch.device, torch.dtype]] = {}  # device and dtype: make_inputs is the first to know them
    build: Callable[[torch.device, torch.dtype], Any] = lambda device, dtype: build_model(model_cls, config, device,
                                                                                           dtype)
    tower: Callable[[], Any] = lambda: shared_model(("vision_tower", name, level), build, *at["dt"])

    def make(device: torch.device, dtype: torch.dtype, seed: int) -> Inputs:
        at["dt"] = device, dtype
        return pixels(B, kw["image_size"])(device, dtype, seed)

    c = Case("vision_tower", f"{name}:keep-{TOWER_KEEP}", shape, make)
    impl: Callable[..., Impl] = lambda name, call, inner, **kw: with_memory(
        Impl(name, call, ctx=lambda: single_thread(tower(), inner), **kw))

    # vtattn's dispatch picks the kernels; forcing a backend per model row would time the same tower.
    c.impls = [impl("vtattn", lambda x: tower()(x["pixel_values"]), lambda: patched(
        vtattn.patch.vision_tower, tower(), keep=TOWER_KEEP, feature_layer=FEATURE_LAYER))]
    c.impls += [impl("eager-attn+topk", lambda x: _eager_topk(tower(), TOWER_KEEP, has_cls)(x),
                     lambda: attn_impl(tower(), "eager"), role="baseline")]
    c.impls.append(impl("sdpa-tower", lambda x: tower()(x["pixel_values"]).last_hidden_state,
                        lambda: attn_impl(tower(), "sdpa"), role="reference", note="no selection"))
    return [c]


BUILDERS: dict[str, Builder] = {"vision_tower": tower_cases}

