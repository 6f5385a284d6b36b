"""The Triton backend of paged_decode_step (the paged_append and paged_decode_attention launchers in
turn) under TRITON_INTERPRET=1 against vtattn.reference: GQA, odd head dims and page sizes, strided
rows and pools, clamped heads, with and without scores."""
import os

import pytest
import torch

import vtattn
from helpers import OUT_TOL, run_forced
from test_paged_append import assert_same_writes, clone
from test_paged_decode_step import CASES, make_step

pytestmark = [pytest.mark.interpreter,
              pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="needs TRITON_INTERPRET=1")]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)  # (the interpreter refuses bf16 dots)
@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(map(str, c)))
def test_triton_paged_decode_step_matches_reference(dtype, case):
    args = make_step(*case[:5], dtype, "cpu", *case[5:], seed=sum(case[:5]))
    got, want = clone(args), clone(args)
    out = run_forced("triton", torch.ops.vtattn.paged_decode_step, *got)
    ref = vtattn.reference.paged_decode_step(*want)
    assert_same_writes(got[1:11], want[1:11])
    torch.testing.assert_close(out.double(), ref.double(), atol=OUT_TOL[dtype], rtol=0)
