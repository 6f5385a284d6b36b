"""Triton varlen_attention under TRITON_INTERPRET=1 (tiny shapes)."""
import os

import pytest
import torch

import vtattn
from helpers import OUT_TOL, poisoned_outputs, run_forced

pytestmark = [pytest.mark.interpreter,
              pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="needs TRITON_INTERPRET=1")]

# (query lengths, key lengths, Hq, Hkv, D, causal): empty sequences, no keys, GQA, several tiles.
CASES = [
    ([9, 0, 20], [12, 4, 20], 2, 1, 64, True),
    ([5, 17], [0, 40], 2, 2, 72, False),
    ([1, 33], [1, 18], 4, 2, 80, True),
]


def _inputs(case, dtype, layout):
    lq, lk, Hq, Hkv, D, causal = CASES[case]
    g = torch.Generator().manual_seed(case)
    if layout == "strided":
        make = lambda T, H: torch.randn(H, T, D, generator=g).to(dtype).transpose(0, 1)  # noqa: E731
    else:
        make = lambda T, H: torch.randn(T, H, D, generator=g).to(dtype)  # noqa: E731
    cu = lambda lens: torch.tensor([0] + lens).cumsum(0).to(torch.int32)  # noqa: E731
    return make(sum(lq), Hq), make(sum(lk), Hkv), make(sum(lk), Hkv), cu(lq), cu(lk), causal


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16,
                                   pytest.param(torch.bfloat16, marks=pytest.mark.xfail(
                                       strict=True, reason="the interpreter computes bf16 tl.dot wrongly"))], ids=str)
@pytest.mark.parametrize("case", range(len(CASES)))
@pytest.mark.parametrize("layout", ["contiguous", "strided"])
def test_triton_varlen_matches_reference(dtype, case, layout):
    q, k, v, cu_q, cu_k, causal = _inputs(case, dtype, layout)
    with poisoned_outputs():
        out, lse = run_forced("triton", vtattn.varlen_attention, q, k, v, cu_q, cu_k, causal=causal,
                              return_lse=True)
    want, want_lse = vtattn.reference.varlen_attention(q.double(), k.double(), v.double(), cu_q, cu_k, 0,
                                                       causal, q.shape[-1] ** -0.5)
    torch.testing.assert_close(out.double(), want, atol=OUT_TOL[dtype], rtol=OUT_TOL[dtype])
    torch.testing.assert_close(lse.double(), want_lse.double(), atol=1e-4, rtol=1e-5)


# (case, dtype, softcap, window, sinks): each option alone and together, a window of 0.
OPTIONS = [(0, torch.float32, 5.0, None, False), (1, torch.float32, None, 3, True), (2, torch.float16, 20.0, 0, True),
           (0, torch.float32, None, 8, True)]


@pytest.mark.parametrize("opt", range(len(OPTIONS)))
def test_triton_varlen_options_match_reference(opt):
    case, dtype, softcap, window, use_sinks = OPTIONS[opt]
    q, k, v, cu_q, cu_k, causal = _inputs(case, dtype, "strided")
    sinks = torch.randn(q.shape[1], generator=torch.Generator().manual_seed(opt)) if use_sinks else None
    k = k * 3
    with poisoned_outputs():
        out, lse = run_forced("triton", vtattn.varlen_attention, q, k, v, cu_q, cu_k, causal=causal, return_lse=True,
                              softcap=softcap, window=window, sinks=sinks)
    want, want_lse = vtattn.reference.varlen_attention(q.double(), k.double(), v.double(), cu_q, cu_k, 0, causal,
                                                       q.shape[-1] ** -0.5, softcap or 0.0,
                                                       -1 if window is None else window, sinks)
    torch.testing.assert_close(out.double(), want, atol=OUT_TOL[dtype], rtol=OUT_TOL[dtype])
    torch.testing.assert_close(lse.double(), want_lse.double(), atol=1e-4, rtol=1e-5)


def test_triton_opcheck():
    q, k, v, cu_q, cu_k, causal = _inputs(0, torch.float32, "strided")
    with vtattn.use_backend("triton"):
        torch.library.opcheck(torch.ops.vtattn.varlen_attention.default,
                              (q, k, v, cu_q, cu_k, 20, causal, 0.125, 0.0, -1, None))
        torch.library.opcheck(torch.ops.vtattn.varlen_attention.default,
                              (q, k, v, cu_q, cu_k, 20, causal, 0.125, 2.0, 4, torch.randn(q.shape[1])))
