"""Triton select_tokens under TRITON_INTERPRET=1 (tiny shapes; 16-token tiles, so several tiles)."""
import os

import pytest
import torch

import vtattn
from helpers import poisoned_outputs, run_forced

pytestmark = [pytest.mark.interpreter,
              pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="needs TRITON_INTERPRET=1")]

# (B, N, segments, keep, ties)
CASES = [
    (2, 1, None, 1.0, False),
    (3, 37, None, 0.3, True),
    (2, 37, [5, 1, 31], 1, True),
    (3, 40, [17, 23], "per_segment", False),
    (3, 37, None, "per_sample", True),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", range(len(CASES)))
@pytest.mark.parametrize("sort", [True, False])
def test_triton_select_matches_reference(dtype, case, sort):
    B, N, segments, keep, ties = CASES[case]
    g = torch.Generator().manual_seed(case)
    scores = (torch.randint(0, 3, (B, N), generator=g).float() if ties else torch.randn(B, N, generator=g)).to(dtype)
    if keep == "per_segment":
        keep = torch.stack([torch.randint(0, n + 1, (B,), generator=g) for n in segments], 1)
        keep[:, 0] = keep[:, 0].clamp(min=1)
    elif keep == "per_sample":
        keep = torch.randint(1, N + 1, (B,), generator=g)
    keep = {"keep": keep} if isinstance(keep, float) else {"keep_tokens": keep}  # a ratio, else counts
    with poisoned_outputs():
        got = run_forced("triton", vtattn.select_tokens, scores, **keep, segments=segments, sort=sort)
    want = run_forced("torch", vtattn.select_tokens, scores, **keep, segments=segments, sort=sort)
    for name, a, b in zip(got._fields, got, want):
        assert torch.equal(a, b), name


def test_triton_opcheck():
    args = (torch.randn(2, 20), torch.tensor([[1, 4], [3, 0]]), [8, 12], 5, False)
    with vtattn.use_backend("triton"):
        torch.library.opcheck(torch.ops.vtattn.select_tokens.default, args)
