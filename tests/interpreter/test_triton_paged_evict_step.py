"""The Triton paged_evict_step launcher under TRITON_INTERPRET=1 against vtattn.reference: odd head
dims and page sizes, GQA, steps that evict and steps that do not, recent windows of 0 and more,
strided pools and queries, ties, a decode of several steps; and a static DecodeH2O cache decoding
on it as on the C++ kernel."""
import os

import pytest
import torch

import vtattn
from vtattn import kv
from helpers import run_forced
from test_paged_evict_step import CASES, LAYOUTS, assert_same_steps, clone, make_inputs

pytestmark = [pytest.mark.interpreter,
              pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="needs TRITON_INTERPRET=1")]


@pytest.mark.parametrize("due", [True, False], ids=["due", "between"])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(map(str, c)))
def test_triton_paged_evict_step_matches_reference(case, dtype, layout, due):
    args = make_inputs(*case, dtype, "cpu", layout, seed=sum(case), due=due)
    got, want = clone(args), clone(args)
    run_forced("triton", torch.ops.vtattn.paged_evict_step, *got)
    vtattn.reference.paged_evict_step(*want)
    assert_same_steps(got, want)
    assert torch.equal(got[4], args[4]), "q must not be modified"


def test_triton_ties_go_as_in_the_reference():
    args = make_inputs(*CASES[2], torch.float32, ties=True)
    got, want = clone(args), clone(args)
    run_forced("triton", torch.ops.vtattn.paged_evict_step, *got)
    vtattn.reference.paged_evict_step(*want)
    assert_same_steps(got, want)


def test_static_decode_h2o_cache_decodes_as_on_the_cpp_kernel():
    pytest.importorskip("transformers")
    from vtattn.kv.cache import CompressedCache
    g = torch.Generator().manual_seed(5)
    B, Hq, Hkv, L, D = 2, 4, 2, 19, 16
    q, k, v = (torch.randn(B, h, L, D, generator=g) for h in (Hq, Hkv, Hkv))
    steps = [tuple(torch.randn(B, h, 1, D, generator=g) for h in (Hq, Hkv, Hkv)) for _ in range(7)]
    results = []
    for backend in ("cpp", "triton"):
        cache = CompressedCache(kv.DecodeH2O(kv.SnapKV(0.4, window=3), every=3, recent=2), page_size=4,
                                max_new_tokens=20)
        with vtattn.use_backend(backend):
            cache.update(k, v, 0)
            cache.layers[0].attend(q, k, v, None, D ** -0.5)
            for qn, kn, vn in steps:
                cache.layers[0].update(kn, vn)
                cache.layers[0].attend(qn, None, None, None, D ** -0.5)
        results.append((cache.kept_positions(0), cache.layers[0].pages.lengths))
    assert torch.equal(results[1][0], results[0][0]) and torch.equal(results[1][1], results[0][1])
