"""Compile every Triton kernel of vtattn to sm_90 (or sm_80) SASS without a GPU, as the device would:
    python scripts/compile_triton.py [--all-configs] [--arch 90|80] [--record build/triton_launches.json]
The interpreter (tests/interpreter) checks what the kernels compute, not whether they lower: a
construct that interprets but does not compile (a method on a constexpr argument, a dtype the
backend rejects) otherwise shows only on a lent GPU. Each launcher runs on CPU tensors against a
stand-in driver that reports the target; kernels are compiled (warm-up), never launched.
fp16, bf16 and fp32 at head dims 64 and 72 with each kernel's first config; --all-configs adds
every autotuning config in bf16 and fp32. --record adds what each compiled launch needs (threads,
registers from the cubin, shared memory, the config's estimate) to a JSON file that
`python -m vtattn.check_launches` checks against each architecture's limits (one run per --arch:
entries of other targets are kept). Run in its own process: the stand-in driver replaces triton's."""
import argparse
import collections
import json
import os
import struct
import sys
from pathlib import Path

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.runtime import driver
from triton.runtime.jit import JITFunction


KERNELS = {"_attention_fwd_kernel", "_block_sparse_fwd_kernel", "_column_sums_kernel", "_few_rows_logits_kernel",
           "_few_rows_normalize_kernel", "_gather_tokens", "_index_fwd_kernel", "_merge_assign", "_merge_kernel",
           "_merge_reduce", "_row_lse_kernel", "_select_tokens", "_split_kernel", "_varlen_fwd_kernel"}


class _Driver:
    """The driver calls a launch makes before it compiles, for one target."""
    def __init__(self, arch: int):
        self.arch = arch

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def get_current_target(self):
        return GPUTarget("cuda", self.arch, 32)

    def get_active_torch_device(self):
        return torch.device("cpu")

    def is_active(self):
        return True


def _launch_all(h, D):
    from vtattn.triton_kernels import (attention, block_sparse_attention, decode_attention, gather_tokens,
                                       index_attention, key_importance, merge_tokens, paged_decode_attention,
                                       select_tokens, varlen_attention)
    q, k = torch.randn(2, 4, 100, D, dtype=h), torch.randn(2, 2, 120, D, dtype=h)
    attention.attention(q, k, k, True, 0.1)
    attention.attention(q, k, k, True, 0.1, 30.0, 50, torch.zeros(4))  # softcap, window, sinks
    rows = lambda n: torch.arange(n).expand(2, n).contiguous()  # noqa: E731
    index_attention.index_attention(q, k, k, torch.arange(120).expand(2, 2, 120).contiguous(),
                                    torch.full((2, 2), 120, dtype=torch.int32), rows(100), rows(120), True, 0.1)
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
    x, kept = torch.randn(2, 100, 256, dtype=h), torch.arange(10).expand(2, 10).contiguous()
    mask = torch.zeros(2, 100, dtype=torch.bool)
    mask[:, :10] = True
    merge_tokens.merge_tokens(x, x[..., :64], kept, mask, True)
    gather_tokens.gather_tokens(x, kept, None, 0)
    select_tokens.select_tokens(torch.randn(2, 100), torch.full((2, 1), 5), [100], 5, True)


def cubin_registers(cubin: bytes, name: str) -> int:
    """Registers per thread of kernel `name` in an ELF cubin (what cuobjdump reports; this machine has
    none): the EIATTR_REGCOUNT (0x2f) entry of .nv.info for the kernel's symbol, which the low 24 bits
    of its .text section's sh_info name (older ptxas put the count in the top 8 bits instead)."""
    shoff, = struct.unpack_from("<Q", cubin, 0x28)
    entsize, count, names = struct.unpack_from("<HHH", cubin, 0x3A)
    headers = [struct.unpack_from("<IIQQQQIIQQ", cubin, shoff + i * entsize) for i in range(count)]
    strtab = headers[names][4]
    sections = {cubin[strtab + h[0]:cubin.index(b"\0", strtab + h[0])].decode(): h for h in headers}
    text = sections[f".text.{name}"]
    symbol, top = text[7] & 0xFFFFFF, text[7] >> 24
    info = sections.get(".nv.info")
    i, end = (info[4], info[4] + info[5]) if info else (0, 0)
    while i < end:  # attributes: format byte, attribute byte, then a value the format sizes
        fmt, attr = cubin[i], cubin[i + 1]
        if fmt == 4:  # EIFMT_SVAL: u16 size, data
            size, = struct.unpack_from("<H", cubin, i + 2)
            if attr == 0x2F and struct.unpack_from("<I", cubin, i + 4)[0] == symbol:
                return struct.unpack_from("<I", cubin, i + 8)[0]
            i += 4 + size
        else:
            i += {1: 2, 2: 3, 3: 4}[fmt]
    return top


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--all-configs", action="store_true")
    p.add_argument("--arch", type=int, choices=(90, 80), default=90, help="compute capability to compile for")
    p.add_argument("--record", metavar="JSON", type=Path, help="add each compiled launch's resources to this file")
    a = p.parse_args()
    os.environ.pop("TRITON_INTERPRET", None)
    driver.set_active(_Driver(a.arch))
    compiled = collections.Counter()
    records = {}
    tuning = []  # the Tuned kernel whose launch is being compiled, and its config index
    run = JITFunction.run

    def warm_up(self, *args, grid, warmup, **kwargs):  # compile only
        compiled[self.fn.__name__] += 1
        kernel = run(self, *args, grid=grid, warmup=True, **kwargs)
        md = kernel.metadata
        esize = next(t.element_size() for t in args if isinstance(t, torch.Tensor))
        bd = kwargs.get("BLOCK_D")
        rec = {"kernel": self.fn.__name__, "target": a.arch, "esize": esize, "block_d": bd,
               "meta": {k: v for k, v in kwargs.items() if k.startswith("BLOCK_") and k != "BLOCK_D"},
               "num_warps": md.num_warps, "num_stages": md.num_stages, "shared": md.shared,
               "registers": cubin_registers(kernel.asm["cubin"], md.name), "estimate": None, "index": 0,
               "last": True}
        if tuning:
            tuned, index, size = tuning[-1]
            rec.update(index=index, last=index == size - 1)
            if tuned.smem is not None:
                rec["estimate"] = esize * bd * tuned.smem(kwargs, md.num_stages)
        records[json.dumps({k: rec[k] for k in ("kernel", "esize", "block_d", "meta", "num_warps", "num_stages")},
                           sort_keys=True)] = rec
        return kernel

    JITFunction.run = warm_up
    from vtattn.triton_kernels import _common

    def forced(self, esize, bd, limit):  # no device: no shared-memory limit to filter configs by
        space = self.space(esize, bd)
        index = min(int(os.environ.get("VTATTN_TRITON_CONFIG", 0)), len(space) - 1)
        tuning.append((self, index, len(space)))
        return [space[index]]

    getitem = _common.Tuned.__getitem__

    def tuned_launch(self, grid):  # the config stays known while its launch compiles
        launch = getitem(self, grid)

        def run_one(*args, **kwargs):
            self._tuners.clear()  # configs() again: it notes the config being compiled
            try:
                return launch(*args, **kwargs)
            finally:
                tuning.clear()
        return run_one

    _common.Tuned.configs = forced
    _common.Tuned.__getitem__ = tuned_launch
    runs = [(h, D, 0) for h in (torch.float16, torch.bfloat16, torch.float32) for D in (64, 72)]
    if a.all_configs:  # 13: the largest 16-bit space (attention's), 3 the largest fp32 one
        runs += [(torch.bfloat16, 72, i) for i in range(1, 13)] + [(torch.float32, 72, i) for i in (1, 2)]
    for h, D, config in runs:
        os.environ["VTATTN_TRITON_CONFIG"] = str(config)
        try:
            _launch_all(h, D)
        except Exception as e:
            sys.exit(f"compile_triton: {h} D={D} config {config}: {type(e).__name__}: {e}")
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
