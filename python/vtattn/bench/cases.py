"""Benchmark cases: one `Case` per (op, shape, variant), each with the vtattn implementations
and the baselines a user would otherwise pick. A new op adds a `_<op>_cases` builder to BUILDERS.

Work counted once per op (documented here, used for TFLOP/s and GB/s):
- attention: 4 * B * Hq * D * (visible (i, j) pairs): QK^T and PV, 2 FLOPs per multiply-add.
- key_importance, one row: bytes = K read once + the q rows + fp32 scores written.
- key_importance, rows="all": 4 * B * Hq * D * pairs (an LSE pass over QK^T, then a column pass).
"""
import math
from contextlib import nullcontext
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F

import vtattn

from .timing import Timing, l2_bytes

Shape = dict[str, Any]  # a case's shape: B, Hq, Hkv, N, D, causal, ... (and what a variant adds)
Inputs = dict[str, Any]  # one copy of a case's inputs
Maker = Callable[[torch.device, torch.dtype, int], Inputs]  # (device, dtype, seed) -> inputs
Timer = Callable[[Sequence[Callable[[], object]], torch.device, bool], Timing]  # (fns, device, quick) -> timing
SHAPES = {
    "clip-l336": dict(B=32, Hq=16, Hkv=16, N=577, D=64, causal=False),
    "siglip-so400m": dict(B=32, Hq=16, Hkv=16, N=729, D=72, causal=False),
    "qwen2vl": dict(B=8, Hq=16, Hkv=16, N=1024, D=80, causal=False),  # its ViT on 448 x 448 images: 32 x 32 patches
    "llava7b-prefill": dict(B=1, Hq=32, Hkv=8, N=4096, D=128, causal=True),
    # One decode step against a compact cache of capacity N whose lengths vary per (batch, kv head).
    "llava7b-decode": dict(B=32, Hq=32, Hkv=8, N=16384, D=128, causal=False, decode=True),
}
# the ops of decode shapes, and only of those
DECODE_OPS = ("decode_attention", "paged_decode_attention", "paged_append", "paged_decode_step", "paged_evict",
              "paged_evict_step", "cmai_step")
CUSTOM = "custom:"
# Shape scaling per run level: CPU runs (and the CI smoke test) cannot afford the real shapes.
LEVELS: dict[str, dict[str, Any]] = {
    "full": dict(B=None, n_div=1, hq=None),
    "cpu": dict(B=2, n_div=4, hq=None),
    "cpu-quick": dict(B=1, n_div=8, hq=None),
    "tiny": dict(B=1, n_div=32, hq=4),
}
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
SDPA_BACKENDS = {"flash": "FLASH_ATTENTION", "efficient": "EFFICIENT_ATTENTION",
                 "cudnn": "CUDNN_ATTENTION", "math": "MATH"}


@dataclass
class Impl:
    name: str
    call: Callable[[Inputs], Any]  # inputs -> output; timed
    role: str = "vtattn"  # "vtattn" | "baseline" (counts for `speedup`) | "reference" (ratio only)
    ctx: Callable[[], Any] = nullcontext  # entered around probing and timing
    prep: Callable[[Inputs], Inputs] | None = None  # per input copy, outside the timing
    note: str = ""
    stats: dict[str, Any] = field(default_factory=dict)  # extra row fields the impl measures itself (peak memory)
    timer: Timer | None = None  # in place of timing.time_fns
    # one call's measured ms (model-level rows): on CPU the runner then takes the speedup from calls that
    # alternate with the baseline's (runner._paired)
    sample: Callable[[Inputs], float] | None = None


class Skip(Exception):
    """Raised by an impl (its ctx or call) that cannot run in this build: the row keeps the reason
    in `skipped` and pytest-benchmark skips it."""


@dataclass
class Case:
    op: str
    name: str
    shape: Shape
    make_inputs: Maker
    impls: list[Impl] = field(default_factory=list)
    flops: float | None = None
    bytes_fn: Callable[[int], int] | None = None  # element size -> bytes moved (bandwidth-bound ops)


Builder = Callable[[str, Shape, list[str]], list[Case]]  # (shape name, shape, backends) -> cases


def shape_of(name: str) -> Shape:
    """A shape by name: one of SHAPES, or "custom:B=2,Hq=16,Hkv=8,N=1000,D=64,causal=1" (N and D
    required; B=1, Hq=16, Hkv=Hq, causal=0 by default; decode=1 for a decode step against a cache
    of capacity N). Custom shapes run as given, on every device."""
    if name in SHAPES:
        return SHAPES[name]
    if not name.startswith(CUSTOM):
        raise ValueError(f"unknown shape {name!r}: one of {', '.join(SHAPES)} or {CUSTOM}KEY=VALUE,...")
    s: Shape = dict(B=1, Hq=16, causal=0, decode=0)
    for item in filter(None, name[len(CUSTOM):].split(",")):
        key, _, value = item.partition("=")
        if key not in ("B", "Hq", "Hkv", "N", "D", "causal", "decode") or not value.isdigit():
            raise ValueError(f"{name}: {item!r} is not KEY=INT with KEY one of B, Hq, Hkv, N, D, causal, decode")
        s[key] = int(value)
    s.setdefault("Hkv", s["Hq"])
    if "N" not in s or "D" not in s:
        raise ValueError(f"{name}: N and D are required")
    if min(s["B"], s["Hq"], s["Hkv"], s["N"], s["D"]) < 1 or s["Hq"] % s["Hkv"]:
        raise ValueError(f"{name}: B, Hq, Hkv, N, D must be >= 1 and Hq a multiple of Hkv")
    s["causal"], s["decode"] = bool(s["causal"]), bool(s["decode"])
    return s


def scaled_shape(shape: Shape, level: str) -> Shape:
    lv = LEVELS[level]
    s = dict(shape)
    if lv["B"] is not None:
        s["B"] = min(s["B"], lv["B"])
    if lv["hq"] is not None:  # keep the GQA group size
        g = s["Hq"] // s["Hkv"]
        s["Hkv"] = max(1, lv["hq"] // g)
        s["Hq"] = s["Hkv"] * g
    s["N"] = max(8, s["N"] // lv["n_div"])
    return s


def visible_pairs(nq: int, nk: int, causal: bool, window: int = -1) -> int:
    """Exact count of (i, j) with key j visible to row i (causal and a left window aligned to the end)."""
    if not causal and window < 0:
        return nq * nk
    off = nk - nq  # row i sees keys [i + off - window, i + off] (causal / window), clipped to [0, nk)
    return sum(max(0, (min(nk, i + off + 1) if causal else nk) - (max(0, i + off - window) if window >= 0 else 0))
               for i in range(nq))


def _qkv_maker(s: Shape, with_v: bool = True) -> Maker:
    def make(device: torch.device, dtype: torch.dtype, seed: int) -> Inputs:
        g = torch.Generator(device=device).manual_seed(seed)
        def r(h: int) -> torch.Tensor:
            return torch.randn(s["B"], h, s["N"], s["D"], device=device, dtype=dtype, generator=g)
        x = {"q": r(s["Hq"]), "k": r(s["Hkv"])}
        if with_v:
            x["v"] = r(s["Hkv"])
        return x
    return make


def _vtattn_impls(backends: list[str], call: Callable[[Inputs], Any]) -> list[Impl]:
    return [Impl(b, call, ctx=partial(vtattn.use_backend, None if b == "auto" else b)) for b in backends]


def _sdpa_impl(tag: str, s: Shape) -> Impl:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backend = getattr(SDPBackend, SDPA_BACKENDS[tag])
    scale, causal = s["D"] ** -0.5, s["causal"]
    gqa: dict[str, bool] = {}  # decided once, on the first input copy

    def prep(x: Inputs) -> Inputs:
        if s["Hq"] == s["Hkv"]:
            return x
        if "enable" not in gqa:
            try:
                F.scaled_dot_product_attention(x["q"], x["k"], x["v"], is_causal=causal, scale=scale,
                                               enable_gqa=True)
                gqa["enable"] = True
            except RuntimeError:  # this SDPA backend has no GQA: repeat kv heads, untimed
                gqa["enable"] = False
                impl.note = "kv heads repeated outside the timing"
        if gqa["enable"]:
            return {**x, "gqa": True}
        g = s["Hq"] // s["Hkv"]
        return {**x, "k": x["k"].repeat_interleave(g, 1), "v": x["v"].repeat_interleave(g, 1)}

    impl = Impl(f"sdpa-{tag}", lambda x: F.scaled_dot_product_attention(
        x["q"], x["k"], x["v"], is_causal=causal, scale=scale, enable_gqa=x.get("gqa", False)),
        role="baseline", ctx=lambda: sdpa_kernel(backend), prep=prep)
    return impl


def _attention_cases(name: str, s: Shape, backends: list[str]) -> list[Case]:
    causal = s["causal"]
    c = Case("attention", name, s, _qkv_maker(s),
             flops=4 * s["B"] * s["Hq"] * s["D"] * visible_pairs(s["N"], s["N"], causal))
    c.impls = _vtattn_impls(backends, lambda x: vtattn.attention(x["q"], x["k"], x["v"], causal=causal))
    c.impls += [_sdpa_impl(tag, s) for tag in SDPA_BACKENDS]
    return [c] + (_attention_option_cases(name, s, backends) if causal else [])


# Decoder layers with attention options, on the causal shapes: Gemma2-like (logit softcap 50, a sliding
# window of half the prompt) and GPT-OSS-like (a 128-token sliding window and a learned sink per head).
# SDPA has none of these: the baseline is transformers' eager attention, what those models run.
ATTENTION_OPTIONS: dict[str, Callable[[int], dict[str, Any]]] = {
    "gemma2": lambda n: dict(softcap=50.0, window=n // 2 - 1, sinks=False),
    "gpt-oss": lambda n: dict(softcap=None, window=127, sinks=True)}


def _attention_option_cases(name: str, s: Shape, backends: list[str]) -> list[Case]:
    cases = []
    for label, make_opts in ATTENTION_OPTIONS.items():
        opts = make_opts(s["N"])
        window = opts["window"] if opts["window"] < s["N"] - 1 else -1

        def make(device: torch.device, dtype: torch.dtype, seed: int, opts: dict[str, Any] = opts) -> Inputs:
            x = _qkv_maker(s)(device, dtype, seed)
            if opts["sinks"]:
                g = torch.Generator(device=device).manual_seed(seed + 1)
                x["sinks"] = torch.randn(s["Hq"], device=device, generator=g)
            return x

        c = Case("attention", f"{name}:{label}", {**s, **opts}, make,
                 flops=4 * s["B"] * s["Hq"] * s["D"] * visible_pairs(s["N"], s["N"], True, window))
        call = lambda x, opts=opts: vtattn.attention(x["q"], x["k"], x["v"], causal=True, softcap=opts["softcap"],
                                                     window=opts["window"], sinks=x.get("sinks"))
        c.impls = _vtattn_impls(backends, call)
        eager = lambda x, opts=opts: _eager_attention(x, s, opts["softcap"])
        mask = lambda x, w=window: _add_window_mask(x, s, w)
        c.impls.append(Impl("eager", eager, role="baseline", prep=mask))
        cases.append(c)
    return cases


def _add_window_mask(x: Inputs, s: Shape, window: int) -> Inputs:
    """The additive causal (and left-window) mask transformers' eager attention gets."""
    i = torch.arange(s["N"], device=x["q"].device)
    hidden = (i[None, :] > i[:, None]) | ((i[None, :] < i[:, None] - window) if window >= 0 else False)
    mask = torch.zeros(hidden.shape, device=x["q"].device, dtype=x["q"].dtype).masked_fill(hidden, float("-inf"))
    return {**x, "mask": mask[None, None]}


def _eager_attention(x: Inputs, s: Shape, softcap: float | None) -> torch.Tensor:
    """transformers' eager attention with Gemma2's softcap and GPT-OSS's sinks (a sink column joins the fp32
    softmax, then is dropped): logits in the input dtype, kv heads repeated."""
    g = s["Hq"] // s["Hkv"]
    k, v = x["k"].repeat_interleave(g, 1), x["v"].repeat_interleave(g, 1)
    logits = torch.matmul(x["q"], k.transpose(-1, -2)) * s["D"] ** -0.5
    if softcap:
        logits = torch.tanh(logits / softcap) * softcap
    logits = logits + x["mask"]
    if "sinks" in x:
        sink = x["sinks"].to(logits.dtype)[None, :, None, None].expand(*logits.shape[:-1], 1)
        probs = torch.softmax(torch.cat([logits, sink], -1), dim=-1, dtype=torch.float32)[..., :-1]
    else:
        probs = torch.softmax(logits, dim=-1, dtype=torch.float32)
    return torch.matmul(probs.to(v.dtype), v)


def _eager_probs(x: Inputs, s: Shape) -> torch.Tensor:
    """What `output_attentions=True` does in transformers' eager attention: repeat kv heads,
    logits in the input dtype plus an additive mask, softmax in fp32 cast back to the input dtype."""
    k = x["k"].repeat_interleave(s["Hq"] // s["Hkv"], 1) if s["Hq"] != s["Hkv"] else x["k"]
    logits = torch.matmul(x["q"], k.transpose(-1, -2)) * s["D"] ** -0.5
    if "mask" in x:
        logits = logits + x["mask"]
    return torch.softmax(logits, dim=-1, dtype=torch.float32).to(x["q"].dtype)


def _add_causal_mask(x: Inputs, s: Shape) -> Inputs:
    n = s["N"]
    mask = torch.full((n, n), float("-inf"), device=x["q"].device, dtype=x["q"].dtype).triu(1)
    return {**x, "mask": mask[None, None]}


def _key_importance_cases(name: str, s: Shape, backends: list[str]) -> list[Case]:
    causal, B, Hq, Hkv, N, D = s["causal"], s["B"], s["Hq"], s["Hkv"], s["N"], s["D"]
    row = N - 1 if causal else 0  # causal (LLM): the last prompt token (FastV); else [CLS]
    prep: Callable[[Inputs], Inputs] | None = (lambda x: _add_causal_mask(x, s)) if causal else None
    cases = []
    rows: int | str
    for rows in (row, "all"):
        label = "all" if rows == "all" else ("last" if causal else "0")
        c = Case("key_importance", f"{name}:rows-{label}", {**s, "rows": label}, _qkv_maker(s, with_v=rows == "all"))
        call = lambda x, rows=rows: vtattn.key_importance(x["q"], x["k"], rows=rows, causal=causal)
        c.impls = _vtattn_impls(backends, call)
        if rows == "all":
            c.flops = 4 * B * Hq * D * visible_pairs(N, N, causal)
            eager = lambda x: _eager_probs(x, s).sum(dim=2, dtype=torch.float32)
            c.impls.append(Impl("eager-probs", eager, role="baseline", prep=prep))
            # The target: no slower than one attention forward at the same shape.
            c.impls.append(Impl("attention-fwd", lambda x: vtattn.attention(x["q"], x["k"], x["v"], causal=causal),
                                role="reference", ctx=lambda: vtattn.use_backend(None)))
        else:
            c.bytes_fn = lambda elt: B * Hkv * N * D * elt + B * Hq * D * elt + B * Hq * N * 4
            row_probs = lambda x, r=rows: _eager_probs(x, s)[:, :, r, :].float()
            c.impls.append(Impl("eager-probs", row_probs, role="baseline", prep=prep))
        cases.append(c)
    return cases


def _group_attention_cases(name: str, s: Shape, backends: list[str]) -> list[Case]:
    """VAR's fused pass on the LLM prefill shapes: 4 key groups (a third of the keys image tokens, a few
    sinks). Baselines: the release's path (eager probabilities, then P @ V) and plain attention (the target:
    close to one attention forward)."""
    if not s["causal"]:
        return []
    B, N = s["B"], s["N"]

    def make(device: torch.device, dtype: torch.dtype, seed: int) -> Inputs:
        x = _qkv_maker(s)(device, dtype, seed)
        groups = torch.full((B, N), 3, dtype=torch.long, device=device)
        groups[:, N // 8:N // 8 + N // 3] = 1
        groups[:, N // 8:N // 8 + N // 3:37] = 0
        groups[:, 0] = 2
        return {**x, "groups": groups}

    c = Case("group_attention", f"{name}:groups-4", {**s, "groups": 4}, make,
             flops=4 * B * s["Hq"] * s["D"] * visible_pairs(N, N, True))
    c.impls = _vtattn_impls(backends, lambda x: vtattn.group_attention(x["q"], x["k"], x["v"], x["groups"],
                                                                       num_groups=4, causal=True))
    g = s["Hq"] // s["Hkv"]
    c.impls.append(Impl("eager-probs", lambda x: torch.matmul(_eager_probs(x, s), x["v"].repeat_interleave(g, 1)),
                        role="baseline", prep=lambda x: _add_causal_mask(x, s)))
    c.impls.append(Impl("attention-fwd", lambda x: vtattn.attention(x["q"], x["k"], x["v"], causal=True),
                        role="reference", ctx=lambda: vtattn.use_backend(None)))
    return [c]


# decode_attention: a LLaVA-7B-GQA-shaped decode step (32 query / 8 kv heads, D = 128) at batch 32
# over a 16k-slot cache whose per-(batch, kv head) lengths vary 1k..16k (a compressed cache), scaled
# with the level's sequence divisor. GB/s counts the kept K/V bytes read (+ q and out).
def _decode_lengths(B: int, Hkv: int, cap: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)  # fixed: the byte count must not depend on the input copy
    return torch.randint(cap // 16, cap + 1, (B, Hkv), generator=g, dtype=torch.int32)


def _decode_dims(s: Shape) -> tuple[int, int, int, int, int, torch.Tensor]:
    """(B, Hq, Hkv, D, L_cap, lengths) of a decode shape."""
    B, Hq, Hkv, D, cap = s["B"], s["Hq"], s["Hkv"], s["D"], max(64, s["N"])
    return B, Hq, Hkv, D, cap, _decode_lengths(B, Hkv, cap)


def _decode_attention_cases(name: str, s: Shape, backends: list[str]) -> list[Case]:
    B, Hq, Hkv, D, cap, lengths = _decode_dims(s)
    kept = int(lengths.sum())

    def make(device: torch.device, dtype: torch.dtype, seed: int) -> Inputs:
        g = torch.Generator(device=device).manual_seed(seed)
        def r(h: int, n: int) -> torch.Tensor:
            return torch.randn(B, h, n, D, device=device, dtype=dtype, generator=g)
        return {"q": r(Hq, 1), "k": r(Hkv, cap), "v": r(Hkv, cap), "lengths": lengths.to(device)}

    def gather_prep(x: Inputs) -> Inputs:  # untimed: the padded length and mask need the lengths on the host
        n = int(x["lengths"].max())
        mask = torch.arange(n, device=x["k"].device) < x["lengths"].repeat_interleave(Hq // Hkv, 1)[..., None]
        return {**x, "idx": torch.arange(n, device=x["k"].device), "mask": mask[:, :, None, :]}

    def gather_sdpa(x: Inputs) -> torch.Tensor:  # a compact cache gathered into a padded dense one, then masked SDPA
        k, v = x["k"].index_select(2, x["idx"]), x["v"].index_select(2, x["idx"])
        return F.scaled_dot_product_attention(x["q"], k, v, attn_mask=x["mask"], enable_gqa=True)

    shape = {"B": B, "Hq": Hq, "Hkv": Hkv, "L_cap": cap, "D": D, "kept": round(kept / (B * Hkv * cap), 3)}
    c = Case("decode_attention", name, shape, make,
             bytes_fn=lambda elt: 2 * kept * D * elt + 2 * B * Hq * D * elt)
    c.impls = _vtattn_impls(backends, lambda x: vtattn.decode_attention(x["q"], x["k"], x["v"], x["lengths"]))
    # gather-sdpa first: max err is taken against the first baseline, and it has the same semantics.
    c.impls.append(Impl("gather-sdpa", gather_sdpa, role="baseline", prep=gather_prep))
    c.impls.append(Impl("sdpa-full-cache", lambda x: F.scaled_dot_product_attention(
        x["q"], x["k"], x["v"], enable_gqa=True), role="baseline", note="reads all L_cap slots"))
    return [c]


# paged_decode_attention: the same decode step over a paged cache (the compressed cache's layout):
# each head's used pages scattered over one pool in random order. Against decode_attention over the
# same data in a dense cache (the cost of paging) and gathering the pages for a masked SDPA (what a
# user would do without the op). GB/s counts the same bytes as the dense case.
DECODE_PAGE_SIZE = 64


def _paged_decode_attention_cases(name: str, s: Shape, backends: list[str]) -> list[Case]:
    B, Hq, Hkv, D, cap, lengths = _decode_dims(s)
    page, max_pages = DECODE_PAGE_SIZE, -(-cap // DECODE_PAGE_SIZE)
    used = torch.arange(max_pages) * page < lengths[..., None]  # [B, Hkv, max_pages]
    kept, n_pages = int(lengths.sum()), int(used.sum())

    def make(device: torch.device, dtype: torch.dtype, seed: int) -> Inputs:
        g = torch.Generator(device=device).manual_seed(seed)
        k_pages, v_pages = (torch.randn(n_pages, page, D, device=device, dtype=dtype, generator=g) for _ in range(2))
        table = torch.full((B, Hkv, max_pages), -1, dtype=torch.int32)
        table[used] = torch.randperm(n_pages, generator=torch.Generator().manual_seed(seed)).to(torch.int32)
        table = table.to(device)
        def dense(pool: torch.Tensor) -> torch.Tensor:
            return pool[table.clamp(min=0)].flatten(2, 3)[:, :, :cap].contiguous()
        return {"q": torch.randn(B, Hq, 1, D, device=device, dtype=dtype, generator=g), "k_pages": k_pages,
                "v_pages": v_pages, "table": table, "lengths": lengths.to(device), "k": dense(k_pages),
                "v": dense(v_pages)}

    def gather_prep(x: Inputs) -> Inputs:  # untimed: the page count and mask need the lengths on the host
        n = int(x["lengths"].max())
        ids = x["table"][..., :-(-n // page)].clamp(min=0).long()
        mask = torch.arange(n, device=ids.device) < x["lengths"].repeat_interleave(Hq // Hkv, 1)[..., None]
        return {**x, "ids": ids, "n": n, "mask": mask[:, :, None, :]}

    def gather_sdpa(x: Inputs) -> torch.Tensor:  # the used pages gathered into a padded dense cache, then masked SDPA
        k, v = (x[p][x["ids"]].flatten(2, 3)[:, :, :x["n"]] for p in ("k_pages", "v_pages"))
        return F.scaled_dot_product_attention(x["q"], k, v, attn_mask=x["mask"], enable_gqa=True)

    shape = {"B": B, "Hq": Hq, "Hkv": Hkv, "L_cap": cap, "D": D, "page_size": page,
             "kept": round(kept / (B * Hkv * cap), 3)}
    c = Case("paged_decode_attention", f"{name}:paged", shape, make,
             bytes_fn=lambda elt: 2 * kept * D * elt + 2 * B * Hq * D * elt)
    c.impls = _vtattn_impls(backends, lambda x: vtattn.decode_attention(
        x["q"], x["k_pages"], x["v_pages"], x["lengths"], block_table=x["table"]))
    c.impls.append(Impl("gather-sdpa", gather_sdpa, role="baseline", prep=gather_prep))
    c.impls.append(Impl("dense-decode", lambda x: vtattn.decode_attention(x["q"], x["k"], x["v"], x["lengths"]),
                        role="reference", ctx=lambda: vtattn.use_backend(None), note="the same data, dense cache"))
    return [c]


def _paged_append_cases(name: str, s: Shape, backends: list[str]) -> list[Case]:
    """A decode step's write into a compressed cache's pages (`kv.pages.Pages.append`, a static layout:
    one token per (batch, kv head), each write clamped at its head's last slot, so repeated calls stay
    in place). Baseline: what a DynamicCache does with the token (torch.cat of k and v)."""
    B, _, H, D, cap, _ = _decode_dims(s)
    page = DECODE_PAGE_SIZE
    per_head = -(-cap // page) * page

    def make(device: torch.device, dtype: torch.dtype, seed: int) -> Inputs:
        g = torch.Generator(device=device).manual_seed(seed)
        start = torch.arange(B * H, device=device).view(B, H) * per_head
        pages = B * H * per_head // page
        return {"k_pages": torch.zeros(pages, page, D, device=device, dtype=dtype),
                "v_pages": torch.zeros(pages, page, D, device=device, dtype=dtype),
                "pos": torch.full((pages, page), -1, device=device), "next": start + cap // 2,
                "lengths": torch.full((B, H), cap // 2, dtype=torch.int32, device=device),
                "last": start + per_head - 1, "start": torch.tensor(cap // 2, device=device),
                "k": torch.randn(B, H, 1, D, device=device, dtype=dtype, generator=g),
                "v": torch.randn(B, H, 1, D, device=device, dtype=dtype, generator=g),
                "k_cache": torch.randn(B, H, cap // 2, D, device=device, dtype=dtype, generator=g)}

    c = Case("paged_append", f"{name}:append-1", {"B": B, "Hkv": H, "D": D, "page_size": page}, make,
             bytes_fn=lambda elt: 2 * B * H * D * elt * 2)
    c.impls = _vtattn_impls(backends, lambda x: torch.ops.vtattn.paged_append(
        x["k_pages"], x["v_pages"], x["pos"], x["next"], x["lengths"], x["k"], x["v"], x["start"], x["last"], None))
    c.impls.append(Impl("dynamic-cache-cat", lambda x: (torch.cat([x["k_cache"], x["k"]], 2),
                                                        torch.cat([x["k_cache"], x["v"]], 2)), role="baseline",
                        note="copies the whole cache"))
    return [c]


def _paged_decode_step_cases(name: str, s: Shape, backends: list[str]) -> list[Case]:
    """A compressed layer's decode step (`kv.cache.CompressedLayer.attend`): the token's write, then the
    paged read of every head's tokens, in one op call. Baselines: the two ops called in turn (what a
    step ran before), and a DynamicCache's step (torch.cat of the token to k and v, then SDPA). Every
    row first puts the heads' lengths back (one fill: repeated calls write the same, last slot)."""
    B, Hq, H, D, cap, _ = _decode_dims(s)
    page = DECODE_PAGE_SIZE
    per_head, n = -(-cap // page) * page, cap // 2

    def make(device: torch.device, dtype: torch.dtype, seed: int) -> Inputs:
        g = torch.Generator(device=device).manual_seed(seed)
        start = torch.arange(B * H, device=device).view(B, H) * per_head
        pages = B * H * per_head // page
        def r(*shape: int) -> torch.Tensor:
            return torch.randn(*shape, device=device, dtype=dtype, generator=g)

        table = (start // page)[..., None] + torch.arange(per_head // page, device=device)
        return {"q": r(B, Hq, 1, D), "k_pages": r(pages, page, D), "v_pages": r(pages, page, D),
                "pos": torch.full((pages, page), -1, device=device), "next": start + per_head - 1,
                "lengths": torch.full((B, H), n, dtype=torch.int32, device=device), "last": start + per_head - 1,
                "start": torch.tensor(n, device=device), "k": r(B, H, 1, D), "v": r(B, H, 1, D),
                "table": table.to(torch.int32), "k_cache": r(B, H, n, D), "v_cache": r(B, H, n, D)}

    def write(x: Inputs) -> tuple[Any, ...]:
        x["lengths"].fill_(n)
        return (x["k_pages"], x["v_pages"], x["pos"], x["next"], x["lengths"], x["k"], x["v"], x["start"], x["last"],
                None)

    def two_ops(x: Inputs) -> torch.Tensor:
        torch.ops.vtattn.paged_append(*write(x))
        out: torch.Tensor = torch.ops.vtattn.paged_decode_attention(x["q"], x["k_pages"], x["v_pages"], x["table"],
                                                                    x["lengths"], D ** -0.5)
        return out

    def dynamic(x: Inputs) -> torch.Tensor:
        x["lengths"].fill_(n)
        k, v = (torch.cat([x[c], x[t]], 2) for c, t in (("k_cache", "k"), ("v_cache", "v")))
        return F.scaled_dot_product_attention(x["q"], k, v, enable_gqa=Hq != H)

    c = Case("paged_decode_step", f"{name}:step-1", {"B": B, "Hq": Hq, "Hkv": H, "D": D, "page_size": page,
                                                      "kept": n + 1}, make,
             bytes_fn=lambda elt: 2 * B * H * (n + 2) * D * elt + 2 * B * Hq * D * elt)
    c.impls = _vtattn_impls(backends, lambda x: torch.ops.vtattn.paged_decode_step(x["q"], *write(x), x["table"],
                                                                                    D ** -0.5))
    c.impls.append(Impl("append-then-decode", two_ops, role="baseline", note="the two ops, two calls"))
    c.impls.append(Impl("dynamic-cache-sdpa", dynamic, role="baseline", note="cat + SDPA"))
    return [c]


def _paged_evict_cases(name: str, s: Shape, backends: list[str]) -> list[Case]:
    """A DecodeH2O layer's eviction (`kv.decode.evict`) at its defaults: every head holds half the
    capacity plus `every` = 32 decode tokens, scores them against those 32 queries and drops back
    by 32 outside its last 32. Repeated calls re-score and re-move the same slots (the counts are the
    host's, given again). Baseline: the reference's batched PyTorch ops (what the CPU and a GPU ran
    before their kernels)."""
    B, Hq, H, D, cap, _ = _decode_dims(s)
    page, n = DECODE_PAGE_SIZE, 32
    length = cap // 2 + n
    per_head = -(-length // page) * page

    def make(device: torch.device, dtype: torch.dtype, seed: int) -> Inputs:
        g = torch.Generator(device=device).manual_seed(seed)
        pages = B * H * per_head // page
        start = torch.arange(B * H).view(B, H) * per_head
        pos = torch.arange(per_head, device=device).repeat(B * H).view(pages, page)
        return {"k_pages": torch.randn(pages, page, D, device=device, dtype=dtype, generator=g),
                "v_pages": torch.randn(pages, page, D, device=device, dtype=dtype, generator=g), "pos": pos,
                "score": torch.rand(pages, page, device=device, generator=g),
                "q": torch.randn(B, Hq, n, D, device=device, dtype=dtype, generator=g), "head_start": start,
                "lengths": torch.full((B, H), length), "keep": torch.full((B, H), length - n)}

    def args(x: Inputs) -> tuple[Any, ...]:
        return (x["k_pages"], x["v_pages"], x["pos"], x["score"], x["q"], x["head_start"], x["lengths"], x["keep"],
                length - n, n, D ** -0.5)

    c = Case("paged_evict", f"{name}:evict-{n}", {"B": B, "Hq": Hq, "Hkv": H, "D": D, "tokens": length,
                                                  "queries": n}, make,
             flops=4.0 * B * Hq * n * length * D,
             bytes_fn=lambda elt: 3 * B * H * length * D * elt)  # keys read, kept k and v moved
    c.impls = _vtattn_impls(backends, lambda x: torch.ops.vtattn.paged_evict(*args(x)))
    c.impls.append(Impl("torch-ops", lambda x: vtattn.reference.paged_evict(*args(x)), role="baseline",
                        note="the reference's batched ops"))
    return [c]


def _paged_evict_step_cases(name: str, s: Shape, backends: list[str]) -> list[Case]:
    """A static DecodeH2O layer's step (`kv.decode.StaticEviction`) between its evictions: every head
    holds its floor, half the capacity, with `every` = 32 slots past it, and scores the step's query
    against them (the step due every 32nd call drops nothing at the floor: each call does the same
    work). Baseline: the reference's batched PyTorch ops (what either device ran before its kernel)."""
    B, Hq, H, D, cap, _ = _decode_dims(s)
    page, every = DECODE_PAGE_SIZE, 32
    floor = cap // 2
    per_head = -(-(floor + every) // page) * page

    def make(device: torch.device, dtype: torch.dtype, seed: int) -> Inputs:
        g = torch.Generator(device=device).manual_seed(seed)
        pages = B * H * per_head // page
        start = torch.arange(B * H, device=device).view(B, H) * per_head
        full = torch.full((B, H), floor, device=device)
        return {"k_pages": torch.randn(pages, page, D, device=device, dtype=dtype, generator=g),
                "v_pages": torch.randn(pages, page, D, device=device, dtype=dtype, generator=g),
                "pos": torch.arange(per_head, device=device).repeat(B * H).view(pages, page),
                "score": torch.rand(pages, page, device=device, generator=g),
                "q": torch.randn(B, Hq, 1, D, device=device, dtype=dtype, generator=g), "head_start": start,
                "capacity": torch.full_like(full, per_head), "floor": full, "lengths": full.int(),
                "next_slot": start + floor, "since": torch.zeros((), dtype=torch.int64, device=device)}

    def args(x: Inputs) -> tuple[Any, ...]:
        return (x["k_pages"], x["v_pages"], x["pos"], x["score"], x["q"], x["head_start"], x["capacity"], x["floor"],
                x["lengths"], x["next_slot"], x["since"], every, every, per_head, D ** -0.5)

    c = Case("paged_evict_step", f"{name}:step-{every}", {"B": B, "Hq": Hq, "Hkv": H, "D": D, "tokens": floor,
                                                         "every": every}, make,
             flops=2.0 * B * Hq * floor * D,
             bytes_fn=lambda elt: B * H * floor * (D * elt + 8))  # keys and scores read, scores written
    c.impls = _vtattn_impls(backends, lambda x: torch.ops.vtattn.paged_evict_step(*args(x)))
    c.impls.append(Impl("torch-ops", lambda x: vtattn.reference.paged_evict_step(*args(x)), role="baseline",
                        note="the reference's batched ops"))
    return [c]


def _cmai_step_cases(name: str, s: Shape, backends: list[str]) -> list[Case]:
    """A CMAI layer's decode step (`patch.cmai`): one new text row per sample against T = L_cap / 16
    earlier text entries and I = 576 L_cap / 16384 image tokens (LLaVA-1.5's 576 after 1024 text tokens
    at the full shape), at most 4 samples (the record's P_ti, [B, Hq, T, I] fp32, is 302 MB at B = 4).
    Baseline: the reference's chunked PyTorch ops (what either device ran before its kernels)."""
    B, Hq, H, D, cap, _ = _decode_dims(s)
    B, T, I = min(B, 4), max(8, cap // 16), max(8, cap * 9 // 256)

    def make(device: torch.device, dtype: torch.dtype, seed: int) -> Inputs:
        g = torch.Generator(device=device).manual_seed(seed)
        p_ti = torch.rand(B, Hq, T, I, device=device, generator=g)
        return {"q": torch.randn(B, Hq, 1, D, device=device, dtype=dtype, generator=g),
                **{n: torch.randn(B, H, L, D, device=device, dtype=dtype, generator=g)
                   for n, L in (("k_t", T), ("v_t", T), ("k_i", I), ("v_i", I))},
                "text": (I + torch.arange(T, device=device)).expand(B, T), "image": torch.arange(I, device=device)
                .expand(B, I), "text_ok": torch.ones(B, T, dtype=torch.bool, device=device),
                "image_ok": torch.ones(B, I, dtype=torch.bool, device=device), "p_ti": p_ti / p_ti.sum(-1, True)}

    def args(x: Inputs) -> tuple[Any, ...]:
        return (x["q"], x["k_t"], x["v_t"], x["text"], x["text_ok"], x["k_i"], x["v_i"], x["image"], x["image_ok"],
                x["p_ti"], 0.5, 0.0, D ** -0.5)

    c = Case("cmai_step", f"{name}:row", {"B": B, "Hq": Hq, "Hkv": H, "D": D, "text": T, "image": I},
             make, flops=B * Hq * (4.0 * (T + I) * D + 2.0 * T * I),  # logits, P.V, the focus product
             bytes_fn=lambda elt: 2 * B * H * (T + I) * D * elt + B * Hq * T * I * 4)  # k / v, the P_ti record read
    c.impls = _vtattn_impls(backends, lambda x: torch.ops.vtattn.cmai_step(*args(x)))
    c.impls.append(Impl("torch-ops", lambda x: vtattn.reference.cmai_step(*args(x)), role="baseline",
                        note="the reference's chunked ops"))
    return [c]


BUILDERS: dict[str, Builder] = {"attention": _attention_cases, "key_importance": _key_importance_cases,
            "group_attention": _group_attention_cases,
            "decode_attention": _decode_attention_cases, "paged_decode_attention": _paged_decode_attention_cases,
            "paged_append": _paged_append_cases, "paged_decode_step": _paged_decode_step_cases,
            "paged_evict": _paged_evict_cases, "paged_evict_step": _paged_evict_step_cases,
            "cmai_step": _cmai_step_cases}


# Every backend a pytest-benchmark row may force; one that refuses the inputs is a skip there.
ALL_BACKENDS = ["auto", "cuda", "triton", "cpp"]


def default_backends(device: torch.device) -> list[str]:
    return ["auto", "cuda", "triton"] if device.type == "cuda" else ["auto", "cpp"]


def build_cases(device: torch.device, shapes: Sequence[str] | None = None, backends: list[str] | None = None,
                level: str = "full", ops: Sequence[str] | None = None) -> list[Case]:
    backends = backends or default_backends(device)
    out: list[Case] = []
    for op, builder in BUILDERS.items():
        if ops and op not in ops:
            continue
        for name in shapes or SHAPES:
            s = shape_of(name)
            if bool(s.get("decode")) != (op in DECODE_OPS):
                continue
            out += builder(name, s if name.startswith(CUSTOM) else scaled_shape(s, level), backends)
    return out


def impl_ids(op: str, backends: list[str] = ALL_BACKENDS) -> list[tuple[str, str]]:
    """(case name, impl name) of every implementation of `op`: names do not depend on the level."""
    return [(c.name, i.name) for c in build_cases(torch.device("cpu"), backends=backends, ops=[op]) for i in c.impls]


def input_bytes(x: Inputs) -> int:
    return sum(int(t.numel() * t.element_size()) for t in x.values() if isinstance(t, torch.Tensor))


def n_copies(device: torch.device, per_copy_bytes: int) -> int:
    """Enough input copies on GPU that the set is several times the L2; 1 on CPU."""
    if device.type != "cuda":
        return 1
    return max(2, min(4, math.ceil(3 * l2_bytes(device) / max(per_copy_bytes, 1))))


# Model-level and selection cases build on Case / Impl above, hence imported last.
from . import decode_host, scenarios, scenarios_llm, select_cases, sparse_cases  # noqa: E402

BUILDERS.update(select_cases.BUILDERS)
BUILDERS.update(sparse_cases.BUILDERS)
# Last: the kernel cases run before any large model is built.
BUILDERS.update(scenarios.BUILDERS)
BUILDERS.update(scenarios_llm.BUILDERS)
BUILDERS.update(decode_host.BUILDERS)
