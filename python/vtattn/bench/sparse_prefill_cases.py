"""Sparse-prefill cases on a long video prompt's attention shape (Qwen2-VL-7B's LLM: 28 query heads, 4 kv
heads, D = 128; causal; batch 1), built once, on the llava7b-prefill shape (which gives the run level):

- block_sparse_attention `qwen2vl7b-<rung>:sparsity-<s>`: rungs 8k, 16k, 32k, 64k and sparsity 50/90/95% on a
  GPU (random lists as sparse_cases.block_sparse_cases: a share of each query block's causal blocks, the
  diagonal always). Baselines: FlexAttention with the same BlockMask (built and compiled outside the
  timing) and dense SDPA; `attention-dense` (vtattn.attention, causal) as a reference ratio. On CPU one
  length (8k; --quick 4k) with 4 query heads / 1 kv head (scaled, the shape says so), no FlexAttention
  (eagerly it materialises N x N scores per head).
- sparse_policy `qwen2vl7b-<rung>:<policy>`: the policy's estimation alone (`lists`) and estimation plus the
  block-sparse attention it enables (`lists+attention`), against vtattn's dense causal attention of the
  same layer (`attention-dense`, the reference ratio: the estimation's share of dense attention is
  1 / that ratio). est_gflop in the shape is the policy's stated cost (vtattn.sparse.*_flops). The video
  layout: 64 text tokens, frames of 16 x 16 tokens, 64 text tokens. Random inputs: the lists' density
  is not a real prompt's (flat attention makes FlexPrefill list more).
"""
from typing import Any, Callable

import torch
import torch.nn.functional as F

import vtattn

from .cases import Case, Impl, Inputs, Maker, Shape, Skip, _vtattn_impls
from .scenarios import level_of
from .sparse_cases import _block_lists, _block_pairs, _flex_impl

# The rungs, named by their GPU length at every level (case names do not depend on the level): a GPU
# times all four; a CPU level times the first at its own length (scaled) and lists the rest as skipped.
RUNGS = ("8k", "16k", "32k", "64k")
LADDER: dict[str, tuple[int, ...]] = {"full": (8192, 16384, 32768, 65536), "cpu": (8192,), "cpu-quick": (4096,),
                                      "tiny": (1024,)}


def _rungs(level: str) -> list[tuple[str, int, bool]]:
    """(rung name, N, timed) per rung at this level."""
    lengths = LADDER[level]
    return [(r, lengths[i] if i < len(lengths) else lengths[0], i < len(lengths)) for i, r in enumerate(RUNGS)]


def _gpu_only(case: Case) -> Case:
    """Skip every row of a rung the level does not time."""
    def skip(x: Inputs) -> Inputs:
        raise Skip(f"{case.name.split(':')[0]}: a GPU-level length (this level times the first rung only)")
    for impl in case.impls:
        impl.prep = skip
    return case
HEADS = {"full": dict(Hq=28, Hkv=4), "cpu": dict(Hq=4, Hkv=1)}
SPARSITIES = (0.5, 0.9, 0.95)
BLOCK = 128
FRAME, TEXT = 16, 64  # tokens per frame side, text tokens before and after the frames


def video_grids(N: int) -> list[tuple[int, int, int]]:
    """(start, height, width) of each frame of the video layout over N tokens."""
    frames = max(0, (N - 2 * TEXT) // (FRAME * FRAME))
    return [(TEXT + f * FRAME * FRAME, FRAME, FRAME) for f in range(frames)]


def policies(N: int, heads: int) -> dict[str, vtattn.sparse.SparsePrefill]:
    """The policies timed: FlexPrefill, MoA (a synthetic profile: a third of the heads each at beta 0.05,
    0.1, 0.2), HiP, region routing over the frames."""
    betas = [[(0.05, 0.1, 0.2)[h % 3] for h in range(heads)]]
    return {"flexprefill": vtattn.sparse.FlexPrefill(0.9, 0.1, min_tokens=0),
            "moa": vtattn.sparse.MoA({"alphas": [[0.0] * heads], "betas": betas}, block_size=BLOCK, min_tokens=0),
            "hip": vtattn.sparse.HiP(8, min_tokens=0),
            "region_routing": vtattn.sparse.RegionRouting(8, region_shape=(4, 4), min_tokens=0)}


def _shape(level: str, N: int) -> Shape:
    s: Shape = dict(B=1, N=N, D=128, causal=True, **HEADS["full" if level == "full" else "cpu"])
    if level != "full":
        s["scaled"] = level
    return s


def _qkv(s: Shape) -> Maker:
    def make(device: torch.device, dtype: torch.dtype, seed: int) -> Inputs:
        g = torch.Generator(device=device).manual_seed(seed)
        def r(h: int) -> torch.Tensor:
            return torch.randn(s["B"], h, s["N"], s["D"], device=device, dtype=dtype, generator=g)
        return {"q": r(s["Hq"]), "k": r(s["Hkv"]), "v": r(s["Hkv"])}
    return make


def _dense_ref(s: Shape) -> Impl:
    return Impl("attention-dense", lambda x: vtattn.attention(x["q"], x["k"], x["v"], causal=True), role="reference",
                ctx=lambda: vtattn.use_backend(None), note="vtattn dense causal")


def kernel_cases(name: str, s0: Shape, backends: list[str]) -> list[Case]:
    if name != "llava7b-prefill":
        return []
    level = level_of(name, s0)
    cases = []
    for rung, N, timed in _rungs(level):
        s = _shape(level, N)
        for sparsity in SPARSITIES:
            blocks = _block_lists(s, BLOCK, sparsity)
            num, idx = vtattn.sparse.from_dense_blocks(blocks)

            def make(device: torch.device, dtype: torch.dtype, seed: int, num: torch.Tensor = num,
                     idx: torch.Tensor = idx, s: Shape = s) -> Inputs:
                return {**_qkv(s)(device, dtype, seed), "num": num.to(device), "idx": idx.to(device)}

            c = Case("block_sparse_attention", f"qwen2vl7b-{rung}:sparsity-{sparsity}",
                     {**s, "sparsity": sparsity, "block_size": BLOCK}, make,
                     flops=4 * s["D"] * _block_pairs(s, BLOCK, blocks))
            c.impls = _vtattn_impls(backends, lambda x: vtattn.block_sparse_attention(
                x["q"], x["k"], x["v"], x["num"], x["idx"], block_size=BLOCK, causal=True))
            flex = _flex_impl(s, BLOCK)
            if level != "full":
                def no_flex(x: Inputs) -> Inputs:
                    raise Skip("FlexAttention runs eagerly on CPU: N x N scores per head at this length")
                flex.prep = no_flex
            c.impls.append(flex)
            dense = lambda x, s=s: F.scaled_dot_product_attention(
                x["q"], x["k"], x["v"], is_causal=True, scale=s["D"] ** -0.5, enable_gqa=s["Hq"] != s["Hkv"])
            c.impls.append(Impl("sdpa-dense", dense, role="baseline", note="every key"))
            c.impls.append(_dense_ref(s))
            cases.append(c if timed else _gpu_only(c))
    return cases


def policy_cases(name: str, s0: Shape, backends: list[str]) -> list[Case]:
    if name != "llava7b-prefill":
        return []
    level = level_of(name, s0)
    cases = []
    for rung, N, timed in _rungs(level):
        s = _shape(level, N)
        grids = video_grids(N)
        for label, policy in policies(N, s["Hq"]).items():
            scale = s["D"] ** -0.5
            lists = lambda x, p=policy, g=grids: p.blocks(x["q"], x["k"], layer=0, scale=scale, regions=g)

            def sparse_attention(x: Inputs, lists: Callable[[Inputs], tuple[torch.Tensor, torch.Tensor]] = lists,
                                 p: vtattn.sparse.SparsePrefill = policy) -> torch.Tensor:
                num, idx = lists(x)
                return vtattn.block_sparse_attention(x["q"], x["k"], x["v"], num, idx, block_size=p.block_size,
                                                     causal=True)

            regions: dict[str, int] = {"regions": len(grids) * (FRAME // 4) ** 2} if label == "region_routing" else {}
            est = policy.flops(s["B"], s["Hq"], s["Hkv"], N, s["D"], **regions)
            shape = {**s, "policy": repr(policy), "frames": len(grids), "est_gflop": round(est / 1e9, 3),
                     "dense_gflop": round(2 * s["B"] * s["Hq"] * s["D"] * N * (N + 1) / 1e9, 3)}
            c = Case("sparse_policy", f"qwen2vl7b-{rung}:{label}", shape, _qkv(s))
            c.impls = [Impl("lists", lists, ctx=lambda: vtattn.use_backend(None)),
                       Impl("lists+attention", sparse_attention, ctx=lambda: vtattn.use_backend(None)),
                       _dense_ref(s)]
            cases.append(c if timed else _gpu_only(c))
    return cases




# ---- e2e: a long-video prompt through vtattn.patch.qwen2_vl(sparse_prefill=...) ----------------------

VIDEO_FRAMES = 64  # 32 temporal patches (temporal_patch_size 2)


def _video_inputs(config: Any, grid: int, prompt: int) -> Maker:
    """<s>, <vision_start> <video> * (frames / 2 * grid^2 / 4) <vision_end>, the prompt's text; one sample."""
    from .scenarios_qwen import VISION
    t = VIDEO_FRAMES // VISION["temporal_patch_size"]

    def make(device: torch.device, dtype: torch.dtype, seed: int) -> Inputs:
        g = torch.Generator(device=device).manual_seed(seed)
        video, start, end = config.video_token_id, config.vision_start_token_id, config.vision_end_token_id
        text = torch.randint(1, end, (1, prompt), device=device, generator=g)
        span = torch.tensor([[start] + [video] * (t * grid * grid // 4) + [end]], device=device)
        ids = torch.cat([text[:, :1], span, text[:, 1:]], 1)
        patch = 3 * VISION["temporal_patch_size"] * VISION["patch_size"] ** 2
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids),
                "pixel_values_videos": torch.randn(t * grid * grid, patch, device=device, dtype=dtype, generator=g),
                "video_grid_thw": torch.tensor([[t, grid, grid]], device=device),
                "mm_token_type_ids": 2 * (ids == video).int()}
    return make


def video_policies(level: str, heads: int, layers: int) -> dict[str, vtattn.sparse.SparsePrefill]:
    """The e2e rows' policies: the defaults at full size; on CPU (a prompt of ~800 tokens) blocks of 64
    and no minimum length, so that the prompt has blocks to skip."""
    bs, short = (128, 1024) if level == "full" else (64, 0)
    betas = [[(0.05, 0.1, 0.2)[h % 3] for h in range(heads)]] * layers
    return {"flexprefill": vtattn.sparse.FlexPrefill(0.9, 0.1, block_size=bs, min_tokens=short),
            "moa": vtattn.sparse.MoA({"alphas": [[0.0] * heads] * layers, "betas": betas}, block_size=bs, sink=bs,
                                     min_span=2 * bs, min_tokens=short),
            "hip": vtattn.sparse.HiP(8 if level == "full" else 2, block_size=bs, min_tokens=short),
            "region_routing": vtattn.sparse.RegionRouting(8 if level == "full" else 2, block_size=bs,
                                                          min_tokens=short)}


def video_cases(name: str, s0: Shape, backends: list[str]) -> list[Case]:
    """`sparse_prefill_e2e` `qwen2vl7b-video64-ttft:B1`: time to first token of Qwen2-VL-7B (random weights,
    scaled on CPU as the e2e scenarios) on 64 video frames at 448 x 448 (8192 video tokens at full size)
    plus 200 text tokens: the unpatched model (SDPA) against patch.qwen2_vl(sparse_prefill=policy) per
    policy; each row's `density` is the share of causal blocks its lists kept, averaged over layers."""
    from . import scenarios_qwen
    from .scenarios import SCALE, attn_impl, build_model, patched, shared_model, single_thread, transformers_or_none
    from .scenarios_llm import CPU_LLM_LAYERS, LEVEL_SCALE, _prefill
    transformers = transformers_or_none()
    if name != "llava7b-prefill" or transformers is None:
        return []
    level = level_of(name, s0)
    config, _ = scenarios_qwen.config(transformers, LEVEL_SCALE[level], None if level == "full" else CPU_LLM_LAYERS)
    grid = scenarios_qwen.grid(LEVEL_SCALE[level])
    prompt = max(1, 200 // SCALE[LEVEL_SCALE[level]]["side"] ** 2)
    text = config.text_config
    at: dict[str, tuple[torch.device, torch.dtype]] = {}
    key = ("e2e", "qwen2vl", level)  # the e2e scenarios' Qwen2-VL: built once
    def model() -> Any:
        return shared_model(key, lambda d, t: build_model(transformers.Qwen2VLForConditionalGeneration, config, d, t),
                            *at["dt"])
    make = _video_inputs(config, grid, prompt)

    def inputs(device: torch.device, dtype: torch.dtype, seed: int) -> Inputs:
        at["dt"] = device, dtype
        return make(device, dtype, seed)

    shape = {"B": 1, "frames": VIDEO_FRAMES, "image_tokens": VIDEO_FRAMES // 2 * grid * grid // 4 + 2,
             "prompt": prompt, "llm_layers": text.num_hidden_layers, "llm_width": text.hidden_size,
             "heads": text.num_attention_heads, "kv_heads": text.num_key_value_heads,
             "scaled": None if level == "full" else LEVEL_SCALE[level], "cpu_threads": None if level == "full" else 1}
    c = Case("sparse_prefill_e2e", "qwen2vl7b-video64-ttft:B1", shape, inputs)
    base = Impl("unpatched-sdpa", None, role="baseline",  # type: ignore[arg-type]  # _prefill sets call
                ctx=lambda: single_thread(model(), lambda: attn_impl(model(), "sdpa")), stats=dict(kv_bytes=None))
    _prefill(base, model)
    c.impls = [base]
    for label, policy in video_policies(level, text.num_attention_heads, text.num_hidden_layers).items():
        ctx = lambda p=policy: single_thread(model(), lambda: patched(vtattn.patch.qwen2_vl, model(), sparse_prefill=p))
        impl = Impl(f"sparse-{label}", None, role="vtattn",  # type: ignore[arg-type]  # _prefill sets call
                    stats=dict(kv_bytes=None, density=None), ctx=ctx)
        _prefill(impl, model)
        call = impl.call

        def with_density(x: Inputs, call: Callable[[Inputs], Any] = call, impl: Impl = impl) -> None:
            call(x)
            stage = model()._vtattn_patch.stages[-1]
            if stage.density:
                impl.stats["density"] = round(sum(stage.density.values()) / len(stage.density), 3)
        impl.call = with_density
        c.impls.append(impl)
    return [c]
