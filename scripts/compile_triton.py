"""Compile every Triton kernel of vtattn to sm_90 (or sm_80) SASS without a GPU, as the device would:
    python scripts/compile_triton.py [--all-configs] [--arch 90|80] [--record build/triton_launches.json]
The interpreter (tests/interpreter) checks what the kernels compute, not whether they lower: a
construct that interprets but does not compile (a method on a constexpr argument, a dtype the
backend rejects) otherwise shows only on a lent GPU. Each launcher runs on CPU tensors with its
kernels' launches captured, never run (the launcher modules' kernels and `Tuned.__getitem__` stand
in for a moment; triton itself is untouched); each captured launch is then compiled ahead of time
with triton.compile(ASTSource(kernel, signature, constexprs, attrs), target=GPUTarget("cuda", arch,
32)), its arguments specialised as triton's JIT does (argument types by triton's mangle_type, ints
equal to 1 as constants, 16-divisible ints and 16-byte aligned pointers marked so).
fp16, bf16 and fp32 at head dims 64 and 72 with each autotuned kernel's first config; --all-configs
adds every other config of each autotuned kernel's space in bf16 and fp32; a config of a SPILL_FREE
kernel that spills registers fails the run. --record adds what each compiled launch needs (threads,
registers and spilled bytes from the cubin, shared memory, the config's estimate) to
a JSON file that `python -m vtattn.check_launches` checks against each architecture's limits (one
run per --arch: entries of other targets are kept)."""
import argparse
import contextlib
import importlib
import inspect
import json
import pkgutil
import struct
import sys
from pathlib import Path
from typing import Any, NamedTuple

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from triton.runtime.jit import JITFunction, mangle_type


KERNELS = {"_attention_fwd_kernel", "_block_sparse_fwd_kernel", "_cmai_attend", "_cmai_scores", "_cmai_select",
           "_column_sums_kernel", "_few_rows_logits_kernel", "_few_rows_normalize_kernel", "_gather_tokens",
           "_group_fwd_kernel", "_index_fwd_kernel", "_merge_assign", "_merge_kernel", "_merge_reduce",
           "_paged_append", "_paged_evict", "_paged_evict_step", "_row_lse_kernel", "_select_tokens", "_split_kernel",
           "_varlen_fwd_kernel"}
# Kernels whose every config must compile without register spills, per target (their spaces are
# pruned to that: a spill there is a config to drop, not noise).
SPILL_FREE = {"_group_fwd_kernel": (90,)}
_OPTIONS = ("num_warps", "num_stages", "num_ctas", "maxnreg")  # launch keywords that are compile options


class Launch(NamedTuple):
    fn: JITFunction
    tuned: Any  # the Tuned launching fn, or None for a direct launch
    args: tuple
    kwargs: dict


class _Direct:
    """Stands in for a launcher module's jit function while launches are captured."""
    def __init__(self, fn: JITFunction, launches: list):
        self.fn, self._launches = fn, launches

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self._launches.append(Launch(self.fn, None, args, kwargs))


@contextlib.contextmanager
def captured():
    """Launches of every vtattn Triton kernel, recorded instead of run."""
    from vtattn import triton_kernels
    from vtattn.triton_kernels import _common
    launches: list[Launch] = []
    saved = []
    real = lambda fn: fn.fn if isinstance(fn, _Direct) else fn  # noqa: E731
    saved.append((_common.Tuned, "__getitem__", _common.Tuned.__getitem__))
    _common.Tuned.__getitem__ = lambda self, grid: lambda *a, **kw: launches.append(Launch(real(self.fn), self, a, kw))
    # Every module imported before any is patched: an import meanwhile would bind a stand-in.
    modules = [importlib.import_module(f"vtattn.triton_kernels.{m.name}")
               for m in pkgutil.iter_modules(triton_kernels.__path__)]
    for module in modules:
        for name, obj in list(vars(module).items()):
            if isinstance(obj, JITFunction):
                saved.append((module, name, obj))
                setattr(module, name, _Direct(obj, launches))
    try:
        yield launches
    finally:
        for owner, name, value in reversed(saved):
            setattr(owner, name, value)


def specialize(fn: JITFunction, arguments: dict) -> tuple[dict, dict, dict]:
    """(signature, constexprs, attrs) of ASTSource for a launch's bound arguments, as the JIT makes them."""
    signature, constexprs, attrs = {}, {}, {}
    for i, p in enumerate(fn.params):
        value = arguments[p.name]
        specialise = not p.do_not_specialize
        kind = "constexpr" if p.is_constexpr else p.annotation_type or mangle_type(value, specialise)
        if p.annotation_type and (kind == "u1" or kind[:2] in ("fp", "bf")):
            specialise = False  # annotated floats and bools: never specialised
        signature[p.name] = kind
        if kind == "constexpr":  # a constexpr parameter, None, or an int equal to 1
            constexprs[p.name], attrs[(i,)] = value, []
        elif specialise and not isinstance(value, (bool, float)) and isinstance(value, (int, torch.Tensor)):
            align = not p.do_not_specialize_on_alignment
            n = value.data_ptr() if isinstance(value, torch.Tensor) else value
            attrs[(i,)] = [["tt.divisibility", 16]] if align and n % 16 == 0 else []
    return signature, constexprs, attrs


def compile_launch(launch: Launch, meta: dict, arch: int):
    """triton.compile of one captured launch, with the config's meta-parameters and options in `meta`."""
    fn, kwargs = launch.fn, {**launch.kwargs, **meta}
    params = {k: v for k, v in kwargs.items() if k not in _OPTIONS}
    bound = inspect.signature(fn.fn).bind(*launch.args, **params)
    bound.apply_defaults()
    signature, constexprs, attrs = specialize(fn, bound.arguments)
    options = {k: kwargs[k] for k in _OPTIONS if kwargs.get(k) is not None}
    return triton.compile(ASTSource(fn, signature, constexprs, attrs), target=GPUTarget("cuda", arch, 32),
                          options=options)


def _launch_all(h, D):
    from vtattn.triton_kernels import (attention, block_sparse_attention, cmai_step, decode_attention, gather_tokens,
                                       group_attention, index_attention, key_importance, merge_tokens,
                                       paged_append, paged_decode_attention, paged_evict, paged_evict_step,
                                       select_tokens, varlen_attention)
    q, k = torch.randn(2, 4, 100, D, dtype=h), torch.randn(2, 2, 120, D, dtype=h)
    attention.attention(q, k, k, True, 0.1)
    attention.attention(q, k, k, True, 0.1, 30.0, 50, torch.zeros(4))  # softcap, window, sinks
    rows = lambda n: torch.arange(n).expand(2, n).contiguous()  # noqa: E731
    index_attention.index_attention(q, k, k, torch.arange(120).expand(2, 2, 120).contiguous(),
                                    torch.full((2, 2), 120, dtype=torch.int32), rows(100), rows(120), True, 0.1)
    group_attention.group_attention(q, k, k, (torch.arange(120) % 5 - 1).expand(2, 120).contiguous(), 4, True, 0.1)
    block_sparse_attention.block_sparse_attention(q, k, k, torch.ones(1, 1, 1, dtype=torch.int32),
                                                  torch.zeros(1, 1, 1, 1, dtype=torch.int32), 128, True, 0.1)
    key_importance.key_importance(q, k, None, None, True, 0.1)  # rows="all"
    key_importance.key_importance(q, k, None, torch.zeros(2, 3, dtype=torch.long), True, 0.1)  # a few rows
    for r in (None, torch.zeros(2, 3, dtype=torch.long)):  # with softcap, window, sinks
        key_importance.key_importance(q, k, None, r, True, 0.1, 30.0, 50, torch.zeros(4))
    qt, kt = torch.randn(100, 4, D, dtype=h), torch.randn(120, 2, D, dtype=h)
    varlen_attention.varlen_attention(qt, kt, kt, torch.tensor([0, 40, 100], dtype=torch.int32),
                                      torch.tensor([0, 60, 120], dtype=torch.int32), 60, True, 0.1)
    varlen_attention.varlen_attention(qt, kt, kt, torch.tensor([0, 40, 100], dtype=torch.int32),
                                      torch.tensor([0, 60, 120], dtype=torch.int32), 60, True, 0.1, 30.0, 20,
                                      torch.zeros(4))
    qd, kd = torch.randn(2, 8, 1, D, dtype=h), torch.randn(2, 2, 3000, D, dtype=h)
    lengths = torch.full((2, 2), 100, dtype=torch.int32)
    decode_attention.decode_attention(qd, kd, kd, lengths, 0.1)
    pool = torch.randn(64, 16, D, dtype=h)
    paged_decode_attention.paged_decode_attention(qd, pool, pool, torch.zeros(2, 2, 8, dtype=torch.int32), lengths, 0.1)
    heads = torch.arange(0, 64, 16).view(2, 2) * 16
    for n, start, last in ((1, torch.tensor(7), heads + 255), (3, torch.tensor(7), None)):  # the static / dynamic cache
        paged_append.paged_append(pool, pool, torch.zeros(64, 16, dtype=torch.long), heads, lengths, kd[:, :, :n],
                                  kd[:, :, :n], start, last, torch.zeros(64, 16))
    evicting = [torch.full((2, 2), c) for c in (100, 90)]  # lengths, keep (the host's counts)
    for counts in (None, lengths):
        paged_evict.paged_evict(pool, pool, torch.zeros(64, 16, dtype=torch.long), torch.zeros(64, 16),
                                torch.randn(2, 8, 4, D, dtype=h), heads, *evicting, 500, 4, 0.1, counts,
                                None if counts is None else heads + 90)
    counts = [torch.full((2, 2), c) for c in (256, 100)]  # capacity, floor
    paged_evict_step.paged_evict_step(pool, pool, torch.zeros(64, 16, dtype=torch.long), torch.zeros(64, 16),
                                      qd, heads, *counts, lengths, heads + 100, torch.zeros((), dtype=torch.long),
                                      32, 32, 256, 0.1)
    for R in (1, 3):  # a decode step's row; rows of a few entries
        text, image = (torch.arange(n).expand(2, n).contiguous() for n in (100, 576))
        ok_t, ok_i = torch.ones(2, 100, dtype=torch.bool), torch.ones(2, 576, dtype=torch.bool)
        kv_t, kv_i = torch.randn(2, 2, 100, D, dtype=h), torch.randn(2, 2, 576, D, dtype=h)
        cmai_step.cmai_step(torch.randn(2, 8, R, D, dtype=h), kv_t, kv_t, text + 600, ok_t, kv_i, kv_i, image, ok_i,
                            torch.zeros(2, 8, 100, 576), 0.25, 0.0, 0.1)
    x, kept = torch.randn(2, 100, 256, dtype=h), torch.arange(10).expand(2, 10).contiguous()
    mask = torch.zeros(2, 100, dtype=torch.bool)
    mask[:, :10] = True
    merge_tokens.merge_tokens(x, x[..., :64], kept, mask, True)
    gather_tokens.gather_tokens(x, kept, None, 0)
    select_tokens.select_tokens(torch.randn(2, 100), torch.full((2, 1), 5), [100], 5, True)


def cubin_resources(cubin: bytes, name: str) -> tuple[int, int]:
    """(registers per thread, stack frame bytes) of kernel `name` in an ELF cubin (what cuobjdump and
    ptxas -v report; this machine has neither): the EIATTR_REGCOUNT (0x2f) and EIATTR_FRAME_SIZE (0x11)
    entries of .nv.info for the kernel's symbol, which the low 24 bits of its .text section's sh_info
    name (older ptxas put the register count in the top 8 bits instead). A Triton kernel has no local
    arrays: a stack frame is register spills."""
    shoff, = struct.unpack_from("<Q", cubin, 0x28)
    entsize, count, names = struct.unpack_from("<HHH", cubin, 0x3A)
    headers = [struct.unpack_from("<IIQQQQIIQQ", cubin, shoff + i * entsize) for i in range(count)]
    strtab = headers[names][4]
    sections = {cubin[strtab + h[0]:cubin.index(b"\0", strtab + h[0])].decode(): h for h in headers}
    text = sections[f".text.{name}"]
    symbol, top = text[7] & 0xFFFFFF, text[7] >> 24
    info = sections.get(".nv.info")
    i, end = (info[4], info[4] + info[5]) if info else (0, 0)
    found = {}
    while i < end:  # attributes: format byte, attribute byte, then a value the format sizes
        fmt, attr = cubin[i], cubin[i + 1]
        if fmt == 4:  # EIFMT_SVAL: u16 size, data (here: the symbol, then the value)
            size, = struct.unpack_from("<H", cubin, i + 2)
            if attr in (0x2F, 0x11) and struct.unpack_from("<I", cubin, i + 4)[0] == symbol:
                found[attr] = struct.unpack_from("<I", cubin, i + 8)[0]
            i += 4 + size
        else:
            i += {1: 2, 2: 3, 3: 4}[fmt]
    return found.get(0x2F, top), found.get(0x11, 0)


def configs(launch: Launch, all_configs: bool) -> list[tuple[int, int, dict]]:
    """(index, space size, meta-parameters and options) to compile a launch with: a direct launch's
    own; an autotuned kernel's first config, or every config of its space."""
    if launch.tuned is None:
        return [(0, 1, {})]
    t = next(a for a in launch.args if isinstance(a, torch.Tensor))
    space = launch.tuned.space(t.element_size(), launch.kwargs.get("BLOCK_D", 0))
    picked = range(len(space)) if all_configs else range(1)
    return [(i, len(space), {**space[i][0], "num_warps": space[i][1], "num_stages": space[i][2]}) for i in picked]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--all-configs", action="store_true")
    p.add_argument("--arch", type=int, choices=(90, 80), default=90, help="compute capability to compile for")
    p.add_argument("--record", metavar="JSON", type=Path, help="add each compiled launch's resources to this file")
    a = p.parse_args()
    runs = [(h, D, False) for h in (torch.float16, torch.bfloat16, torch.float32) for D in (64, 72)]
    if a.all_configs:
        runs += [(torch.bfloat16, 72, True), (torch.float32, 72, True)]
    compiled: dict[str, int] = {}
    records = {}
    spills: list[str] = []
    for h, D, every in runs:
        with captured() as launches:
            _launch_all(h, D)
        for launch in launches:
            esize = next(t.element_size() for t in launch.args if isinstance(t, torch.Tensor))
            for index, size, meta in configs(launch, every):
                name = launch.fn.__name__
                try:
                    kernel = compile_launch(launch, meta, a.arch)
                except Exception as e:
                    sys.exit(f"compile_triton: {h} D={D} {name} {meta}: {type(e).__name__}: {e}")
                compiled[name] = compiled.get(name, 0) + 1
                md, bd = kernel.metadata, launch.kwargs.get("BLOCK_D")
                regs, frame = cubin_resources(kernel.asm["cubin"], md.name)
                if frame and a.arch in SPILL_FREE.get(name, ()):
                    spills.append(f"{h} D={D} {name} {meta}: {frame} bytes of spills (sm_{a.arch})")
                tuned_meta = {k: v for k, v in meta.items() if k.startswith("BLOCK_")}
                rec = {"kernel": name, "target": a.arch, "esize": esize, "block_d": bd,
                       "meta": {k: v for k, v in {**launch.kwargs, **tuned_meta}.items()
                                if k.startswith("BLOCK_") and k != "BLOCK_D"},
                       "num_warps": md.num_warps, "num_stages": md.num_stages, "shared": md.shared,
                       "registers": regs, "spilled": frame, "estimate": None,
                       "index": index, "last": index == size - 1}
                if launch.tuned is not None and launch.tuned.smem is not None:
                    rec["estimate"] = esize * bd * launch.tuned.smem(meta, md.num_stages)
                records[json.dumps({k: rec[k] for k in ("kernel", "esize", "block_d", "meta", "num_warps",
                                                        "num_stages")}, sort_keys=True)] = rec
    if spills:  # these kernels' config spaces are pruned to what fits in registers (see SPILL_FREE)
        sys.exit("compile_triton: register spills:\n  " + "\n  ".join(spills))
    missing = KERNELS - set(compiled)
    if missing:  # a launcher that no longer reaches its kernel would otherwise pass unnoticed
        sys.exit(f"compile_triton: never compiled: {', '.join(sorted(missing))}")
    if a.record:
        old = json.loads(a.record.read_text()) if a.record.exists() else []
        kept = [r for r in old if r.get("target") != a.arch]
        a.record.parent.mkdir(parents=True, exist_ok=True)
        a.record.write_text(json.dumps(kept + list(records.values()), indent=0) + "\n")
    print(f"compile_triton: triton {triton.__version__}, sm_{a.arch}: {sum(compiled.values())} launches compiled, "
          f"{len(compiled)} kernels ({', '.join(sorted(compiled))})")


if __name__ == "__main__":
    main()
