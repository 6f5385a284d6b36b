"""End-to-end LLaVA scenarios (`e2e` rows) on random-weight models built from the real configs
(nothing downloaded): LLaVA-1.5-7B (CLIP-L/336 + Vicuna-7B), its GQA variant, LLaVA-NeXT anyres
and an 8-frame video prompt. On CPU the models are scaled down further than the towers (these
cases have ~10x more rows), batches above 1 run at 2, and each row's shape says so.

Rows, per scenario and batch; every variant is one row:
- `<scenario>-ttft:B<b>`: time to first token, the prefill forward (vision tower, projector and
  LLM over images + prompt; logits of the last position only; the cache filled).
- `<scenario>-decode:B<b>`: generate, greedy, min_new_tokens = max_new_tokens = NEW_TOKENS so
  every variant decodes the same length. The decode steps are timed directly, by a streamer:
  from the prefill's token reaching the host to the end of generate, i.e. NEW_TOKENS - 1
  one-token forwards (generate synchronizes on every step anyway: its stop check reads the
  device). median_ms is that time; tok_s = B * (NEW_TOKENS - 1) / median.
- peak_gib: torch.cuda.max_memory_allocated over the row's first, untimed call (the prefill, or
  the whole generate); CUDA only, none on CPU. kv_bytes: K/V bytes the cache holds after that
  call: CompressedCache.kv_bytes() under a KV policy, else the dense cache's tensors.
- speedup: the unpatched model's time at the same batch / the row's time; on CPU the median of that
  ratio over pairs of calls alternating with the unpatched model's (`Impl.sample`, runner._paired).
- llava7b's decode cases add `<variant>-static` (generate(cache_implementation="static"): a
  StaticCache, or the static CompressedCache vtattn's KV stage makes of it; not compiled) and
  `<variant>-compiled` (the same with transformers' CompileConfig, on CPU too; CUDA graphs on a
  GPU), for the unpatched model, LOOK-M keeping 0.2, vision-side pruning to 0.25 with it
  (`keep-0.25+lookm-0.2`), and LOOK-M under DecodeH2O (`lookm-0.2+decode-h2o`, evicting on the
  device every new_tokens / 4 tokens); the first call (untimed) compiles.
- `lookm-<b>`: LOOK-M keeping `b` of the prompt (`lookm`): b is the KV budget in the papers' sense,
  its recent window included.
Random weights: the timings and memory are real; the tokens say nothing of accuracy.

A variant whose API this vtattn lacks (FastV, KV compression: being built) is a row with no
timing and `skipped` saying why, never a missing row."""
import time
from contextlib import AbstractContextManager
from typing import Any, Callable, Sequence

import torch

import vtattn
from vtattn.patch.core import output_cache

from . import scenarios_qwen, scenarios_vllm
from .cases import Builder, Case, Impl, Inputs, Maker, Shape
from .scenarios import (FEATURE_LAYER, SCALE, TOWERS, attn_impl, build_model, level_of, patched, scaled_config,
                        shared_model, single_thread, transformers_or_none, with_memory)
from .timing import Timing, time_reps

LLAMA7B = dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
               num_key_value_heads=32, vocab_size=32064, max_position_embeddings=4096)
# name -> LLM kv heads, images per prompt, anyres (LLaVA-NeXT: base view + 2x2 crops), text tokens,
# variants (all: selection, FastV and KV budgets; kv: KV budgets only)
SCENARIOS: dict[str, dict[str, Any]] = {
    "llava7b": dict(kv_heads=32, images=1, anyres=False),
    # Video stand-in: 8 frames as 8 images in one LLaVA-1.5 prompt (576 tokens each, no pooling);
    # 4672 tokens pass the 4096 positions LLaVA-1.5 was trained on: RoPE takes any position, and
    # accuracy is not measured here.
    "llava7b-video8": dict(kv_heads=32, images=8, anyres=False),
    "llava7b-gqa": dict(kv_heads=8, images=1, anyres=False),
    "llava-next-anyres5": dict(kv_heads=32, images=1, anyres=True),
    # The KV-compression case of LOOK-M's setting: 4 images (2304 tokens) + 200 text tokens.
    "llava7b-4img": dict(kv_heads=32, images=4, anyres=False, prompt=200, variants="kv"),
    "llava7b-gqa-4img": dict(kv_heads=8, images=4, anyres=False, prompt=200, variants="kv"),
    # Qwen2-VL-7B (GQA, M-RoPE), 4 images of 448 x 448 (1024 tokens) + 200 text tokens, through
    # vtattn.patch.qwen2_vl: vision-side keep, FastV, KV rows (scenarios_qwen.py).
    "qwen2vl7b-4img": dict(family="qwen2vl", images=4, prompt=200, variants="qwen"),
    # vLLM serving a batch of image prompts, plain and with vtattn.vllm's pruning: requests/s and time to
    # first token, on a tiny LLaVA (scenarios_vllm.py); its rows are skipped where vLLM is not importable.
    "vllm-llava": dict(family="vllm"),
}
KEEPS = (1.0, 0.5, 0.25, 0.1, 0.05)
FASTV: dict[str, Any] = dict(method="fastv", layer=2, keep=0.25)
KV_BUDGETS = (1.0, 0.5, 0.2, 0.1)  # the share of the prompt a lookm row keeps, its recent window included
KV_RECENT = 0.1
COMBINED_BUDGET = 0.2  # LOOK-M's budget with FastV and with decode-time eviction (the 4-image scenarios)
TTFT_BATCHES, DECODE_BATCHES = (1, 8), (1, 16)
CPU_BATCH = 2  # on CPU every batch above 1 runs at 2; the case keeps the real batch's name
PROMPT = 64  # text tokens beside the images, unless a scenario says otherwise
# The model scale of each run level (scenarios.SCALE), one step smaller than the towers' on CPU,
# and the LLM's layers there: 4, so that FastV's layer 2 has layers after it.
LEVEL_SCALE = {"full": "full", "cpu": "cpu-quick", "cpu-quick": "tiny", "tiny": "tiny"}
CPU_LLM_LAYERS = 4
# Timed calls per row after the untimed probe on a GPU: few, as a full-size row takes up to seconds
# (about 10 minutes for all e2e rows on an H100, estimated from their FLOPs). CPU rows sample until
# their spread is small (timing.CPU_BUDGETS).
REPS = {"ttft": 3, "decode": 2}
NEW_TOKENS = {"full": 32, "cpu": 8}


def lookm(budget: float) -> "vtattn.kv.LookM":
    """LOOK-M keeping `budget` of the prompt: a recent window of KV_RECENT (at most half the budget)
    and heavy hitters for the rest, as LOOK-M's release splits its 20% runs (hh_ratio 0.1, recent_ratio
    0.1). budget 1.0 keeps every token. (LookM's own `budget` is the heavy hitters' share alone.)"""
    if budget >= 1.0:
        return vtattn.kv.LookM(budget=1.0, recent=KV_RECENT)
    recent = min(KV_RECENT, budget / 2)
    return vtattn.kv.LookM(budget=round(budget - recent, 6), recent=recent)


def _config(transformers: Any, scenario: dict[str, Any], level: str) -> tuple[Any, int]:
    """The LlavaConfig / LlavaNextConfig of a scenario at a run level, and its image token id."""
    sc = SCALE[LEVEL_SCALE[level]]
    vision = transformers.CLIPVisionConfig(**scaled_config(TOWERS["clip-l336"][1], sc))
    text = scaled_config(LLAMA7B, sc)
    group = LLAMA7B["num_attention_heads"] // scenario["kv_heads"]
    text["num_key_value_heads"] = max(1, text["num_attention_heads"] // group)
    if level != "full":
        text.update(num_hidden_layers=CPU_LLM_LAYERS, vocab_size=1024)
    image_token = text["vocab_size"] - 1
    kw = dict(vision_config=vision, text_config=transformers.LlamaConfig(**text), image_token_index=image_token,
              vision_feature_layer=FEATURE_LAYER, vision_feature_select_strategy="default")
    if not scenario["anyres"]:
        return transformers.LlavaConfig(**kw), image_token
    side = vision.image_size  # one pinpoint, twice the tower's side: every image is a 2x2 crop grid
    return transformers.LlavaNextConfig(**kw, image_grid_pinpoints=[[2 * side, 2 * side]]), image_token


def _image_tokens(config: Any, scenario: dict[str, Any]) -> int:
    """Tokens per image after the processor's expansion: g*g patches per view (no [CLS]); anyres
    adds the 2x2 crops' (2g x 2g) grid with a newline token closing each of its 2g rows."""
    g: int = config.vision_config.image_size // config.vision_config.patch_size
    return g * g + (2 * g * (2 * g + 1) if scenario["anyres"] else 0)


class _DecodeClock:
    """A generate streamer timing the decode steps: from the second put (the prefill's token; the
    first put is the prompt) to end(). Seconds per generate call in `laps`."""

    def __init__(self) -> None:
        self.laps: list[float] = []
        self.puts = 0
        self.start: float | None = None

    def put(self, tokens: torch.Tensor) -> None:
        self.puts += 1
        if self.puts == 2:
            self.start = time.perf_counter()

    def end(self) -> None:
        assert self.start is not None, "end() before the prefill's token"
        self.laps.append(time.perf_counter() - self.start)
        self.puts = 0


def _cache_bytes(cache: Any) -> int:
    if hasattr(cache, "kv_bytes"):  # vtattn.kv.CompressedCache: what the policy left allocated
        return int(cache.kv_bytes())
    return sum(t.numel() * t.element_size() for layer in cache.layers if getattr(layer, "is_initialized", False)
               for t in (layer.keys, layer.values))


def _record_cache(impl: Impl, cache: Any) -> None:
    """kv_bytes of the first (probe) call's cache, as a row field and in the note."""
    if cache is None or impl.stats["kv_bytes"] is not None:
        return
    impl.stats["kv_bytes"] = n = _cache_bytes(cache)
    impl.note = " ".join(filter(None, [impl.note, f"kv {n / 2**20:.3g} MiB"]))


# (row name, role, patch kwargs (built inside the row's ctx) or None, the name of a variant whose API may be missing)
Variant = tuple[str, str, Callable[..., dict[str, Any]] | None, str | None]  # called with no arguments


def _variants(which: str, new_tokens: int, llm_layers: int, anyres: bool = False) -> list[Variant]:
    """(row name, role, patch kwargs (a function: built inside the row's ctx) or None for the
    unpatched model, the name of a variant whose API may be missing). which: "all" (LLaVA: vision
    selection, FastV, visual-token exit, KV budgets), "kv" (LLaVA: KV rows) or "qwen" (patch.qwen2_vl:
    vision-side keep below 1, FastV, visual-token exit, KV rows). The exit row (`exit-half`): every
    visual token leaves the LLM at half its depth, K = llm_layers // 2, alone (the tower unpatched);
    named by the fraction, not K, so the name is the same at every level; likewise `aim` (AIM's schedule
    scaled to the depth; `aim-prune` on LLaVA-NeXT anyres: its LLM cuts without the image merge, which
    AIM defines for one view per image)."""
    out: list[Variant] = [("unpatched-sdpa", "baseline", None, None)]
    if which == "all":  # keep=1.0 is a reference: the targets are ratios to it.
        out += [(f"keep-{k}", "reference" if k == 1.0 else "vtattn", lambda k=k: dict(keep=k), None) for k in KEEPS]
        out.append((f"fastv-{FASTV['keep']}", "vtattn", lambda: dict(FASTV), "FastV"))
    if which in ("all", "qwen"):
        K = llm_layers // 2
        out.append(("exit-half", "vtattn", lambda: dict(stages=[vtattn.patch.VisualExit(layer=K)]), "VisualExit"))
        # SparseVLM: the release's LLaVA-1.5 pruning layers (2, 6, 15, 19 of 32) scaled to the depth, its MME setting
        sparse = tuple(sorted({l * llm_layers // 32 for l in (2, 6, 15, 19)} & set(range(llm_layers - 1))))
        out.append(("sparsevlm", "vtattn", lambda: dict(stages=[vtattn.patch.SparseVLM(layers=sparse)]), "SparseVLM"))
        # CMAI in every LLM layer: each text query keeps the half of the image tokens it sees with the most focus
        out.append(("cmai", "vtattn", lambda: dict(stages=[vtattn.patch.CMAI(keep=0.5)]), "CMAI"))
        # VAR at the release's p, in layers 2 .. L-1: one group_attention pass per layer. The bench's random
        # weights have no massive activations, so any dims do (the cost does not depend on which are sinks).
        out.append(("var-0.6", "vtattn", lambda: dict(stages=[vtattn.patch.VAR(p=0.6, dims=(0, 1))]), "VAR"))
        # AIM: the release's LLaVA-1.5 schedule (cuts from layer 13 of 32, 12.5% a layer) scaled to the depth,
        # its image merge (576 -> 252): before LLaVA's projector, on Qwen2-VL's LLM input (per image / frame)
        start = llm_layers * 13 // 32
        merge: dict[str, Any] = {} if which == "all" else dict(metric="features", order="original")
        if anyres:  # AIM's merge is defined for one view per image: LLaVA-NeXT's row runs its LLM cuts alone
            out.append(("aim-prune", "vtattn", lambda: dict(stages=[vtattn.patch.AIM(start=start, merge=())]), None))
        else:
            out.append(("aim", "vtattn", lambda: dict(stages=[vtattn.patch.AIM(start=start, **merge)]), "AIM"))
    if which == "qwen":  # keep=1.0 is the unpatched model there (nothing to patch)
        out += [(f"keep-{k}", "vtattn", lambda k=k: dict(keep=k), None) for k in KEEPS if k < 1.0]
        out.append((f"fastv-{FASTV['keep']}", "vtattn", lambda: dict(
            fastv=vtattn.patch.FastV(layer=FASTV["layer"], keep=FASTV["keep"])), None))
    out += [(f"lookm-{b}", "vtattn", lambda b=b: dict(kv=lookm(b)), "KV compression") for b in KV_BUDGETS]
    if which in ("kv", "qwen"):  # both in the LLM: FastV's layers compress what FastV kept
        out.append((f"fastv-{FASTV['keep']}+lookm-{COMBINED_BUDGET}", "vtattn", lambda: dict(
            fastv=vtattn.patch.FastV(layer=FASTV["layer"], keep=FASTV["keep"]),
            kv=lookm(COMBINED_BUDGET)), "FastV with KV compression"))
        every = new_tokens // 4  # 8 (2 on CPU): 3 evictions in a decode row, their cost (no saving this short)
        out.append((f"lookm-{COMBINED_BUDGET}+decode-h2o", "vtattn", lambda: dict(kv=vtattn.kv.DecodeH2O(
            lookm(COMBINED_BUDGET), every=every, recent=every)),
            "decode-time eviction"))
    return out


STATIC_ROWS = ("llava7b",)  # the scenarios whose decode cases add the static-cache and compiled rows
STATIC_BUDGET = 0.2  # their LOOK-M's
STATIC_KEEP = 0.25  # their vision-side pruning's


StaticVariant = tuple[str, str, Callable[[], dict[str, Any]] | None, dict[str, Any]]


def _static_variants(new_tokens: int) -> list[StaticVariant]:
    """(row, role, patch kwargs or None, generate options) of the static-cache rows: generate with
    cache_implementation="static" (vtattn's KV stage turns it into a static CompressedCache) without
    compilation, then compiled (transformers' CompileConfig, on every device: CUDA graphs on a GPU).
    LOOK-M through the KV stage alone, after vision-side pruning (the patched forward compiles
    whole, its stages' decode steps too), and under DecodeH2O (its eviction on device counts)."""
    from transformers import CompileConfig
    compiled = CompileConfig()
    compiled._compile_all_devices = True  # CPU too (transformers compiles on accelerators only)
    stage = lambda: dict(stages=[vtattn.patch.KVCompress(lookm(STATIC_BUDGET))])  # noqa
    pruned = lambda: dict(keep=STATIC_KEEP, kv=lookm(STATIC_BUDGET))  # noqa
    every = new_tokens // 4  # as the dynamic `lookm-0.2+decode-h2o` rows
    evicting = lambda: dict(kv=vtattn.kv.DecodeH2O(lookm(STATIC_BUDGET), every=every, recent=every))  # noqa
    out: list[StaticVariant] = []
    for mode, options in (("static", dict(cache_implementation="static", disable_compile=True)),
                          ("compiled", dict(cache_implementation="static", compile_config=compiled))):
        out += [(f"unpatched-sdpa-{mode}", "vtattn", None, options),
                (f"lookm-{STATIC_BUDGET}-{mode}", "vtattn", stage, options),
                (f"keep-{STATIC_KEEP}+lookm-{STATIC_BUDGET}-{mode}", "vtattn", pruned, options),
                (f"lookm-{STATIC_BUDGET}+decode-h2o-{mode}", "vtattn", evicting, options)]
    return out


def e2e_cases(name: str, s: Shape, backends: list[str]) -> list[Case]:
    """Every scenario's cases, once: on the LLaVA-7B attention shape, which gives the run level."""
    transformers = transformers_or_none()
    if name != "llava7b-prefill" or transformers is None:
        return []
    level = level_of(name, s)
    cases: list[Case] = []
    for scenario_name, scenario in SCENARIOS.items():
        cases += _scenario_cases(transformers, scenario_name, scenario, level)
    return cases


def _scenario_cases(transformers: Any, scenario_name: str, scenario: dict[str, Any], level: str) -> list[Case]:
    if scenario.get("family") == "vllm":
        return scenarios_vllm.cases(scenario_name, level)
    qwen = scenario.get("family") == "qwen2vl"
    key: tuple[object, ...]
    patch: Callable[..., Any]
    if qwen:
        config, image_token = scenarios_qwen.config(transformers, LEVEL_SCALE[level],
                                                    None if level == "full" else CPU_LLM_LAYERS)
        cls, key = transformers.Qwen2VLForConditionalGeneration, ("e2e", "qwen2vl", level)
        patch = vtattn.patch.qwen2_vl
        patches = scenarios_qwen.grid(LEVEL_SCALE[level])
        per_image, tower_layers = patches ** 2 // 4 + 2, config.vision_config.depth  # + vision start / end
    else:
        config, image_token = _config(transformers, scenario, level)
        cls = (transformers.LlavaNextForConditionalGeneration if scenario["anyres"]
               else transformers.LlavaForConditionalGeneration)
        key = ("e2e", scenario["anyres"], scenario["kv_heads"], level)  # llava7b and its video share the model
        patch, per_image = vtattn.patch.llava, _image_tokens(config, scenario)
        tower_layers = config.vision_config.num_hidden_layers
    text = config.text_config
    at: dict[str, tuple[torch.device, torch.dtype]] = {}  # device and dtype: make_inputs is the first to know them
    build: Callable[[torch.device, torch.dtype], Any] = lambda device, dtype: build_model(cls, config, device, dtype)
    model: Callable[[], Any] = lambda: shared_model(key, build, *at["dt"])
    images = scenario["images"]
    scale = SCALE[LEVEL_SCALE[level]]["side"]
    prompt = max(1, scenario.get("prompt", PROMPT) // scale ** 2)  # keeps the image : text ratio
    new_tokens = NEW_TOKENS["full" if level == "full" else "cpu"]
    base_shape = {"images": images, "views": 5 if scenario.get("anyres") else 1, "image_tokens": images * per_image,
                  "prompt": prompt, "llm_layers": text.num_hidden_layers, "llm_width": text.hidden_size,
                  "heads": text.num_attention_heads, "kv_heads": text.num_key_value_heads,
                  "tower_layers": tower_layers, "scaled": None if level == "full" else LEVEL_SCALE[level],
                  "cpu_threads": None if level == "full" else 1}

    def make_inputs(B: int) -> Maker:
        def make(device: torch.device, dtype: torch.dtype, seed: int) -> Inputs:
            at["dt"] = device, dtype
            g = torch.Generator(device=device).manual_seed(seed)
            if qwen:
                return scenarios_qwen.inputs(config, B, images, prompt, patches, device, dtype, g)
            side = config.vision_config.image_size
            text_ids = torch.randint(1, image_token, (B, prompt), device=device, generator=g)
            image_ids = torch.full((B, images * per_image), image_token, device=device)
            ids = torch.cat([text_ids[:, :1], image_ids, text_ids[:, 1:]], 1)  # <s> <image>... prompt
            views = (B, 5) if scenario["anyres"] else (B * images,)
            x: Inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids),
                 "pixel_values": torch.randn(*views, 3, side, side, device=device, dtype=dtype, generator=g)}
            if scenario["anyres"]:  # images at the pinpoint's size: no padding for unpad to strip
                x["image_sizes"] = torch.tensor([[2 * side, 2 * side]] * B, device=device)
            return x
        return make

    def impls(kind: str, B: int) -> list[Impl]:
        out: list[Impl] = []
        inner: Callable[..., AbstractContextManager[Any]]  # called with no arguments
        for row, role, kw, pending in _variants(scenario.get("variants", "all"), new_tokens, text.num_hidden_layers,
                                              bool(scenario.get("anyres"))):
            if kw is None:
                inner = lambda: attn_impl(model(), "sdpa")
            else:
                inner = lambda kw=kw, pending=pending: patched(patch, model(), pending=pending, **kw())
            ctx = lambda inner=inner: single_thread(model(), inner)
            impl = Impl(row, None, role=role, ctx=ctx,  # type: ignore[arg-type]  # _prefill / _decode set call
                        stats=dict(kv_bytes=None))
            if kind == "ttft":
                _prefill(impl, model)
            else:
                _decode(impl, model, B, new_tokens)
            out.append(with_memory(impl))
        if kind == "decode" and scenario_name in STATIC_ROWS:
            for row, role, kw, options in _static_variants(new_tokens):
                if kw is None:
                    inner = lambda: attn_impl(model(), "sdpa")
                else:
                    inner = lambda kw=kw: patched(patch, model(), pending="static KV cache", **kw())
                ctx = lambda inner=inner: single_thread(model(), inner)
                impl = Impl(row, None, role=role, ctx=ctx,  # type: ignore[arg-type]  # _decode sets call
                            stats=dict(kv_bytes=None))
                _decode(impl, model, B, new_tokens, options)
                out.append(with_memory(impl))
        return out

    cases: list[Case] = []
    for kind, batches in (("ttft", TTFT_BATCHES), ("decode", DECODE_BATCHES)):
        for real_B in batches:
            B = real_B if level == "full" else min(real_B, CPU_BATCH)
            shape = {"B": B, **base_shape, **({"new_tokens": new_tokens} if kind == "decode" else {})}
            c = Case("e2e", f"{scenario_name}-{kind}:B{real_B}", shape, make_inputs(B))
            c.impls = impls(kind, B)
            cases.append(c)
    return cases


def _prefill(impl: Impl, model: Callable[[], Any]) -> None:
    def call(x: Inputs) -> None:
        out = model()(**x, use_cache=True, logits_to_keep=1)
        _record_cache(impl, output_cache(out))
        # None: logits at different keeps are not comparable, so the runner computes no max_err.

    def sample(x: Inputs) -> float:
        t = time.perf_counter()
        impl.call(x)  # (late bound: with_memory wraps it)
        return (time.perf_counter() - t) * 1e3

    impl.call, impl.sample = call, sample
    impl.timer = lambda fns, device, quick: time_reps(fns, device, REPS["ttft"], quick)


def _decode(impl: Impl, model: Callable[[], Any], B: int, new_tokens: int,
            options: dict[str, Any] | None = None) -> None:
    clock = _DecodeClock()
    impl.stats["tok_s"] = None

    def call(x: Inputs) -> None:
        out = model().generate(**x, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                               pad_token_id=0, streamer=clock, return_dict_in_generate=True, **(options or {}))
        _record_cache(impl, output_cache(out))

    def timer(fns: Sequence[Callable[[], object]], device: torch.device, quick: bool) -> Timing:
        del clock.laps[:]  # drop the probe's
        # whole generate calls, each sample the clock's lap: their decode part
        t = time_reps(fns, device, REPS["decode"], quick, measured=lambda: clock.laps[-1] * 1e3)
        impl.stats["tok_s"] = B * (new_tokens - 1) / (t.median_ms / 1e3)
        return t

    def sample(x: Inputs) -> float:
        impl.call(x)  # (late bound: with_memory wraps it)
        return clock.laps[-1] * 1e3

    impl.call, impl.timer, impl.sample = call, timer, sample


BUILDERS: dict[str, Builder] = {"e2e": e2e_cases}

