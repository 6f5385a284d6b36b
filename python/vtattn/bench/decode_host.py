"""Host overhead of a decode step (`decode_host` rows): what each drop-in adds to the host time of
one decode forward of the LLaVA-1.5-7B scenario's model (scaled on CPU as the e2e rows), per LLM
layer, against the unpatched model on the same cache kind (a DynamicCache).

Each row runs its own prefill (untimed), then STEPS one-token forwards as `generate` runs them
(input token, the attention mask one longer each step, cache_position); a sample is one forward's
host time: `time.thread_time` of the calling thread, so a shared CPU's other processes do not
count. On CPU that is the whole step (the kernels run on the host); on a GPU it is the launch side
(Python, dispatch, launches; a host sync waits inside it). median_ms is that time per step; the
rate column shows `host_us_layer` = (row - unpatched) / LLM layers, in microseconds (issue 14's
budget: at most 40 us per layer): the median over steps of (row's step - the same step of an
unpatched twin of the model run next to it, each of the pair first in turn: the second runs on
caches the first warmed), so each difference is taken under one load (a shared machine's load
swings more between runs than the overhead measured); speedup is unpatched / row as everywhere.
Rows: unpatched-sdpa (baseline), the vision-side keep, FastV, LOOK-M budgets, their combinations
and DecodeH2O (its eviction steps included: every STEPS // 4 tokens), CMAI and VAR (as the e2e
rows: attention rules whose decode steps compute more than a drop-in's); then `-static` rows on a
StaticCache (as generate(cache_implementation="static") makes it; vtattn's KV stage turns it into a
static CompressedCache), each against an unpatched twin on a StaticCache too (unpatched-sdpa-static:
that twin's own row, no difference)."""
import statistics
import time
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from typing import Any

import torch

import vtattn

from ..patch.core import output_cache
from .cases import Builder, Case, Impl, Inputs, Shape
from .scenarios import SCALE, attn_impl, build_model, level_of, patched, shared_model, single_thread, transformers_or_none
from .scenarios_llm import FASTV, LEVEL_SCALE, PROMPT, SCENARIOS, _config, _image_tokens, lookm
from .timing import Timing, summary

STEPS = 16  # decode forwards per call, the first WARM of them untimed
WARM = 2
CALLS = {"full": 3, "cpu": 6}

Variant = tuple[str, str, Callable[[], dict[str, Any]] | None, bool]  # (row, role, patch kwargs or None, static)


def _variants() -> list[Variant]:
    def fastv() -> vtattn.patch.FastV:
        return vtattn.patch.FastV(layer=FASTV["layer"], keep=FASTV["keep"])

    def h2o() -> vtattn.kv.DecodeH2O:
        return vtattn.kv.DecodeH2O(lookm(0.2), every=STEPS // 4, recent=STEPS // 4)

    dynamic: list[Variant] = [
        ("unpatched-sdpa", "baseline", None, False),
        ("keep-0.25", "vtattn", lambda: dict(keep=0.25), False),
        (f"fastv-{FASTV['keep']}", "vtattn", lambda: dict(fastv=fastv()), False),
        ("lookm-0.1", "vtattn", lambda: dict(kv=lookm(0.1)), False),
        ("lookm-0.2", "vtattn", lambda: dict(kv=lookm(0.2)), False),
        ("keep-0.25+lookm-0.2", "vtattn", lambda: dict(keep=0.25, kv=lookm(0.2)), False),
        (f"fastv-{FASTV['keep']}+lookm-0.2", "vtattn", lambda: dict(fastv=fastv(), kv=lookm(0.2)), False),
        ("lookm-0.2+decode-h2o", "vtattn", lambda: dict(kv=h2o()), False),
        # the methods that change attention itself (their decode work is more than a drop-in's routing)
        ("cmai", "vtattn", lambda: dict(stages=[vtattn.patch.CMAI(keep=0.5)]), False),
        ("var-0.6", "vtattn", lambda: dict(stages=[vtattn.patch.VAR(p=0.6, dims=(0, 1))]), False),
    ]
    static: list[Variant] = [
        ("unpatched-sdpa-static", "vtattn", None, True),
        ("keep-0.25-static", "vtattn", lambda: dict(keep=0.25), True),
        (f"fastv-{FASTV['keep']}-static", "vtattn", lambda: dict(fastv=fastv()), True),
        ("lookm-0.2-static", "vtattn", lambda: dict(kv=lookm(0.2)), True),
        ("keep-0.25+lookm-0.2-static", "vtattn", lambda: dict(keep=0.25, kv=lookm(0.2)), True),
        ("lookm-0.2+decode-h2o-static", "vtattn", lambda: dict(kv=h2o()), True),
        ("cmai-static", "vtattn", lambda: dict(stages=[vtattn.patch.CMAI(keep=0.5)]), True),
        ("var-0.6-static", "vtattn", lambda: dict(stages=[vtattn.patch.VAR(p=0.6, dims=(0, 1))]), True),
    ]
    return dynamic + static


def decode_host_cases(name: str, s: Shape, backends: list[str]) -> list[Case]:
    """The rows, once: on the LLaVA-7B attention shape, which gives the run level."""
    transformers = transformers_or_none()
    if name != "llava7b-prefill" or transformers is None:
        return []
    level = level_of(name, s)
    scenario = SCENARIOS["llava7b"]
    config, image_token = _config(transformers, scenario, level)
    key = ("e2e", scenario["anyres"], scenario["kv_heads"], level)  # the e2e rows' model
    at: dict[str, tuple[torch.device, torch.dtype]] = {}
    model: Callable[[], Any] = lambda: shared_model(key, lambda d, t: build_model(  # noqa: E731
        transformers.LlavaForConditionalGeneration, config, d, t), *at["dt"])
    per_image = _image_tokens(config, scenario)
    prompt = max(1, PROMPT // SCALE[LEVEL_SCALE[level]]["side"] ** 2)  # the e2e rows' image : text ratio
    layers = config.text_config.num_hidden_layers

    def make(device: torch.device, dtype: torch.dtype, seed: int) -> Inputs:
        at["dt"] = device, dtype
        g = torch.Generator(device=device).manual_seed(seed)
        text = torch.randint(1, image_token, (1, prompt), device=device, generator=g)
        ids = torch.cat([text[:, :1], torch.full((1, per_image), image_token, device=device), text[:, 1:]], 1)
        side = config.vision_config.image_size
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids),
                "pixel_values": torch.randn(1, 3, side, side, device=device, dtype=dtype, generator=g)}

    shape = {"B": 1, "images": 1, "image_tokens": per_image, "prompt": prompt, "new_tokens": STEPS - WARM,
             "llm_layers": layers, "llm_width": config.text_config.hidden_size,
             "scaled": None if level == "full" else LEVEL_SCALE[level]}
    case = Case("decode_host", "llava7b-decode-host:B1", shape, make)
    calls = CALLS["full" if level == "full" else "cpu"]
    twin: Callable[[], Any] = lambda: _twin(key, lambda d, t: build_model(  # noqa: E731
        transformers.LlavaForConditionalGeneration, config, d, t), *at["dt"])
    inner: Callable[..., AbstractContextManager[Any]]  # called with no arguments
    for row, role, kw, static in _variants():
        if kw is None:
            inner = lambda: attn_impl(model(), "sdpa")  # noqa: E731
        else:
            inner = lambda kw=kw: patched(vtattn.patch.llava, model(), pending="decode fast path", **kw())  # noqa: E731
        ctx = lambda inner=inner: single_thread(model(), inner)  # noqa: E731
        impl = Impl(row, None, role=role, ctx=ctx,  # type: ignore[arg-type]  # _steps sets call
                    stats=dict(host_us_layer=None))
        _steps(impl, model, twin if kw is not None else None, calls, layers, static)
        case.impls.append(impl)
    return [case]


_twins: dict[object, Any] = {}


def _twin(key: object, build: Callable[[torch.device, torch.dtype], Any], device: torch.device,
          dtype: torch.dtype) -> Any:
    """An unpatched copy of the rows' model (same weights: built with the same seed), whose steps
    interleave with a patched row's: the difference is then measured under the same load."""
    key = (key, device, dtype)
    if key not in _twins:
        _twins.clear()
        model = build(device, dtype)
        for m in model.modules():
            if hasattr(m, "config"):
                m.config._attn_implementation = "sdpa"
        _twins[key] = model
    return _twins[key]


def _decode(model: Any, x: Inputs, on_step: Callable[[int, float], None], static: bool) -> Callable[[int], None]:
    """Prefill (untimed; static: into a StaticCache of the prompt plus STEPS), then STEPS one-token
    forwards; on_step(s, seconds of host time). Each forward's arguments are generate's
    (`prepare_inputs_for_generation`, untimed: a static cache's decode steps take its 4-D mask)."""
    cache = None
    if static:
        from transformers import StaticCache
        cache = StaticCache(config=model.config.get_text_config(decoder=True),
                            max_cache_len=x["input_ids"].shape[1] + STEPS)
    mask, L = x["attention_mask"], x["input_ids"].shape[1]
    prompt = {k: v for k, v in x.items() if k not in ("input_ids", "attention_mask")}
    out = model(**model.prepare_inputs_for_generation(
        x["input_ids"], cache=cache, attention_mask=mask, cache_position=torch.arange(L, device=mask.device),
        use_cache=True, is_first_iteration=True, **prompt), logits_to_keep=1)
    state = [output_cache(out), out.logits[:, -1:].argmax(-1)]
    ones = mask.new_ones(mask.shape[0], STEPS)

    def step(s: int) -> None:
        inputs = model.prepare_inputs_for_generation(
            state[1], next_sequence_length=1, cache=state[0], attention_mask=torch.cat([mask, ones[:, :s + 1]], 1),
            cache_position=torch.tensor([L + s], device=mask.device), use_cache=True)
        t0 = time.thread_time()
        out = model(**inputs)
        on_step(s, time.thread_time() - t0)
        state[:] = output_cache(out), out.logits[:, -1:].argmax(-1)
    return step


def _steps(impl: Impl, model: Callable[[], Any], twin: Callable[[], Any] | None, calls: int, layers: int,
           static: bool) -> None:
    """A sample: one decode forward's host ms. Patched rows step the unpatched twin alternately
    (host_us_layer: their medians' difference per layer)."""
    laps: list[float] = []
    twin_laps: list[float] = []

    def lap(into: list[float]) -> Callable[[int, float], None]:
        def on_step(s: int, t: float) -> None:
            if s >= WARM:
                into.append(t * 1e3)
        return on_step

    def call(x: Inputs) -> None:
        mine = _decode(model(), x, lap(laps), static)
        other = None if twin is None else _decode(twin(), x, lap(twin_laps), static)
        for s in range(STEPS):  # in turn first: the second of a pair runs on caches the first warmed
            for step in ((other, mine) if s % 2 == 0 else (mine, other)):
                if step is not None:
                    step(s)

    def timer(fns: Sequence[Callable[[], object]], device: torch.device, quick: bool) -> Timing:
        del laps[:], twin_laps[:]  # the probe's
        for i in range(calls if not quick else max(2, calls // 2)):
            fns[i % len(fns)]()
        t = summary(laps)
        if twin_laps:  # each step against the twin's step just before it: the pairs share the load
            diffs = [mine - other for mine, other in zip(laps, twin_laps)]
            impl.stats["host_us_layer"] = statistics.median(diffs) / layers * 1e3
            impl.note = f"host {impl.stats['host_us_layer']:+.3g} us/layer"
        return t

    impl.call, impl.timer = call, timer


BUILDERS: dict[str, Builder] = {"decode_host": decode_host_cases}
