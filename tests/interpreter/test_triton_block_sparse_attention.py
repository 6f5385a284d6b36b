"""Triton block_sparse_attention under TRITON_INTERPRET=1 (tiny shapes)."""
import os

import pytest
import torch

import vtattn
from vtattn import sparse
from helpers import OUT_TOL, poisoned_outputs, rand_qkv, run_forced

pytestmark = [pytest.mark.interpreter,
              pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="needs TRITON_INTERPRET=1")]

# (B, Hq, Hkv, Nq, Nk, D, block_size, mask heads, causal): partial last blocks, GQA, Nq != Nk, lists
# per head or shared, blocks of two key tiles (32).
CASES = [
    (1, 2, 1, 37, 53, 64, 16, 2, True),
    (2, 2, 2, 40, 29, 72, 32, 1, False),
    (1, 4, 2, 20, 45, 80, 16, 1, False),
    (1, 2, 2, 64, 64, 64, 32, 2, True),
]


def _inputs(case, dtype, layout):
    B, Hq, Hkv, Nq, Nk, D, bs, Hm, causal = CASES[case]
    q, k, v = rand_qkv(B, Hq, Hkv, Nq, Nk, D, dtype, layout=layout, seed=case)
    g = torch.Generator().manual_seed(case)
    blocks = torch.rand(B, Hm, -(-Nq // bs), -(-Nk // bs), generator=g) < 0.6
    blocks[0, 0, -1] = False  # an empty query block
    num, idx = sparse.from_dense_blocks(blocks)
    return q, k, v, num, idx.flip(-1).roll(1, -1) if case % 2 else idx, bs, causal  # lists in another order


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16,
                                   pytest.param(torch.bfloat16, marks=pytest.mark.xfail(
                                       strict=True, reason="the interpreter computes bf16 tl.dot wrongly"))], ids=str)
@pytest.mark.parametrize("case", range(len(CASES)))
@pytest.mark.parametrize("layout", ["contiguous", "strided"])
def test_triton_block_sparse_matches_reference(dtype, case, layout):
    q, k, v, num, idx, bs, causal = _inputs(case, dtype, layout)
    with poisoned_outputs():
        out, lse = run_forced("triton", vtattn.block_sparse_attention, q, k, v, num, idx, block_size=bs,
                              causal=causal, return_lse=True)
    want, want_lse = vtattn.reference.block_sparse_attention(q.double(), k.double(), v.double(), num, idx, bs, causal,
                                                             q.shape[-1] ** -0.5)
    torch.testing.assert_close(out.double(), want, atol=OUT_TOL[dtype], rtol=OUT_TOL[dtype])
    torch.testing.assert_close(lse.double(), want_lse.double(), atol=1e-4, rtol=1e-5)


def test_triton_opcheck():
    q, k, v, num, idx, bs, causal = _inputs(0, torch.float32, "strided")
    with vtattn.use_backend("triton"):
        torch.library.opcheck(torch.ops.vtattn.block_sparse_attention.default, (q, k, v, num, idx, bs, causal, 0.125))
