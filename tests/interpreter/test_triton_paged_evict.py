"""The Triton paged_evict launcher under TRITON_INTERPRET=1 against vtattn.reference: odd page sizes
and head dims, GQA, several queries (causal by position), heads of different lengths (empty, nothing
dropped, recent window 0 or more), strided queries and pools, ties, the pools' counts."""
import os

import pytest
import torch

import vtattn
from helpers import run_forced
from test_paged_evict import CASES, LAYOUTS, assert_same_evictions, clone, make_inputs, with_counts

pytestmark = [pytest.mark.interpreter,
              pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="needs TRITON_INTERPRET=1")]


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(map(str, c)))
def test_triton_paged_evict_matches_reference(case, dtype, layout):
    args = make_inputs(*case, dtype, "cpu", layout, seed=sum(case))
    got, want = clone(args), clone(args)
    run_forced("triton", torch.ops.vtattn.paged_evict, *got)
    vtattn.reference.paged_evict(*want)
    assert_same_evictions(got, want)
    assert torch.equal(got[4], args[4]), "queries must not be modified"


@pytest.mark.parametrize("ties", [False, True], ids=["random", "ties"])
def test_triton_paged_evict_sets_the_pools_counts(ties):
    args = make_inputs(*CASES[2], torch.float32, seed=4, ties=ties)
    got, want = clone(with_counts(args, "cpu")), clone(args)
    run_forced("triton", torch.ops.vtattn.paged_evict, *got)
    vtattn.reference.paged_evict(*want)
    assert_same_evictions(got, want)
    head_start, keep = args[5], args[7]
    assert torch.equal(got[11], keep.int()) and torch.equal(got[12], head_start + keep)
