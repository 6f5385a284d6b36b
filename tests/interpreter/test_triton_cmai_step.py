"""The Triton cmai_step launcher under TRITON_INTERPRET=1 against vtattn.reference: the cases of
tests/test_cmai_step.py in every dtype and layout, decode steps in a row, the budget's rounding (half
to even in fp64, as Python's round), ties and NaN focus, rows without a token, and what supports()
refuses."""
import os
import struct

import pytest
import torch

import vtattn
from helpers import run_forced
import test_cmai_step
from test_cmai_step import CASES, LAYOUTS, check_step, clone, make_inputs
from vtattn.triton_kernels import cmai_step as kernels
from vtattn.triton_kernels._common import tl, triton

pytestmark = [pytest.mark.interpreter,
              pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="needs TRITON_INTERPRET=1")]


def _run(args):
    """(out, written args) of the Triton backend and (out, written args) of the reference."""
    got, want = clone(args), clone(args)
    out = run_forced("triton", torch.ops.vtattn.cmai_step, *got)
    return out, got, vtattn.reference.cmai_step(*want), want


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(map(str, c)))
def test_triton_cmai_step_matches_reference(case, dtype, layout):
    if case == CASES[3] and (dtype, layout) not in ((torch.float32, "contiguous"), (torch.bfloat16, "strided")):
        pytest.skip("the widest case in two of its six combinations (the interpreter's time)")
    args = make_inputs(*case, dtype=dtype, layout=layout, seed=sum(case[:7]))
    assert kernels.supports(*args) is None
    out, got, want_out, want = _run(args)
    assert out.dtype == torch.float32 and out.shape == args[0].shape
    check_step(got, out, args, want_out, want[9], 2e-5)


def test_triton_steps_in_a_row_follow_the_reference():
    test_cmai_step.test_steps_in_a_row_follow_the_reference("cpu", "triton")


@triton.jit
def _budgets(N, Out, keep_bits, count, BLOCK: tl.constexpr):
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    keep = tl.cast(keep_bits, tl.int64).to(tl.float64, bitcast=True)
    tl.store(Out + i, kernels._budget(keep, tl.load(N + i, mask=i < count, other=0)), mask=i < count)


@pytest.mark.parametrize("keep", [0.1, 0.15, 0.25, 0.3, 0.45, 0.5, 0.7, 1 / 3, 0.05, 1e-7, 0.9999999, 1.0, 0.3141592])
def test_budget_rounds_as_python_for_every_count_to_2_20(keep):
    """The kernel's budget of n = 0 .. 2^20 visible keys against the reference's (torch.round of the fp64
    product: half to even, as Python's round); keep 0.1 at n = 25 is 2.5000000373 in fp32, 2.5 in fp64."""
    n = torch.arange(2**20 + 1, dtype=torch.int32)
    got = torch.empty(n.shape, dtype=torch.int64)
    bits = struct.unpack("<q", struct.pack("<d", keep))[0]
    _budgets[(triton.cdiv(n.numel(), 2**16),)](n, got, bits, n.numel(), BLOCK=2**16)
    want = torch.round(keep * n.double()).clamp(min=1).long().masked_fill(n == 0, 0)
    assert torch.equal(got, want)
    assert all(int(got[m]) == max(1, round(keep * m)) for m in range(1, 2**20, 997))


@pytest.mark.parametrize("keep", [0.1, 0.15, 0.25, 0.45, 0.5, 0.7])
@pytest.mark.parametrize("n", [1, 2, 5, 10, 25, 30, 63])
def test_kept_count_rounds_half_to_even(n, keep):
    """A row that sees n image keys keeps max(1, round(keep * n)), counted through one-hot values (each
    image key's value its own unit vector, the text values 0), as tests/test_cmai_step.py does."""
    args = list(make_inputs(1, 2, 2, 1, 3, n, 64, keep, 0.0, seed=3))
    args[3], args[4] = torch.tensor([[100, 101, 102]]), torch.ones(1, 3, dtype=torch.bool)
    args[7], args[8] = torch.arange(n)[None], torch.ones(1, n, dtype=torch.bool)
    args[2], args[6] = torch.zeros_like(args[2]), torch.eye(n, 64).expand(1, 2, n, 64)
    out = run_forced("triton", torch.ops.vtattn.cmai_step, *clone(args))
    assert ((out[0, :, 0, :n] > 0).sum(-1) == max(1, round(keep * n))).all()


def _one_hot_row(I, D=16):
    """One row (3 text entries) seeing I image keys whose values are unit vectors: out > 0 marks the kept keys."""
    args = list(make_inputs(1, 2, 1, 1, 3, I, D, 0.5, 0.0, seed=4))
    args[3], args[4] = torch.tensor([[100, 101, 102]]), torch.ones(1, 3, dtype=torch.bool)
    args[7], args[8] = torch.arange(I)[None], torch.ones(1, I, dtype=torch.bool)
    args[2], args[6] = torch.zeros_like(args[2]), torch.eye(I, D).expand(1, 1, I, D)
    return args


def test_ties_go_to_the_lower_index():
    """Equal focus everywhere (zero queries, identical keys, uniform earlier P_ti rows): the lowest visible
    indices stay (entries 0 and 3 hold no token)."""
    args = _one_hot_row(10)
    args[0], args[1], args[5] = torch.zeros_like(args[0]), torch.zeros_like(args[1]), torch.zeros_like(args[5])
    args[8] = torch.tensor([[i not in (0, 3) for i in range(10)]])
    args[9] = torch.full_like(args[9], 0.1)
    out, got, want_out, want = _run(tuple(args))
    check_step(got, out, tuple(args), want_out, want[9], 1e-6)
    assert torch.equal((out[0, :, 0, :10] > 0).nonzero()[:, 1].unique(), torch.tensor([1, 2, 4, 5]))


def test_nan_focus_ranks_above_every_number():
    args = _one_hot_row(10)
    args[9][0, :, 0, 7] = float("nan")  # text entry 0's P_ti on image key 7: a NaN focus for key 7
    out, got, want_out, want = _run(tuple(args))
    torch.testing.assert_close(out, want_out, rtol=2e-5, atol=2e-5)
    torch.testing.assert_close(got[9], want[9], rtol=2e-5, atol=2e-5, equal_nan=True)
    assert (out[0, :, 0, 7] > 0).all() and out.isfinite().all()


def test_rows_without_a_token_give_zeros():
    args = list(make_inputs(*CASES[2], seed=5))
    args[4] = args[4].clone()
    args[4][:, -3:] = False  # every row of every sample
    args[9][:, :, -3:] = float("nan")
    out, got, want_out, want = _run(tuple(args))
    check_step(got, out, tuple(args), want_out, want[9], 2e-5)
    assert not out.any() and not got[9][:, :, -3:].any()


def test_supports_refuses_with_a_reason():
    args = make_inputs(*CASES[2])
    meta = lambda *shape: torch.empty(shape, device="meta")  # noqa: E731
    for i, value, match in ((0, args[0].double(), "must share one of fp16/bf16/fp32"),
                            (5, args[5].half(), "must share one of fp16/bf16/fp32"),
                            (3, args[3].int(), "text / image must be int64"),
                            (8, args[8].long(), "text / image must be int64"),
                            (9, args[9].half(), "p_ti float32"),
                            (0, meta(2, 6, 3, 512), "head dim 512 > 256"),
                            (0, meta(65536, 32768, 3, 40), "at most 2147483647 programs"),
                            (0, meta(2, 6, 3, 40), "different devices")):
        bad = list(args)
        bad[i] = value
        assert match in kernels.supports(*bad), (i, match)
