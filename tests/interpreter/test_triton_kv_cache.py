"""A CompressedCache layer read by the Triton kernels under TRITON_INTERPRET=1: the prefill
(attention + LSE for the scores), the compression and the reads of the paged pool (index reads of
a stride-0 expanded pool) give the C++ kernels' results."""
import os

import pytest
import torch

import vtattn
from vtattn import kv

pytest.importorskip("transformers")
from vtattn.kv.cache import CompressedCache, CompressedLayer  # noqa: E402

pytestmark = [pytest.mark.interpreter,
              pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="needs TRITON_INTERPRET=1")]


def _run(backend, q, k, v, steps):
    cache = CompressedCache(kv.SnapKV(0.4, window=3), page_size=4, room=3)
    layer = CompressedLayer(cache, 0, cache.policy)
    D = q.shape[-1]
    with vtattn.use_backend(backend):
        layer.update(k, v)
        outs = [layer.attend(q, k, v, None, D ** -0.5)]
        for qn, kn, vn in steps:
            layer.update(kn, vn)
            outs.append(layer.attend(qn, None, None, None, D ** -0.5))
    return outs, layer.pages.positions()


def test_compressed_layer_triton_matches_cpp():
    g = torch.Generator().manual_seed(0)
    B, Hq, Hkv, L, D = 2, 4, 2, 23, 16
    q, k, v = (torch.randn(B, h, L, D, generator=g) for h in (Hq, Hkv, Hkv))
    steps = [tuple(torch.randn(B, h, n, D, generator=g) for h in (Hq, Hkv, Hkv)) for n in (1, 2, 1, 1)]
    want, want_pos = _run("cpp", q, k, v, steps)
    got, got_pos = _run("triton", q, k, v, steps)
    assert torch.equal(got_pos, want_pos)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
