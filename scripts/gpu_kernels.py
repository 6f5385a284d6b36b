"""Launch every vtattn kernel once on small edge shapes and compare it with the reference:
    python scripts/gpu_kernels.py [--backend cuda|triton ...] [--json OUT.jsonl]
    python scripts/gpu_kernels.py --precompile DIR     (CPU machine: the Triton cases' kernels, into a cache)
The first correctness pass of a lent GPU (scripts/gpu_check.sh), and what compute-sanitizer runs:
tails (sizes no tile divides), GQA, rows that see no key, a select_tokens segment of 6,000 tokens
(shared memory above 48 KiB with the static part), lengths of 0, a paged cache. Each case calls the
registered op's backend directly with the op's canonical arguments (vtattn._C / the Triton
launcher), outputs poisoned (NaN) so an unwritten element fails, against the pure-PyTorch
reference in float64 on the CPU. One line per case (and --json: one JSON object per line).

--precompile compiles (never launches) the Triton cases' kernels for sm_90 into a Triton cache DIR,
with the same arguments, hence the same specializations, as the GPU run: carried to the device
with TRITON_CACHE_DIR=DIR, the Triton pass compiles nothing there. Run it with the device's triton
(.venv-oldest: triton 3.6). Without a GPU and without --precompile: a dry run (cases and references
are built, every launch is skipped with its reason)."""
import argparse
import inspect
import json
import os
import sys
import time
from pathlib import Path

import torch

_OFF = {"softcap": 0.0, "window": -1, "sinks": None}  # attention options of the newer schemas: off
SMS = 132  # H100 SXM and H200: the decode split count the device will pick
TOL = {torch.float16: 2e-3, torch.bfloat16: 2e-2, torch.float32: 1e-4}


def _g(seed):
    return torch.Generator().manual_seed(seed)


def _randn(*shape, dtype, seed):
    return torch.randn(shape, generator=_g(seed)).to(dtype)


def _attn_cases(dtype):
    # (B, Hq, Hkv, Nq, Nk, D, causal): tails; GQA; Nq > Nk causal: the first rows see no key.
    for i, (B, Hq, Hkv, Nq, Nk, D, causal) in enumerate(((2, 4, 2, 77, 131, 72, False), (1, 8, 2, 100, 37, 64, True),
                                                        (2, 2, 1, 129, 200, 128, True), (1, 2, 2, 65, 65, 80, False))):
        q, k, v = (_randn(B, h, n, D, dtype=dtype, seed=i * 3 + j) for j, (h, n) in enumerate(((Hq, Nq), (Hkv, Nk),
                                                                                                (Hkv, Nk))))
        yield f"B{B} Hq{Hq} Hkv{Hkv} Nq{Nq} Nk{Nk} D{D}{' causal' if causal else ''}", dict(
            q=q, k=k, v=v, causal=causal, scale=D ** -0.5)
    # softcap, a left window and sinks: the flash kernel's instantiation with the attention options
    q, k, v = (_randn(2, h, n, 64, dtype=dtype, seed=20 + j) for j, (h, n) in enumerate(((4, 70), (2, 150), (2, 150))))
    yield "B2 Hq4 Hkv2 Nq70 Nk150 D64 causal softcap 20 window 33 sinks", dict(
        q=q, k=k, v=v, causal=True, scale=0.125, softcap=20.0, window=33, sinks=_randn(4, dtype=torch.float32, seed=24))


def cases(dtype):
    """(op, name, canonical kwargs) of every edge case at `dtype` (CPU tensors)."""
    i64, i32 = torch.int64, torch.int32
    for name, a in _attn_cases(dtype):
        yield "attention", name, a
        B, Hq, Nq = a["q"].shape[:3]
        yield "key_importance", name + " rows 0", dict(a, lse=None, rows=torch.zeros(B, 1, dtype=i64))
        yield "key_importance", name + " all rows", dict(a, lse=None, rows=None)
        Hkv, Nk = a["k"].shape[1:3]
        L = max(1, Nk // 2)
        idx = torch.stack([torch.randperm(Nk, generator=_g(b))[:L] for b in range(B * Hkv)]).view(B, Hkv, L)
        counts = torch.randint(0, L + 1, (B, Hkv), generator=_g(5), dtype=i32)
        yield "index_attention", name, dict(a, kv_indices=idx, kv_counts=counts,
                                            q_positions=torch.arange(Nk - Nq, Nk).expand(B, Nq).contiguous(),
                                            kv_positions=torch.arange(Nk).expand(B, Nk).contiguous())
        if "softcap" not in a:  # VAR's pass: 4 groups and hidden (-1) keys
            groups = torch.randint(-1, 4, (B, Nk), generator=_g(7))
            yield "group_attention", name, dict(a, groups=groups, num_groups=4)
        if Hq == Hkv * (Hq // Hkv) and not a["causal"]:
            for bs in (16, 128):  # 16: Triton's small tiles; 128: the CUDA kernel's (a multiple of its query tile)
                nq, nk = -(-Nq // bs), -(-Nk // bs)
                yield "block_sparse_attention", f"{name} blocks {bs}", dict(
                    a, kv_num_blocks=torch.randint(0, nk + 1, (1, 1, nq), generator=_g(6), dtype=i32),
                    kv_indices=torch.stack([torch.randperm(nk, generator=_g(r)) for r in range(nq)]).to(i32)[None, None],
                    block_size=bs)
    lens_q, lens_k = [1, 130, 0, 77], [5, 130, 40, 200]
    cu = lambda lens: torch.tensor([0] + lens, dtype=i32).cumsum(0, dtype=i32)  # noqa: E731
    Tq, Tk = sum(lens_q), sum(lens_k)
    for causal in (False, True):
        yield "varlen_attention", f"lengths {lens_q}/{lens_k}{' causal' if causal else ''}", dict(
            q=_randn(Tq, 4, 64, dtype=dtype, seed=20), k=_randn(Tk, 2, 64, dtype=dtype, seed=21),
            v=_randn(Tk, 2, 64, dtype=dtype, seed=22), cu_seqlens_q=cu(lens_q), cu_seqlens_k=cu(lens_k),
            max_seqlen_q=max(lens_q), causal=causal, scale=0.125)
    for B, Hq, Hkv, cap, D in ((3, 8, 2, 700, 128), (2, 4, 4, 64, 72)):
        lengths = torch.tensor([[[0, cap, 1, 333][(b + g) % 4] % (cap + 1) for g in range(Hkv)] for b in range(B)])
        q = _randn(B, Hq, 1, D, dtype=dtype, seed=30)
        kc, vc = _randn(B, Hkv, cap, D, dtype=dtype, seed=31), _randn(B, Hkv, cap, D, dtype=dtype, seed=32)
        yield "decode_attention", f"B{B} Hq{Hq} Hkv{Hkv} cap{cap} D{D}", dict(
            q=q, k_cache=kc, v_cache=vc, lengths=lengths.to(i32), scale=D ** -0.5)
        page = 16
        pages = cap // page
        table = torch.randperm(B * Hkv * pages, generator=_g(33)).to(i32).view(B, Hkv, pages)
        yield "paged_decode_attention", f"B{B} Hq{Hq} Hkv{Hkv} pages {pages}x{page} D{D}", dict(
            q=q, k_pages=_randn(B * Hkv * pages, page, D, dtype=dtype, seed=34),
            v_pages=_randn(B * Hkv * pages, page, D, dtype=dtype, seed=35), block_table=table,
            lengths=lengths.clamp(max=pages * page).to(i32), scale=D ** -0.5)
    # paged_append: a decode step's write (one and three tokens, a head clamped at its last slot, strided rows)
    for n, D, ps in ((1, 128, 16), (3, 72, 5)):
        B, H = 3, 5
        cap = torch.full((B, H), 2 * ps)
        first = torch.arange(B * H).view(B, H) * 2 * ps
        used = torch.randint(0, 2 * ps - n, (B, H), generator=_g(60))
        used[0, 0] = 2 * ps - 1
        pages = B * H * 2
        k = _randn(B, n, H, D + 8, dtype=dtype, seed=61)[..., :D].transpose(1, 2)
        yield "paged_append", f"B{B} H{H} n{n} D{D} pages {pages}x{ps}", dict(
            k_pages=_randn(pages, ps, D, dtype=dtype, seed=62), v_pages=_randn(pages, ps, D, dtype=dtype, seed=63),
            pos=torch.full((pages, ps), -1, dtype=i64), next_slot=first + used, lengths=used.to(i32), k=k,
            v=_randn(B, H, n, D, dtype=dtype, seed=64), start=torch.tensor(1000), last=first + cap - 1,
            score=torch.rand(pages, ps, generator=_g(65)))
    # paged_decode_step: a compressed layer's decode step (the write, then the paged read; GQA), in
    # CompressedCache's default pages of one token
    B, Hkv, G, D, ps, per = 3, 2, 4, 128, 1, 40
    first = torch.arange(B * Hkv).view(B, Hkv) * per * ps  # each head owns `per` pages
    used = torch.randint(0, per * ps - 1, (B, Hkv), generator=_g(70))
    pages = B * Hkv * per
    yield "paged_decode_step", f"B{B} Hq{Hkv * G} Hkv{Hkv} pages {pages}x{ps} D{D}", dict(
        q=_randn(B, Hkv * G, 1, D, dtype=dtype, seed=71), k_pages=_randn(pages, ps, D, dtype=dtype, seed=72),
        v_pages=_randn(pages, ps, D, dtype=dtype, seed=73), pos=torch.full((pages, ps), -1, dtype=i64),
        next_slot=first + used, lengths=used.to(i32), k=_randn(B, Hkv, 1, D, dtype=dtype, seed=74),
        v=_randn(B, Hkv, 1, D, dtype=dtype, seed=75), start=torch.tensor(1000), last=first + per * ps - 1,
        score=torch.rand(pages, ps, generator=_g(76)),
        block_table=((first // ps)[..., None] + torch.arange(per)).to(i32), scale=D ** -0.5)
    # paged_evict_step: a static DecodeH2O layer's step (GQA; an evicting step with a recent window, pages
    # of one token; a step between evictions, pages of 5, D 72; a head holding nothing)
    for due, D, ps, every, recent in ((True, 128, 1, 4, 2), (False, 72, 5, 3, 0)):
        B, H, G = 3, 2, 4
        floor = torch.randint(recent, 40, (B, H), generator=_g(80))
        cap = (floor + every + ps - 1) // ps * ps
        first = (cap.flatten().cumsum(0) - cap.flatten()).view(B, H)
        n = torch.minimum(floor + every, cap)
        n[0, 0] = 0
        pages = int(cap.sum()) // ps
        pos = torch.full((pages * ps,), -1, dtype=i64)
        for r in range(B * H):
            s0, m = int(first.flatten()[r]), int(n.flatten()[r])
            pos[s0:s0 + m] = torch.randperm(4 * m + 1, generator=_g(81 + r))[:m]
        yield "paged_evict_step", f"B{B} Hq{H * G} Hkv{H} D{D} pages {pages}x{ps} every {every} recent {recent}" \
            f"{' evicting' if due else ''}", dict(
            k_pages=_randn(pages, ps, D, dtype=dtype, seed=82), v_pages=_randn(pages, ps, D, dtype=dtype, seed=83),
            pos=pos.view(pages, ps), score=torch.rand(pages, ps, generator=_g(84)),
            q=_randn(B, H * G, 1, D, dtype=dtype, seed=85), head_start=first, capacity=cap, floor=floor,
            lengths=n.to(i32), next_slot=first + n, since=torch.tensor(every - 1 if due else 0), every=every,
            recent=recent, width=int(cap.max()), scale=D ** -0.5)
    # paged_evict: a dynamic DecodeH2O layer's eviction pass (GQA, 5 queries seeing more and more tokens, a
    # window of 3, an empty head and one dropping nothing; pages of 16 and of one token), the counts set
    for ps, D, every in ((16, 128, 5), (1, 72, 3)):
        B, H, G = 2, 3, 4
        run = torch.randint(1, 5, (B, H), generator=_g(90)) * 16
        first = (run.flatten().cumsum(0) - run.flatten()).view(B, H)
        lengths = torch.minimum(torch.randint(0, 65, (B, H), generator=_g(91)), run)
        lengths[0, 0] = 0
        keep = torch.maximum(lengths - every, torch.minimum(lengths, torch.tensor(3)))
        keep[0, 1] = lengths[0, 1]
        slots = int(run.sum())
        pos = torch.randperm(500 + every, generator=_g(92))[:slots].view(slots // ps, ps)
        yield "paged_evict", f"B{B} Hq{H * G} Hkv{H} n{every} D{D} pages {slots // ps}x{ps} recent 3", dict(
            k_pages=_randn(slots // ps, ps, D, dtype=dtype, seed=93), v_pages=_randn(slots // ps, ps, D, dtype=dtype,
                                                                                   seed=94),
            pos=pos, score=torch.rand(slots // ps, ps, generator=_g(95)),
            queries=_randn(B, H * G, every, D, dtype=dtype, seed=96), head_start=first, lengths=lengths, keep=keep,
            start=500, recent=3, scale=D ** -0.5, counts=torch.zeros(B, H, dtype=i32),
            next_slot=torch.zeros(B, H, dtype=i64))
    # cmai_step: CMAI's decode step (GQA; rows between image tokens see part of them; slots without a token
    # and a row without one; an image past one tile of the select kernel; records strided as `Growing` keeps them)
    for R, D, I, keep, weight in ((1, 128, 1100, 0.25, 0.0), (3, 72, 37, 0.5, 0.2)):
        B, Hq, Hkv, T = 3, 8, 2, 40
        order = torch.randperm(T + I, generator=_g(100))  # the tokens' positions, text and image interleaved
        text, image = (order[:T].sort().values.expand(B, T).clone(), order[T:].sort().values.expand(B, I).clone())
        text_ok = torch.rand(B, T, generator=_g(101)) > 0.2
        text_ok[:, T - R:], text_ok[1, -1] = True, False
        image_ok = torch.rand(B, I, generator=_g(102)) > 0.1
        p_ti = torch.rand(B, Hq, T + 4, I, generator=_g(103))
        yield "cmai_step", f"B{B} Hq{Hq} Hkv{Hkv} R{R} T{T} I{I} D{D} keep {keep} weight {weight}", dict(
            q=_randn(B, R, Hq, D, dtype=dtype, seed=104).transpose(1, 2),
            k_t=_randn(B, Hkv, T + 8, D, dtype=dtype, seed=105)[:, :, :T],
            v_t=_randn(B, Hkv, T + 8, D, dtype=dtype, seed=106)[:, :, :T], text=text, text_ok=text_ok,
            k_i=_randn(B, I, Hkv, D, dtype=dtype, seed=107).transpose(1, 2),
            v_i=_randn(B, I, Hkv, D, dtype=dtype, seed=108).transpose(1, 2), image=image, image_ok=image_ok,
            p_ti=(p_ti / p_ti.sum(-1, keepdim=True))[:, :, :T], keep=keep, weight=weight, scale=D ** -0.5)
    # select_tokens: one segment of 6,000 tokens (dynamic + static shared memory > 48 KiB), a segment
    # at the first failing length of the old opt-in rule, many small ones; ties; fp16 scores.
    for B, segments in ((3, [6000]), (2, [5723, 100, 1]), (2, [37] * 20)):
        N = sum(segments)
        scores = _randn(B, N, dtype=torch.float32, seed=40).round(decimals=1).to(dtype)
        budgets = torch.randint(0, max(segments) + 1, (B, len(segments)), generator=_g(41))
        for sort in (True, False):
            yield "select_tokens", f"B{B} segments {segments[:3]}{'...' if len(segments) > 3 else ''}" \
                f"{' sorted' if sort else ''}", dict(scores=scores, budgets=budgets, segments=segments,
                                                    max_keep=N // 2, sort=sort)
    x = _randn(3, 333, 200, dtype=dtype, seed=50)
    idx = torch.stack([torch.randperm(333, generator=_g(51 + b))[:90] for b in range(3)])
    idx[1, 5] = -1
    yield "gather_tokens", "padded, a -1 index", dict(x=x, indices=idx, cu_seqlens=None, total=0)
    yield "gather_tokens", "packed", dict(x=x, indices=idx, cu_seqlens=torch.tensor([0, 90, 130, 200], dtype=i32),
                                          total=200)
    mask = torch.zeros(3, 333, dtype=torch.bool)
    mask.scatter_(1, idx.sort(1).values.clamp(min=0), True)
    keys = _randn(3, 333, 72, dtype=dtype, seed=52)
    for weighted in (False, True):
        yield "merge_tokens", f"N333 K90 C200{' weighted' if weighted else ''}", dict(
            x=x, keys=keys, indices=idx.sort(1).values, mask=mask, weighted=weighted)


def _positional(fn, kwargs):
    """kwargs in the order of fn's parameters (a callable) or of a registered op's schema."""
    names = [a.name for a in fn._schema.arguments] if hasattr(fn, "_schema") else inspect.signature(fn).parameters
    return [kwargs[n] if n in kwargs else _OFF[n] for n in names]


def _close(out, ref, dtype):
    """None when out matches ref (floats within tolerance, integers and bools exactly), else why not."""
    outs, refs = (out, ref) if isinstance(out, (tuple, list)) else ((out,), (ref,))
    for i, (o, r) in enumerate(zip(outs, refs)):
        o = o.cpu()
        if o.shape != r.shape:
            return f"output {i}: shape {tuple(o.shape)} != {tuple(r.shape)}"
        if not o.is_floating_point():
            bad = (o != r).sum().item()
            if bad:
                return f"output {i}: {bad} of {o.numel()} elements differ"
            continue
        o, r = o.double(), r.double()
        if torch.isnan(o).any() and not torch.isnan(r).any():
            return f"output {i}: {torch.isnan(o).sum().item()} NaN (unwritten?) elements"
        tol = TOL[dtype]
        scale = max(1.0, r[torch.isfinite(r)].abs().max().item() if torch.isfinite(r).any() else 1.0)
        same_inf = (torch.isinf(o) == torch.isinf(r)) & (~torch.isinf(r) | (o == r))
        err = torch.where(torch.isfinite(r), (o - r).abs(), torch.zeros_like(r))
        if not same_inf.all() or err.max().item() > tol * scale:
            return f"output {i}: max error {err.max().item():.3g} > {tol * scale:.3g}"
    return None


# ranks, copies, argmax, selections: the reference at the kernel's dtype
_DISCRETE = ("select_tokens", "gather_tokens", "merge_tokens", "paged_append", "paged_evict", "paged_evict_step",
             "cmai_step")
# ops that write their arguments in place: a case's output is those arguments (run on copies)
_WRITES = {op: ("k_pages", "v_pages", "pos", "next_slot", "lengths", "score")
           for op in ("paged_append", "paged_decode_step")}
_WRITES["paged_evict_step"] = ("k_pages", "v_pages", "pos", "score", "lengths", "next_slot", "since")
_WRITES["paged_evict"] = ("k_pages", "v_pages", "pos", "score", "counts", "next_slot")
_WRITES["cmai_step"] = ("p_ti",)
_HOST = {"paged_evict": ("head_start", "lengths", "keep")}  # the host's counts: CPU tensors by contract


def _writing(op, fn, kwargs):
    """fn(kwargs) of an op; for one that writes in place, on copies of what it writes, which it returns
    (then its output, if any)."""
    if op not in _WRITES:
        return fn(kwargs)
    kwargs = {k: v.clone() if k in _WRITES[op] else v for k, v in kwargs.items()}
    out = fn(kwargs)
    return tuple(kwargs[k] for k in _WRITES[op]) + (() if out is None else (out,))


def _reference(op, kwargs):
    """The reference on the CPU: float64 (attention and decode ops), else the kernel's dtype."""
    from vtattn import reference
    fn = getattr(reference, op)
    if op in _DISCRETE:
        return _writing(op, lambda a: fn(*_positional(fn, a)), kwargs)
    wide = {k: v.double() if isinstance(v, torch.Tensor) and v.is_floating_point() else v for k, v in kwargs.items()}
    return _writing(op, lambda a: fn(*_positional(fn, a)), wide)


def _refusal(op, backend, kwargs):
    """The backend's own reason not to run these inputs (vtattn's dispatch asks it first), or None."""
    from vtattn import _registry
    if backend not in _registry.OPS[op]:
        return f"{op} has no {backend} backend"
    registered = getattr(torch.ops.vtattn, op).default
    return _registry.OPS[op][backend].supports(*_positional(registered, kwargs))


def _launch(op, backend, kwargs):
    """The backend's own launch of the op (no dispatch): vtattn._C's CUDA kernel or the Triton launcher."""
    import vtattn
    if backend == "triton":
        import importlib
        fn = getattr(importlib.import_module(f"vtattn.triton_kernels.{op}"), op)
        return _writing(op, lambda a: fn(*_positional(fn, a)), kwargs)
    reason = vtattn._ext.has_kernel(op, "cuda")
    if reason is not None:
        raise RuntimeError(reason)
    fn = getattr(torch.ops.vtattn_C, op)
    return _writing(op, lambda a: fn(*_positional(fn.default, a)), kwargs)


def run(backends, dtypes, emit) -> int:
    on_gpu = torch.cuda.is_available()
    failed = 0
    torch.use_deterministic_algorithms(True, warn_only=True)  # new tensors come NaN-filled: unwritten shows
    for backend in backends:
        for dtype in dtypes:
            for op, name, kwargs in cases(dtype):
                rec = {"op": op, "backend": backend, "dtype": str(dtype)[6:], "case": name}
                t0 = time.perf_counter()
                try:
                    ref = _reference(op, kwargs)
                    if not on_gpu:
                        rec.update(status="skip", detail="no CUDA device (dry run: case and reference built)")
                    else:
                        dev = {k: v.cuda() if isinstance(v, torch.Tensor) and k not in _HOST.get(op, ()) else v
                               for k, v in kwargs.items()}
                        refused = _refusal(op, backend, dev)
                        if refused:
                            rec.update(status="skip", detail=f"the backend refuses: {refused}")
                        else:
                            out = _launch(op, backend, dev)
                            torch.cuda.synchronize()
                            why = _close(out, ref, dtype)
                            rec.update(status="fail" if why else "pass", detail=why)
                except Exception as e:  # a refusal, a launch failure or a device fault: report, go on
                    rec.update(status="error", detail=f"{type(e).__name__}: {e}".splitlines()[0][:300])
                rec["seconds"] = round(time.perf_counter() - t0, 3)
                failed += rec["status"] in ("fail", "error")
                emit(rec)
    return failed


def pack_cache(cache_dir: str):
    """Keep what loading a kernel needs (its metadata .json and .cubin): a fraction of the size."""
    for grp in Path(cache_dir).glob("*/__grp__*.json"):
        children = json.loads(grp.read_text())["child_paths"]
        for name, path in children.items():
            if not name.endswith((".json", ".cubin")):
                Path(path).unlink(missing_ok=True)
        kept = {n: p for n, p in children.items() if n.endswith((".json", ".cubin"))}
        grp.write_text(json.dumps({"child_paths": kept}))


def relocate_cache(cache_dir: str) -> int:
    """Point the cache's groups at where the cache now is: triton records absolute paths and treats a
    group with a missing file as a miss (the cache was filled on another machine, in another folder)."""
    n = 0
    for grp in Path(cache_dir).resolve().glob("*/__grp__*.json"):
        children = json.loads(grp.read_text())["child_paths"]
        moved = {name: str(grp.parent / Path(path).name) for name, path in children.items()}
        if moved != children:
            grp.write_text(json.dumps({"child_paths": moved}))
            n += 1
    return n


def precompile(cache_dir: str, dtypes) -> int:
    """Compile the Triton cases' kernels for sm_90 into cache_dir (the device's triton, this machine)."""
    os.environ["TRITON_CACHE_DIR"] = os.path.abspath(cache_dir)
    os.environ.pop("TRITON_INTERPRET", None)
    from triton.backends.compiler import GPUTarget
    from triton.runtime import driver
    from triton.runtime.jit import JITFunction

    class _Driver:  # what a launch asks the driver before it compiles: the device's sm_90 (the JIT's own
        # cache keys, which the device's launches look up, need the JIT's warm-up, not triton.compile)
        get_current_device = staticmethod(lambda: 0)
        get_current_stream = staticmethod(lambda device=None: 0)
        get_current_target = staticmethod(lambda: GPUTarget("cuda", 90, 32))
        get_active_torch_device = staticmethod(lambda: torch.device("cpu"))
        is_active = staticmethod(lambda: True)

    driver.set_active(_Driver())
    run_jit = JITFunction.run
    JITFunction.run = lambda self, *a, grid, warmup, **kw: run_jit(self, *a, grid=grid, warmup=True, **kw)
    from vtattn.triton_kernels import _common, decode_attention

    def first(self, esize, bd, limit):  # the device's VTATTN_TRITON_CONFIG=0 (config 0 fits an H100)
        return self.space(esize, bd)[:1]

    _common.Tuned.configs = first
    decode_attention._sm_count = lambda index: SMS
    split = decode_attention.num_splits
    decode_attention.num_splits = lambda cap, heads, device: split(cap, heads, torch.device("cuda", 0))
    import importlib
    n = 0
    for dtype in dtypes:
        for op, name, kwargs in cases(dtype):
            params = inspect.signature(getattr(importlib.import_module(f"vtattn.triton_kernels.{op}"), op)).parameters
            if any(kwargs.get(o, off) != off and o not in params for o, off in _OFF.items()):
                continue  # an option this kernel lacks: its supports() refuses the case on the device
            _launch(op, "triton", kwargs)
            n += 1
    pack_cache(cache_dir)
    size = sum(f.stat().st_size for f in Path(cache_dir).rglob("*") if f.is_file())
    print(f"gpu_kernels: {n} Triton cases compiled for sm_90 into {cache_dir} "
          f"({len(list(Path(cache_dir).iterdir()))} kernels, {size / 2**20:.1f} MiB)")
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backend", action="append", choices=("cuda", "triton"), help="default: cuda, then triton")
    p.add_argument("--dtype", action="append", choices=("fp16", "bf16", "fp32"), help="default: fp16 and bf16")
    p.add_argument("--json", metavar="PATH", help="append one JSON object per case")
    p.add_argument("--precompile", metavar="DIR", help="compile the Triton cases for sm_90 into this Triton cache")
    a = p.parse_args(argv)
    dtypes = [{"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[d]
              for d in (a.dtype or ["fp16", "bf16"])]
    if a.precompile:
        return precompile(a.precompile, dtypes)
    if os.environ.get("TRITON_CACHE_DIR"):  # before triton reads it
        print(f"gpu_kernels: {relocate_cache(os.environ['TRITON_CACHE_DIR'])} cached kernels relocated")
    os.environ.setdefault("VTATTN_TRITON_CONFIG", "0")  # one config each: what the cache holds
    sink = open(a.json, "a") if a.json else None

    def emit(rec):
        print(f"{rec['status'].upper():5} {rec['backend']:6} {rec['op']}[{rec['dtype']}] {rec['case']}"
              f"{': ' + rec['detail'] if rec.get('detail') else ''} ({rec['seconds']} s)", flush=True)
        if sink:
            sink.write(json.dumps(rec) + "\n")
            sink.flush()

    failed = run(a.backend or ["cuda", "triton"], dtypes, emit)
    print(f"gpu_kernels: {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
