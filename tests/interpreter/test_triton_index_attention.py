"""Triton index_attention under TRITON_INTERPRET=1 (tiny shapes)."""
import os

import pytest
import torch

import vtattn
from helpers import OUT_TOL, poisoned_outputs, rand_qkv, run_forced

pytestmark = [pytest.mark.interpreter,
              pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="needs TRITON_INTERPRET=1")]

# (B, Hq, Hkv, Nq, Nk, L, D, causal, sorted lists)
CASES = [
    (2, 2, 1, 9, 30, 20, 64, True, True),
    (1, 4, 2, 20, 25, 37, 72, False, False),  # unsorted, repeats
    (2, 2, 2, 17, 40, 33, 80, True, False),
]


def _inputs(case, dtype):
    B, Hq, Hkv, Nq, Nk, L, D, causal, ordered = CASES[case]
    g = torch.Generator().manual_seed(case)
    q, k, v = rand_qkv(B, Hq, Hkv, Nq, Nk, D, dtype, layout="strided", seed=case)
    if ordered:
        idx = torch.rand(B, Hkv, Nk, generator=g).argsort(-1)[..., :L].sort(-1).values
    else:
        idx = torch.randint(0, Nk, (B, Hkv, L), generator=g)
    counts = torch.randint(0, L + 1, (B, Hkv), generator=g, dtype=torch.int32)
    counts.view(-1)[0] = 0
    kw = dict(kv_counts=counts, causal=causal)
    if causal:  # original positions with gaps
        kw["kv_positions"] = torch.rand(B, Nk, generator=g).mul(3).cumsum(-1).long()
        kw["q_positions"] = torch.rand(B, Nq, generator=g).mul(8).cumsum(-1).long()
    return q, k, v, idx, kw


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16,
                                   pytest.param(torch.bfloat16, marks=pytest.mark.xfail(
                                       strict=True, reason="the interpreter computes bf16 tl.dot wrongly"))], ids=str)
@pytest.mark.parametrize("case", range(len(CASES)))
def test_triton_index_matches_reference(dtype, case):
    q, k, v, idx, kw = _inputs(case, dtype)
    with poisoned_outputs():
        out = run_forced("triton", vtattn.index_attention, q, k, v, idx, **kw)
    assert out.transpose(1, 2).is_contiguous()
    Nq, Nk = q.shape[2], k.shape[2]
    qp = kw.get("q_positions", torch.arange(Nq) + Nk - Nq).expand(q.shape[0], Nq)
    kp = kw.get("kv_positions", torch.arange(Nk)).expand(q.shape[0], Nk)
    want = vtattn.reference.index_attention(q.double(), k.double(), v.double(), idx, kw["kv_counts"], qp, kp,
                                            kw["causal"], q.shape[-1] ** -0.5)
    torch.testing.assert_close(out.double(), want, atol=OUT_TOL[dtype], rtol=OUT_TOL[dtype])


def test_triton_opcheck():
    q, k, v, idx, kw = _inputs(0, torch.float32)
    with vtattn.use_backend("triton"):
        torch.library.opcheck(torch.ops.vtattn.index_attention.default,
                              (q, k, v, idx, kw["kv_counts"], kw["q_positions"], kw["kv_positions"], True, 0.125))
