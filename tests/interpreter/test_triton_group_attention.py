"""Triton group_attention under TRITON_INTERPRET=1 (tiny shapes)."""
import os

import pytest
import torch

import vtattn
from helpers import OUT_TOL, poisoned_outputs, rand_qkv, run_forced

pytestmark = [pytest.mark.interpreter,
              pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="needs TRITON_INTERPRET=1")]

# (B, Hq, Hkv, Nq, Nk, D, G, causal): several 16 x 16 tiles with ragged tails, GQA, hidden keys
CASES = [
    (2, 2, 1, 9, 30, 64, 4, True),
    (1, 4, 2, 20, 37, 72, 3, False),
    (2, 2, 2, 33, 17, 80, 1, True),  # Nq > Nk: the first rows see no key
    (1, 2, 1, 1, 45, 32, 2, True),  # a decode row
]


def _inputs(case, dtype):
    B, Hq, Hkv, Nq, Nk, D, G, causal = CASES[case]
    q, k, v = rand_qkv(B, Hq, Hkv, Nq, Nk, D, dtype, layout="strided", seed=case)
    groups = torch.randint(-1, G, (B, Nk), generator=torch.Generator().manual_seed(case))
    return q, k, v, groups, G, causal


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16,
                                   pytest.param(torch.bfloat16, marks=pytest.mark.xfail(
                                       strict=True, reason="the interpreter computes bf16 tl.dot wrongly"))], ids=str)
@pytest.mark.parametrize("case", range(len(CASES)))
def test_triton_group_matches_reference(dtype, case):
    q, k, v, groups, G, causal = _inputs(case, dtype)
    with poisoned_outputs():
        out, mass = run_forced("triton", vtattn.group_attention, q, k, v, groups, num_groups=G, causal=causal)
    assert out.transpose(1, 2).is_contiguous() and mass.is_contiguous()
    want_out, want_mass = vtattn.reference.group_attention(q.double(), k.double(), v.double(), groups, G, causal,
                                                           q.shape[-1] ** -0.5)
    torch.testing.assert_close(out.double(), want_out, atol=OUT_TOL[dtype], rtol=OUT_TOL[dtype])
    torch.testing.assert_close(mass.double(), want_mass, atol=1e-5, rtol=1e-5)


def test_triton_refuses_more_than_four_groups():
    q, k, v, groups, _, _ = _inputs(0, torch.float32)
    with pytest.raises(vtattn.BackendUnavailable, match="num_groups 5 > 4"):
        run_forced("triton", vtattn.group_attention, q, k, v, groups, num_groups=5)


def test_triton_hidden_nan_keys_stay_out():
    q, k, v = rand_qkv(1, 2, 1, 5, 20, 64, torch.float32)
    groups = torch.tensor([[-1] * 4 + [0, 1] * 8])
    k, v = k.clone(), v.clone()
    k[0, :, :4], v[0, :, :4] = float("nan"), float("nan")
    out, mass = run_forced("triton", vtattn.group_attention, q, k, v, groups, num_groups=2, causal=True)
    assert out.isfinite().all() and mass.isfinite().all()


def test_triton_opcheck():
    q, k, v, groups, G, causal = _inputs(0, torch.float32)
    with vtattn.use_backend("triton"):
        torch.library.opcheck(torch.ops.vtattn.group_attention.default,
                              (q, k, v, groups, G, causal, 0.125))
