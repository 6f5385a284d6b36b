"""The C++ CPU kernels at every instruction-set level this CPU runs (VTATTN_CPU_ISA caps the level at
the first call, so each level runs in its own process): the tile micro-kernels (wide AVX-512 blocks,
narrow tails, skipped and partial vectors of causal tiles, pairwise lane folds) against the references,
and the kernels built on them (group_attention, paged_evict_step)."""
import os
import subprocess
import sys

import pytest

from vtattn import _ext

pytestmark = pytest.mark.skipif(_ext.load() is not None, reason="vtattn._C is not built")

LEVELS = ("baseline", "avx2", "avx512")

CHECK = r"""
import torch, vtattn
from vtattn import reference as ref
vtattn._ext.load()
C = torch.ops.vtattn_C
torch.manual_seed(0)

def close(got, want, what):
    torch.testing.assert_close(got, want, atol=3e-5, rtol=1e-4, msg=lambda m: f"{what}: {m}")

B, Hq, Hkv = 2, 4, 2
for D in (80, 128):  # 80: after AVX-512's 64-wide blocks, a 16-wide tail
    for N in (1, 67, 131):
        q, k, v = torch.randn(B, Hq, N, D), torch.randn(B, Hkv, N, D), torch.randn(B, Hkv, N, D)
        for causal in (False, True):
            for softcap, window in ((0.0, -1), (5.0, 17)):
                what = f"D{D} N{N} causal={causal} softcap={softcap} window={window}"
                args = (q, k, v, causal, D ** -0.5, softcap, window, None)
                (out, lse), (r_out, r_lse) = C.attention(*args), ref.attention(*args)
                close(out, r_out, f"attention {what}")
                close(lse, r_lse, f"attention lse {what}")
                for rows in (None, torch.randint(-1, N, (B, 5)), torch.randint(-1, N, (B, 40))):
                    for given in (r_lse, None) if rows is None else (None,):
                        ki = (q, k, given, rows, causal, D ** -0.5, softcap, window, None)
                        close(C.key_importance(*ki), ref.key_importance(*ki), f"key_importance {what}")
        # a padded batch: sequences of N and N // 2 + 1 tokens, packed
        n2 = N // 2 + 1
        cu = torch.tensor([0, N, N + n2], dtype=torch.int32)
        qv, kv_ = torch.randn(N + n2, Hq, D), torch.randn(N + n2, Hkv, D)
        args = (qv, kv_, kv_.flip(0), cu, cu, N, True, D ** -0.5, 0.0, -1, None)
        close(C.varlen_attention(*args)[0], ref.varlen_attention(*args)[0], f"varlen D{D} N{N}")
        lengths = torch.randint(0, N + 1, (B, Hkv), dtype=torch.int32)
        args = (q[:, :, :1], k, v, lengths, D ** -0.5)
        close(C.decode_attention(*args), ref.decode_attention(*args), f"decode D{D} N{N}")
    nb = 3  # block-sparse: 3 blocks of 32 tokens, each query block sees a random subset of blocks
    q, k, v = torch.randn(B, Hq, 96, D), torch.randn(B, Hkv, 96, D), torch.randn(B, Hkv, 96, D)
    idx = torch.stack([torch.randperm(nb) for _ in range(B * Hq * nb)]).view(B, Hq, nb, nb).int()
    num = torch.randint(1, nb + 1, (B, Hq, nb), dtype=torch.int32)
    args = (q, k, v, num, idx, 32, False, D ** -0.5)
    close(C.block_sparse_attention(*args)[0], ref.block_sparse_attention(*args)[0], f"block_sparse D{D}")
    groups = torch.randint(-1, 3, (B, 96))
    for got, want in zip(C.group_attention(q, k, v, groups, 3, True, D ** -0.5),
                         ref.group_attention(q, k, v, groups, 3, True, D ** -0.5)):
        close(got, want, f"group_attention D{D}")
    # a static DecodeH2O step over 130 tokens a head (a softmax over three kBN tiles), then its eviction
    pool = torch.randn(B * Hkv * 136, D)
    args = [pool.view(-1, 8, D), pool.clone().view(-1, 8, D), torch.randperm(B * Hkv * 136).view(-1, 8),
            torch.rand(B * Hkv * 17, 8), q[:, :, :1], torch.arange(B * Hkv).view(B, Hkv) * 136,
            torch.full((B, Hkv), 136), torch.full((B, Hkv), 126), torch.full((B, Hkv), 130, dtype=torch.int32),
            torch.arange(B * Hkv).view(B, Hkv) * 136 + 130, torch.tensor(3), 4, 3, 136, D ** -0.5]  # (due)
    want = [a.clone() if isinstance(a, torch.Tensor) else a for a in args]
    C.paged_evict_step(*args)
    ref.paged_evict_step(*want)
    for i in (0, 1, 2, 8, 9, 10):
        assert torch.equal(args[i], want[i]), f"paged_evict_step D{D}: argument {i}"
    close(args[3], want[3], f"paged_evict_step D{D} scores")
    assert (args[8] == 126).all(), "the step evicts back to the floor"
print(C.cpu_tile_level())
"""


def _run(level: str | None) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "VTATTN_CPU_ISA"}
    if level is not None:
        env["VTATTN_CPU_ISA"] = level
    return subprocess.run([sys.executable, "-c", CHECK], env=env, capture_output=True, text=True, timeout=600)


def test_every_level_matches_the_references():
    best = _run(None)
    assert best.returncode == 0, best.stderr[-3000:]
    top = best.stdout.split()[-1]
    assert top in LEVELS
    for level in LEVELS[:LEVELS.index(top)]:  # the best level ran above
        done = _run(level)
        assert done.returncode == 0, f"{level}: {done.stderr[-3000:]}"
        assert done.stdout.split()[-1] == level  # the cap took


def test_an_unknown_level_is_an_error_naming_the_variable():
    done = _run("avx9000")
    assert done.returncode != 0 and "VTATTN_CPU_ISA must be avx512, avx2 or baseline" in done.stderr
