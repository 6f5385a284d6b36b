"""The Triton paged_append launcher under TRITON_INTERPRET=1 against vtattn.reference: odd head dims
and page sizes, one and three tokens, strided rows and pools, clamped heads, with and without scores."""
import os

import pytest
import torch

import vtattn
from helpers import run_forced
from test_paged_append import CASES, assert_same_writes, clone, make_inputs

pytestmark = [pytest.mark.interpreter,
              pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="needs TRITON_INTERPRET=1")]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(map(str, c)))
def test_triton_paged_append_matches_reference(dtype, case):
    args = make_inputs(*case[:5], dtype, "cpu", *case[5:], seed=sum(case[:5]))
    got, want = clone(args), clone(args)
    run_forced("triton", torch.ops.vtattn.paged_append, *got)
    vtattn.reference.paged_append(*want)
    assert_same_writes(got, want)
