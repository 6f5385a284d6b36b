"""Triton merge_tokens under TRITON_INTERPRET=1 (tiny shapes; 16 x 16 similarity tiles)."""
import os

import pytest
import torch

import vtattn
from helpers import poisoned_outputs, run_forced

pytestmark = [pytest.mark.interpreter,
              pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="needs TRITON_INTERPRET=1")]

TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def _inputs(B, N, C, Ck, keep, x_dtype, key_dtype, seed):
    g = torch.Generator().manual_seed(seed)
    budget = {"keep_tokens": keep} if isinstance(keep, torch.Tensor) else {"keep": keep}
    sel = vtattn.select_tokens(torch.randn(B, N, generator=g), **budget)
    keys = torch.randn(B, N, Ck, generator=g)
    for b in range(B):  # pruned keys near a kept key: clear winners; one exact tie between two kept keys
        kept = sel.indices[b, :int(sel.counts[b])]
        pruned = (~sel.mask[b]).nonzero().flatten()
        keys[b, kept[1]] = keys[b, kept[0]]
        target = kept[torch.randint(0, len(kept), (len(pruned),), generator=g)]
        keys[b, pruned] = keys[b, target] + 0.05 * torch.randn(len(pruned), Ck, generator=g)
        keys[b, pruned[::4]] *= -1  # negative cosines: weight 0 in "weighted"
    return torch.randn(B, N, C, generator=g).to(x_dtype), keys.to(key_dtype), sel


@pytest.mark.parametrize("x_dtype,key_dtype", [(torch.float32, torch.float32), (torch.float16, torch.float16),
                                               (torch.bfloat16, torch.float32)], ids=str)
@pytest.mark.parametrize("mode", ["mean", "weighted"])
@pytest.mark.parametrize("keep", [0.3, "per_sample"])
def test_triton_merge_matches_reference(x_dtype, key_dtype, mode, keep):
    B, N, C, Ck = 2, 37, 20, 24
    if keep == "per_sample":
        keep = torch.tensor([2, 19])
    x, keys, sel = _inputs(B, N, C, Ck, keep, x_dtype, key_dtype, seed=3)
    with poisoned_outputs():
        got = run_forced("triton", vtattn.merge_tokens, x, sel, keys=keys, mode=mode)
    want = run_forced("torch", vtattn.merge_tokens, x, sel, keys=keys, mode=mode)
    torch.testing.assert_close(got, want, atol=TOL[x_dtype], rtol=TOL[x_dtype])


def test_bf16_keys_refused_under_interpreter():
    x, keys, sel = _inputs(1, 20, 8, 16, 0.5, torch.float32, torch.bfloat16, seed=0)
    with pytest.raises(vtattn.BackendUnavailable, match="bf16 tl.dot"):
        run_forced("triton", vtattn.merge_tokens, x, sel, keys=keys)


def test_triton_opcheck():
    x, keys, sel = _inputs(2, 20, 8, 16, 0.5, torch.float32, torch.float32, seed=1)
    with vtattn.use_backend("triton"):
        torch.library.opcheck(torch.ops.vtattn.merge_tokens.default, (x, keys, sel.indices, sel.mask, True))
