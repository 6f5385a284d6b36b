"""The `vllm` e2e scenario: vLLM serving a batch of image prompts with vtattn.vllm's pruning at keep
1.0 / 0.5 / 0.25 / 0.1 against plain vLLM, measured in the same run: requests/s and time to first
token. The model is a tiny random-weight LLaVA-1.5 (CLIP tower; vtattn.vllm.tiny) written to a
temporary folder, its image side and language model sized per run level (SIZES). It runs where
vLLM is importable (the vLLM environment: scripts/vllm_env.sh); elsewhere its rows are skipped with
the reason.

Rows (case `vllm-llava:B32`; the batch that runs is the shape's), one vLLM engine each, started in the row's context (untimed) and shut
down after it, one at a time, in-process (VLLM_ENABLE_V1_MULTIPROCESSING=0), eager (no CUDA graphs,
no torch.compile: minutes per engine on CPU), prefix caching off:
- `plain-vllm` (baseline): vtattn installed, no pruning asked (vLLM's own model);
- `keep-1.0` (reference): vtattn's variant keeping every token (its overhead);
- `keep-0.5`, `keep-0.25`, `keep-0.1`: FasterVLM's [CLS] scores (`method="cls"`).
A sample: B requests, one image each, submitted at once to the engine (`LLMEngine.add_request`: the
multimodal processor runs there), stepped until every request has its new tokens (SIZES; greedy,
EOS ignored). Every sample has new random images, so no vLLM cache (encoder, processor, prefix) reuses
an earlier sample's work. median_ms: the batch's wall time; `req_s` = B / median (the rate column);
`ttft_ms`: the median over samples of the batch's mean time to first token (from the batch's
submission to the engine step that returns the request's first token), `ttft_ci_ms` its 95% interval.
Random weights: the timings are real, the tokens say nothing of accuracy."""
import contextlib
import gc
import importlib.util
import itertools
import os
import tempfile
import time
from typing import Any, Callable, Iterator, Sequence

import torch

from .cases import Case, Impl, Inputs, Skip
from .timing import Timing, summary, time_reps

KEEPS = (1.0, 0.5, 0.25, 0.1)
METHOD = "cls"
# Per run level: the CLIP tower's image side (14-pixel patches: (side / 14)^2 image tokens), the
# language model (head dim 32 on CPU, a size vLLM's CPU attention supports), the batch, the new tokens.
SIZES: dict[str, dict[str, Any]] = {
    "full": dict(image_size=336, text=dict(hidden_size=512, intermediate_size=1408, num_hidden_layers=4,
                                           num_attention_heads=8, num_key_value_heads=8), B=32, new_tokens=16),
    "cpu": dict(image_size=224, text=dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                                          num_attention_heads=4, num_key_value_heads=2), B=8, new_tokens=8),
    "cpu-quick": dict(image_size=168, text=dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                                                num_attention_heads=4, num_key_value_heads=2), B=4, new_tokens=4),
    "tiny": dict(image_size=112, text=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                           num_attention_heads=2, num_key_value_heads=1), B=2, new_tokens=2),
}
PROMPT = 8  # text words (one token each) beside the image
REPS = 5  # timed samples per row on a GPU; CPU rows sample until their spread is small (timing.CPU_BUDGETS)
ENGINE: dict[str, Any] = dict(enforce_eager=True, max_model_len=1024, enable_prefix_caching=False, seed=0,
              gpu_memory_utilization=0.05, kv_cache_memory_bytes=256 << 20)
VLLM_DTYPES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}
SKIP = "vLLM is not importable here (see scripts/vllm_env.sh)"


def vllm_importable() -> bool:
    spec = importlib.util.find_spec("vllm")
    return spec is not None and spec.origin is not None  # a folder named vllm on sys.path is a namespace


_model: dict[str, Any] = {}  # the one checkpoint written: {"key": level, "dir": TemporaryDirectory}


def _checkpoint(level: str) -> str:
    """The scenario's tiny LLaVA at a level, written on first use."""
    if _model.get("key") != level:
        from vtattn.vllm import tiny
        _model.clear()
        folder = tempfile.TemporaryDirectory(prefix="vtattn-bench-llava-")
        size = SIZES[level]
        tiny.llava(folder.name, image_size=size["image_size"], **size["text"])
        _model.update(key=level, dir=folder)
    written: tempfile.TemporaryDirectory[str] = _model["dir"]
    return written.name


@contextlib.contextmanager
def _engine(level: str, dtype: torch.dtype, keep: float | None, max_num_seqs: int) -> Iterator[Any]:
    """A vLLM engine on the level's checkpoint (keep None: plain vLLM), shut down at exit. In-process,
    vLLM's CPU worker runs on the caller's torch threads (the bench's 1) and replaces
    `torch.set_num_threads` with a no-op for the whole process: put back at exit."""
    if not vllm_importable():
        raise Skip(SKIP)
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # a spawned engine core: ~35 s more to start
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")  # its warnings would break up the table
    from vllm import LLM
    from vllm.distributed.parallel_state import cleanup_dist_env_and_memory

    import vtattn.vllm
    set_threads, threads = torch.set_num_threads, torch.get_num_threads()
    path = _checkpoint(level)
    extra: dict[str, Any] = {} if keep is None else dict(hf_overrides=vtattn.vllm.overrides(keep=keep, method=METHOD))
    llm = None
    try:
        llm = LLM(model=path, dtype=VLLM_DTYPES[dtype], max_num_seqs=max_num_seqs, **ENGINE, **extra)
        yield llm
    finally:
        if llm is not None:
            llm.llm_engine.engine_core.shutdown()
            del llm
        gc.collect()
        cleanup_dist_env_and_memory()
        torch.set_num_threads = set_threads
        set_threads(threads)


def _requests(B: int, image_size: int, seeds: Iterator[int]) -> list[dict[str, Any]]:
    """B (prompt, image) requests with new random images (seeds: an iterator)."""
    from vtattn.vllm import tiny
    out: list[dict[str, Any]] = []
    for _ in range(B):
        s = next(seeds)
        out.append({"prompt": f"{tiny.text(s, PROMPT // 2)} <image> {tiny.text(s + 1, PROMPT - PROMPT // 2)}",
                    "multi_modal_data": {"image": tiny.image(s, (image_size, image_size))}})
    return out


def _serve(engine: Any, requests: list[dict[str, Any]], new_tokens: int, tag: str) -> tuple[float, float]:
    """Submit the requests at once and step the engine until all finish: (batch ms, mean TTFT ms)."""
    from vllm import SamplingParams
    params = SamplingParams(max_tokens=new_tokens, temperature=0.0, ignore_eos=True)
    first: dict[str, float] = {}
    t0 = time.perf_counter()
    for i, r in enumerate(requests):
        engine.add_request(f"{tag}-{i}", r, params)
    while engine.has_unfinished_requests():
        outputs = engine.step()
        now = time.perf_counter()
        for o in outputs:
            if o.request_id not in first and o.outputs and o.outputs[0].token_ids:
                first[o.request_id] = now
    end = time.perf_counter()
    if len(first) != len(requests):
        raise RuntimeError(f"vllm bench: {len(requests) - len(first)} of {len(requests)} requests produced no token")
    return (end - t0) * 1e3, sum(t - t0 for t in first.values()) * 1e3 / len(first)


def _impl(name: str, role: str, keep: float | None, level: str, size: dict[str, Any],
          at: dict[str, torch.dtype]) -> Impl:
    """One row: its engine opens in the row's context (at["dtype"]: the run's, from make_inputs)."""
    held: dict[str, Any] = {}  # the row's engine while its context is open
    seeds = itertools.count(1)  # new images every call; the same sequence in every row
    # ms per call: the batch's (timed) and its mean TTFT; the probe's are dropped and a re-measurement's
    # pooled with the first's, as the runner pools the baseline's timings (runner._bracket)
    kept: dict[str, list[float]] = {"batch": [], "ttft": [], "pending": []}
    last: dict[str, float] = {}

    @contextlib.contextmanager
    def ctx() -> Iterator[None]:
        with _engine(level, at["dtype"], keep, size["B"]) as llm:
            held["engine"] = llm.llm_engine
            try:
                yield
            finally:
                held.clear()

    def call(x: Inputs) -> None:
        requests = _requests(size["B"], size["image_size"], seeds)  # untimed: before the clock starts
        batch_ms, mean_ttft = _serve(held["engine"], requests, size["new_tokens"], f"s{next(seeds)}")
        last["ms"] = batch_ms
        kept["pending"].append(mean_ttft)

    def timer(fns: Sequence[Callable[[], object]], device: torch.device, quick: bool) -> Timing:
        del kept["pending"][:]  # the probe's
        t = time_reps(fns, device, REPS, quick, measured=lambda: last["ms"])
        kept["batch"] += t.samples
        kept["ttft"] += kept["pending"]
        ttft = summary(kept["ttft"])
        impl.stats.update(req_s=size["B"] / (summary(kept["batch"]).median_ms / 1e3), ttft_ms=ttft.median_ms,
                          ttft_ci_ms=[ttft.ci_low_ms, ttft.ci_high_ms])
        return t

    impl = Impl(name, call, role=role, ctx=ctx, timer=timer, stats=dict(req_s=None, ttft_ms=None, ttft_ci_ms=None))
    return impl


def cases(scenario_name: str, level: str) -> list[Case]:
    """The scenario's one case at a run level (its rows skipped where vLLM is not importable)."""
    size = SIZES[level]
    text = size["text"]
    shape = {"B": size["B"], "images": 1, "views": 1, "image_tokens": (size["image_size"] // 14) ** 2,
             "prompt": PROMPT, "new_tokens": size["new_tokens"], "llm_layers": text["num_hidden_layers"],
             "llm_width": text["hidden_size"], "heads": text["num_attention_heads"],
             "kv_heads": text["num_key_value_heads"], "tower_layers": 4, "scaled": None if level == "full" else level,
             "engine": "vllm", "method": METHOD}
    at: dict[str, torch.dtype] = {}

    def make_inputs(device: torch.device, dtype: torch.dtype, seed: int) -> Inputs:

        at["dtype"] = dtype  # the engine's dtype: the run's
        return {}

    # named after the full level's batch at every level (case names do not depend on the level, as
    # scenarios_llm's); the shape has the batch that runs
    c = Case("e2e", f"{scenario_name}:B{SIZES['full']['B']}", shape, make_inputs)
    c.impls = [_impl("plain-vllm", "baseline", None, level, size, at)]
    c.impls += [_impl(f"keep-{k}", "reference" if k == 1.0 else "vtattn", k, level, size, at) for k in KEEPS]
    return [c]
