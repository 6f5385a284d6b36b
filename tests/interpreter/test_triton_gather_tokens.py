"""Triton gather_tokens under TRITON_INTERPRET=1 (tiny shapes)."""
import os

import pytest
import torch

import vtattn
from helpers import poisoned_outputs, run_forced

pytestmark = [pytest.mark.interpreter,
              pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="needs TRITON_INTERPRET=1")]


def _x(B, N, C, dtype, layout):
    if layout == "transposed":
        return torch.randn(B, C, N).to(dtype).transpose(1, 2)
    if layout == "sliced":
        return torch.randn(B, N, C + 5).to(dtype)[..., 1:C + 1]
    return torch.randn(B, N, C).to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize("layout", ["contiguous", "transposed", "sliced"])
@pytest.mark.parametrize("keep", [0.3, "per_sample"])
def test_triton_gather_matches_reference(dtype, layout, keep):
    B, N, C = 3, 23, 37
    keep = {"keep_tokens": torch.tensor([1, N, 7])} if keep == "per_sample" else {"keep": keep}
    sel = vtattn.select_tokens(torch.randn(B, N), **keep)
    x = _x(B, N, C, dtype, layout)
    for packed in (False, True):
        with poisoned_outputs():
            got = run_forced("triton", vtattn.gather_tokens, x, sel, packed=packed)
        want = run_forced("torch", vtattn.gather_tokens, x, sel, packed=packed)
        assert torch.equal(got[0], want[0]) if packed else torch.equal(got, want)


def test_triton_opcheck():
    x = torch.randn(2, 9, 6)
    sel = vtattn.select_tokens(torch.randn(2, 9), keep_tokens=torch.tensor([2, 5]))
    with vtattn.use_backend("triton"):
        for args in ((x, sel.indices, None, 0), (x, sel.indices, sel.cu_seqlens, 7)):
            torch.library.opcheck(torch.ops.vtattn.gather_tokens.default, args)
