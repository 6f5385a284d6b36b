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


def test_triton_launcher_refuses_heads_outside_the_pools_or_drops_in_the_window():
    """The C++ kernel's checks of the host's counts, before any launch (a bad run would write out of bounds)."""
    args = make_inputs(*CASES[1], torch.float32)
    bad = clone(args)
    bad[5][1, 2] = bad[0].shape[0] * bad[0].shape[1] - 1  # its run falls off the pools
    with pytest.raises(ValueError, match=r"head \(1, 2\) .* must lie in the pools"):
        run_forced("triton", torch.ops.vtattn.paged_evict, *bad)
    bad = clone(args)
    bad[7][0, 1] = 0  # drops its recent tokens too
    with pytest.raises(ValueError, match=r"head \(0, 1\) .* first lengths - recent \(2\)"):
        run_forced("triton", torch.ops.vtattn.paged_evict, *bad)
    assert all(torch.equal(a, b) for a, b in zip(bad[:4], args[:4])), "nothing is written before the checks"


def test_triton_rows_in_chunks_match_the_reference(monkeypatch):
    """A scratch too small for every query row of a head: the rows run in chunks (here 1 and 3), the keys
    read once a chunk, the same evictions."""
    from vtattn.triton_kernels import paged_evict
    args = make_inputs(*CASES[2], torch.float32, seed=6)  # 4 query heads a kv head, 5 queries: 20 rows
    B, H = args[6].shape
    for rows in (1, 3):
        monkeypatch.setattr(paged_evict, "MAX_LOGITS", rows * B * H * int(args[6].max()))
        got, want = clone(args), clone(args)
        run_forced("triton", torch.ops.vtattn.paged_evict, *got)
        vtattn.reference.paged_evict(*want)
        assert_same_evictions(got, want)
