"""The Triton half of `python -m vtattn.check_launches`.

Configs: every compiled launch scripts/compile_triton.py recorded (sm_90 and sm_80 targets) must fit
the threads, registers and shared memory of each architecture that would run it: a config the
Tuned filter keeps on an architecture (its shared-memory estimate fits, or it is the last, smallest
one) must really fit there. Grids: each launcher runs on fake CUDA tensors (no memory, no GPU) over
shapes covering its op's range; every launch it makes is captured, never run, and its grid is
checked for every config the kernel may pick, unless the backend's supports() refuses the inputs."""
import contextlib
import inspect
import json
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from .check_launches import Arch, DEFAULT_SMEM, MAX_GRID, MAX_THREADS, REGS_PER_BLOCK

OPS = ("attention", "key_importance", "select_tokens", "gather_tokens", "merge_tokens", "varlen_attention",
       "index_attention", "decode_attention", "paged_decode_attention", "block_sparse_attention", "group_attention",
       "paged_append", "paged_evict", "paged_evict_step", "cmai_step")
# Options later schemas add to the attention family: off.
_OFF = {"softcap": 0.0, "window": -1, "sinks": None}


def check_configs(records: list[dict[str, Any]], archs: Sequence[Arch]) -> list[str]:
    problems = []
    for r in records:
        threads = r["num_warps"] * 32
        for arch in (a for a in archs if a.triton == r["target"]):
            kept = r["last"] or r["estimate"] is None or r["estimate"] <= arch.smem_optin
            what = (f"{r['kernel']} (esize {r['esize']}, BLOCK_D {r['block_d']}, {r['meta']}, {r['num_warps']} warps, "
                    f"{r['num_stages']} stages) on {arch.name}")
            if threads > MAX_THREADS or -(-r["registers"] // 8) * 8 * threads > REGS_PER_BLOCK:
                problems.append(f"{what}: {r['registers']} registers x {threads} threads")
            if kept and r["shared"] > arch.smem_optin:
                problems.append(f"{what}: {r['shared']} bytes of shared memory > {arch.smem_optin} (estimate "
                                f"{r['estimate']})")
    return problems


# ---- grids -----------------------------------------------------------------------------------------

def _fake(*shape: int, dtype: torch.dtype = torch.float16) -> torch.Tensor:
    return torch.empty(shape, dtype=dtype, device="cuda")


def _attention_shapes() -> Iterator[dict[str, Any]]:
    for B, Hq, Hkv, Nq, Nk, D in ((1, 16, 16, 577, 577, 64), (65536, 2, 1, 16, 16, 64), (1, 64, 8, 2**20, 2**20, 128),
                                  (4096, 32, 8, 1, 4096, 128), (1, 1, 1, 2**27, 1, 8), (2, 16, 16, 729, 729, 256)):
        yield dict(q=_fake(B, Hq, Nq, D), k=_fake(B, Hkv, Nk, D), v=_fake(B, Hkv, Nk, D), causal=True, scale=0.1)


def _shapes(op: str) -> Iterator[dict[str, Any]]:
    """Keyword arguments of `op`'s launcher over its range (fake tensors)."""
    i64, i32 = torch.int64, torch.int32
    if op in ("attention", "block_sparse_attention"):
        for a in _attention_shapes():
            if op == "attention":
                yield a
                continue
            B, Hq, Nq = a["q"].shape[:3]
            Nk = a["k"].shape[2]
            bs = 128
            nq, nk = -(-Nq // bs), -(-Nk // bs)
            if nq * nk > 2**24:
                continue
            yield dict(a, kv_num_blocks=_fake(1, 1, nq, dtype=i32), kv_indices=_fake(1, 1, nq, nk, dtype=i32),
                       block_size=bs)
    elif op == "key_importance":
        for a in _attention_shapes():
            B, Hq, Nq = a["q"].shape[:3]
            for R in (None, 1, 16, 17):
                rows = None if R is None else _fake(B, R, dtype=i64)
                yield dict(q=a["q"], k=a["k"], lse=None, rows=rows, causal=a["causal"], scale=a["scale"])
            lse = _fake(B, Hq, Nq, dtype=torch.float32)
            yield dict(q=a["q"], k=a["k"], lse=lse, rows=None, causal=False, scale=1.0)
    elif op == "select_tokens":
        for B, segments in ((1, [576]), (65535, [576]), (65536, [576]), (4, [6000] * 3), (2, [16384] * 256),
                            (1, [2**20]), (8, [1] * 4096)):
            N = sum(segments)
            yield dict(scores=_fake(B, N, dtype=torch.float32), budgets=_fake(B, len(segments), dtype=i64),
                       segments=segments, max_keep=N // 4, sort=True)
    elif op == "gather_tokens":
        for B, N, K, C in ((1, 576, 144, 4096), (65535, 16, 4, 64), (65536, 16, 4, 64), (4096, 2**16, 2**14, 8)):
            yield dict(x=_fake(B, N, C), indices=_fake(B, K, dtype=i64), cu_seqlens=None, total=0)
            yield dict(x=_fake(B, N, C), indices=_fake(B, K, dtype=i64), cu_seqlens=_fake(B + 1, dtype=i32),
                       total=B * K)
    elif op == "merge_tokens":
        for B, N, K, C in ((1, 576, 144, 4096), (65535, 16, 4, 64), (65536, 16, 4, 64), (2, 2**20, 2**16, 2**17)):
            yield dict(x=_fake(B, N, C), keys=_fake(B, N, 64), indices=_fake(B, K, dtype=i64),
                       mask=_fake(B, N, dtype=torch.bool), weighted=True)
    elif op == "varlen_attention":
        for B, T, H, D, longest in ((2, 1154, 16, 64, 577), (65535, 65535 * 16, 2, 64, 16), (65536, 65536, 2, 64, 1),
                                    (1, 2**22, 32, 128, 2**22)):
            yield dict(q=_fake(T, H, D), k=_fake(T, H, D), v=_fake(T, H, D), cu_seqlens_q=_fake(B + 1, dtype=i32),
                       cu_seqlens_k=_fake(B + 1, dtype=i32), max_seqlen_q=longest, causal=True, scale=0.1)
    elif op == "index_attention":
        for a in _attention_shapes():
            B, Hq, Nq = a["q"].shape[:3]
            Hkv, Nk = a["k"].shape[1:3]
            yield dict(a, kv_indices=_fake(B, Hkv, max(1, Nk // 4), dtype=i64), kv_counts=_fake(B, Hkv, dtype=i32),
                       q_positions=_fake(B, Nq, dtype=i64), kv_positions=_fake(B, Nk, dtype=i64))
    elif op == "group_attention":
        for a in _attention_shapes():
            yield dict(a, groups=_fake(a["k"].shape[0], a["k"].shape[2], dtype=i64), num_groups=4)
    elif op == "paged_append":
        for B, H, n, D, pages in ((1, 8, 1, 128, 64), (65535, 32768, 3, 64, 1), (65536, 32768, 1, 64, 1)):
            pool, heads = _fake(pages, 16, D), _fake(B, H, dtype=i64)
            yield dict(k_pages=pool, v_pages=pool, pos=_fake(pages, 16, dtype=i64), next_slot=heads,
                       lengths=_fake(B, H, dtype=i32), k=_fake(B, H, n, D), v=_fake(B, H, n, D),
                       start=_fake(dtype=i64), last=heads, score=_fake(pages, 16, dtype=torch.float32))
    elif op == "paged_evict":
        for B, H, G, n, D, pages in ((1, 8, 4, 32, 128, 64), (65535, 32768, 1, 1, 64, 1), (65536, 32768, 8, 2, 256, 1)):
            pool, host = _fake(pages, 16, D), torch.empty(B, H, dtype=i64, device="cpu")  # (fake: _widest is patched)
            yield dict(k_pages=pool, v_pages=pool, pos=_fake(pages, 16, dtype=i64),
                       score=_fake(pages, 16, dtype=torch.float32), queries=_fake(B, H * G, n, D), head_start=host,
                       lengths=host, keep=host, start=0, recent=4, scale=0.1, counts=_fake(B, H, dtype=i32),
                       next_slot=_fake(B, H, dtype=i64))
    elif op == "paged_evict_step":
        for B, H, G, D, pages in ((1, 8, 4, 128, 64), (65535, 32768, 1, 64, 1), (65536, 32768, 8, 256, 1)):
            pool, heads = _fake(pages, 16, D), _fake(B, H, dtype=i64)
            yield dict(k_pages=pool, v_pages=pool, pos=_fake(pages, 16, dtype=i64),
                       score=_fake(pages, 16, dtype=torch.float32), q=_fake(B, H * G, 1, D), head_start=heads,
                       capacity=heads, floor=heads, lengths=_fake(B, H, dtype=i32), next_slot=heads,
                       since=_fake(dtype=i64), every=32, recent=32, width=1024, scale=0.1)
    elif op == "cmai_step":  # a decode step (LLaVA-NeXT's image), programs at the grid's limit by heads and by rows
        for B, Hq, Hkv, R, T, I, D in ((4, 32, 8, 1, 600, 2880, 128), (65535, 32768, 1, 1, 2, 1, 64),
                                       (65536, 32768, 1, 1, 2, 1, 64), (65535, 1, 1, 32768, 32768, 16, 64)):
            kv_t, kv_i = _fake(B, Hkv, T, D), _fake(B, Hkv, I, D)
            yield dict(q=_fake(B, Hq, R, D), k_t=kv_t, v_t=kv_t, text=_fake(B, T, dtype=i64),
                       text_ok=_fake(B, T, dtype=torch.bool), k_i=kv_i, v_i=kv_i, image=_fake(B, I, dtype=i64),
                       image_ok=_fake(B, I, dtype=torch.bool), p_ti=_fake(B, Hq, T, I, dtype=torch.float32),
                       keep=0.25, weight=0.0, scale=0.1)
    elif op in ("decode_attention", "paged_decode_attention"):
        for B, Hq, Hkv, cap, D in ((32, 32, 8, 16384, 128), (65536, 8, 8, 64, 64), (1, 64, 1, 2**24, 128),
                                   (2**20, 16, 2, 16, 64)):
            q, lengths = _fake(B, Hq, 1, D), _fake(B, Hkv, dtype=i32)
            if op == "decode_attention":
                cache = _fake(B, Hkv, cap, D)
                yield dict(q=q, k_cache=cache, v_cache=cache, lengths=lengths, scale=0.1)
            else:
                page = 16
                pool = _fake(B * Hkv * (cap // page), page, D)
                yield dict(q=q, k_pages=pool, v_pages=pool, block_table=_fake(B, Hkv, cap // page, dtype=i32),
                           lengths=lengths, scale=0.1)


def _call(fn: Callable[..., Any], kwargs: dict[str, Any]) -> Any:
    params = inspect.signature(fn).parameters
    return fn(*(kwargs[n] if n in kwargs else _OFF[n] for n in params))


@contextlib.contextmanager
def _captured(sms: int) -> Iterator[list[tuple[Any, ...]]]:
    """Launches are recorded, not run; no launcher touches a device (fake tensors claim CUDA)."""
    import importlib

    from triton.runtime.jit import JITFunction

    from .triton_kernels import _common
    launches: list[tuple[Any, ...]] = []
    saved: list[tuple[Any, str, Any]] = []

    def patch(obj: Any, name: str, value: Any) -> None:
        saved.append((obj, name, getattr(obj, name)))
        setattr(obj, name, value)

    patch(JITFunction, "run", lambda self, *args, grid, warmup, **kw: launches.append((self, None, grid, args, kw)))
    patch(_common.Tuned, "__getitem__",
          lambda self, grid: lambda *args, **kw: launches.append((self.fn, self, grid, args, kw)))
    for op in OPS + ("_common",):
        mod = importlib.import_module(f"vtattn.triton_kernels.{op}")
        if hasattr(mod, "on_device"):
            patch(mod, "on_device", lambda t: contextlib.nullcontext())
        if hasattr(mod, "device_ints"):
            patch(mod, "device_ints", lambda values, device: torch.tensor(values, dtype=torch.int32).to(device))
        if hasattr(mod, "_sm_count"):
            patch(mod, "_sm_count", lambda index: sms)
        if hasattr(mod, "_widest"):  # reads of the host's counts (fake here): the scratch's width, their checks
            patch(mod, "_widest", lambda counts: 4096)
            patch(mod, "_check_heads", lambda *args: None)
    try:
        yield launches
    finally:
        for obj, name, value in reversed(saved):
            setattr(obj, name, value)


def _grids(fn: Any, tuned: Any, grid: Any, args: tuple[Any, ...], kwargs: dict[str, Any]
           ) -> Iterator[tuple[Any, int]]:
    """(grid, config) for every config the launch may use."""
    if tuned is None:
        yield (grid(kwargs) if callable(grid) else grid), kwargs.get("num_warps", 4)
        return
    t = next(a for a in args if isinstance(a, torch.Tensor))
    for meta, warps, _ in tuned.space(t.element_size(), kwargs.get("BLOCK_D", 0)):
        yield (grid({**kwargs, **meta}) if callable(grid) else grid), warps


def check_grids(archs: Sequence[Arch]) -> tuple[list[str], int]:
    import importlib

    from torch._subclasses.fake_tensor import FakeTensorMode
    problems, checked = [], 0
    sms = sorted({s for a in archs for s in a.sms})
    for op in OPS:
        mod = importlib.import_module(f"vtattn.triton_kernels.{op}")
        for sm in (sms[0], sms[-1]) if "decode" in op else sms[:1]:
            with FakeTensorMode(allow_non_fake_inputs=True), _captured(sm) as launches:
                for dtype in (torch.float16, torch.float32):
                    for kwargs in _shapes(op):
                        kwargs = {k: v.to(dtype) if isinstance(v, torch.Tensor) and v.dtype == torch.float16 else v
                                  for k, v in kwargs.items()}
                        if _call(mod.supports, kwargs) is not None:
                            continue
                        del launches[:]
                        _call(getattr(mod, op), kwargs)
                        for fn, tuned, grid, args, kw in launches:
                            name = getattr(fn, "__name__", None) or fn.fn.__name__
                            for g, warps in _grids(fn, tuned, grid, args, kw):
                                checked += 1
                                g = tuple(g) + (1,) * (3 - len(g))
                                bad = [f"axis {'xyz'[i]} = {n}" for i, (n, most) in enumerate(zip(g, MAX_GRID))
                                       if n > most]
                                if bad or warps * 32 > MAX_THREADS:
                                    shapes = {k: tuple(v.shape) if isinstance(v, torch.Tensor) else v
                                              for k, v in kwargs.items() if not isinstance(v, list)}
                                    problems.append(f"{op} {name}: grid {g} ({', '.join(bad)}), {warps} warps, "
                                                    f"at {shapes}")
    return sorted(set(problems)), checked


def check_triton(record: Path, archs: Sequence[Arch]) -> int:
    from .triton_kernels._common import TRITON_ERROR
    if TRITON_ERROR is not None:
        print(f"check_launches: Triton: not checked ({TRITON_ERROR})")
        return 0
    status = 0
    grid_problems, checked = check_grids(archs)
    for p in grid_problems:
        print(f"FAIL Triton grid: {p}")
    status |= bool(grid_problems)
    if not record.exists():
        print(f"check_launches: Triton configs: no record {record}: run scripts/compile_triton.py --all-configs "
              f"--record {record} (with --arch 90 and --arch 80)", flush=True)
        return 1
    records = json.loads(record.read_text())
    config_problems = check_configs(records, archs)
    for p in config_problems:
        print(f"FAIL Triton config: {p}")
    targets = sorted({r["target"] for r in records})
    missing = sorted({a.triton for a in archs} - set(targets))
    if missing:
        print(f"FAIL Triton configs: no compile record for target(s) {missing}")
    opted = sum(r["shared"] > DEFAULT_SMEM for r in records)
    print(f"check_launches: Triton: {checked} launch grids over {len(OPS)} ops, {len(records)} compiled configs of "
          f"{len({r['kernel'] for r in records})} kernels for sm_{', sm_'.join(map(str, targets))} ({opted} above "
          f"48 KiB: triton opts in), {len(grid_problems) + len(config_problems)} problems")
    return status | bool(config_problems) | bool(missing)
