"""Compile every Triton kernel of vtattn to sm_90 PTX without a GPU, as the device would:
    python scripts/compile_triton.py [--all-configs]
The interpreter (tests/interpreter) checks what the kernels compute, not whether they lower: a
construct that interprets but does not compile (a method on a constexpr argument, a dtype the
backend rejects) otherwise shows only on a lent GPU. Each launcher runs on CPU tensors against a
stand-in driver that reports an sm_90 target; kernels are compiled (warm-up), never launched.
fp16, bf16 and fp32 at head dims 64 and 72 with each kernel's first config; --all-configs adds
every autotuning config in bf16 and fp32. Run in its own process: the stand-in driver replaces triton's."""
import argparse
import collections
import os
import sys

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.runtime import driver
from triton.runtime.jit import JITFunction


KERNELS = {"_attention_fwd_kernel", "_block_sparse_fwd_kernel", "_column_sums_kernel", "_few_rows_logits_kernel",
           "_few_rows_normalize_kernel", "_gather_tokens", "_index_fwd_kernel", "_merge_assign", "_merge_kernel",
           "_merge_reduce", "_row_lse_kernel", "_select_tokens", "_split_kernel", "_varlen_fwd_kernel"}


class _Sm90:
    """The driver calls a launch makes before it compiles."""
    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def get_current_target(self):
        return GPUTarget("cuda", 90, 32)

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
    rows = lambda n: torch.arange(n).expand(2, n).contiguous()  # noqa: E731
    index_attention.index_attention(q, k, k, torch.arange(120).expand(2, 2, 120).contiguous(),
                                    torch.full((2, 2), 120, dtype=torch.int32), rows(100), rows(120), True, 0.1)
    block_sparse_attention.block_sparse_attention(q, k, k, torch.ones(1, 1, 1, dtype=torch.int32),
                                                  torch.zeros(1, 1, 1, 1, dtype=torch.int32), 128, True, 0.1)
    key_importance.key_importance(q, k, None, None, True, 0.1)  # rows="all"
    key_importance.key_importance(q, k, None, torch.zeros(2, 3, dtype=torch.long), True, 0.1)  # a few rows
    qt, kt = torch.randn(100, 4, D, dtype=h), torch.randn(120, 2, D, dtype=h)
    varlen_attention.varlen_attention(qt, kt, kt, torch.tensor([0, 40, 100], dtype=torch.int32),
                                      torch.tensor([0, 60, 120], dtype=torch.int32), 60, True, 0.1)
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


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--all-configs", action="store_true")
    a = p.parse_args()
    os.environ.pop("TRITON_INTERPRET", None)
    driver.set_active(_Sm90())
    compiled = collections.Counter()
    run = JITFunction.run

    def warm_up(self, *args, grid, warmup, **kwargs):  # compile only
        compiled[self.fn.__name__] += 1
        return run(self, *args, grid=grid, warmup=True, **kwargs)

    JITFunction.run = warm_up
    from vtattn.triton_kernels import _common

    def forced(self, esize, bd, limit):  # no device: no shared-memory limit to filter configs by
        space = self.space(esize, bd)
        return [space[min(int(os.environ.get("VTATTN_TRITON_CONFIG", 0)), len(space) - 1)]]

    _common.Tuned.configs = forced
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
    print(f"compile_triton: triton {triton.__version__}, sm_90: {sum(compiled.values())} launches compiled, "
          f"{len(compiled)} kernels ({', '.join(sorted(compiled))})")


if __name__ == "__main__":
    main()
