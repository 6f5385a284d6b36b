"""The Triton paged_decode_attention launcher under TRITON_INTERPRET=1 against vtattn.reference: tiny
pools with shuffled pages, -1 past the used pages, page sizes that do and do not divide the
interpreter's 16-key splits and 32/64-key tiles (so tiles straddle pages)."""
import pytest
import torch

import vtattn.reference as ref
from helpers import OUT_TOL, bad_decode_inputs, poisoned_outputs, run_forced
from vtattn.triton_kernels import paged_decode_attention as triton_paged


def _inputs(B, Hq, Hkv, page, max_pages, D, dtype, lengths, seed, strided=False):
    """Pools of B * Hkv * max_pages pages in a random order, each head owning max_pages of them;
    table entries past a head's used pages are -1."""
    g = torch.Generator().manual_seed(seed)
    n = B * Hkv * max_pages
    q = torch.randn(B, Hq, 1, D, generator=g).to(dtype)
    if strided:  # slots of a wider buffer (k) and an interleaved one (v)
        k = torch.randn(n, page + 2, D + 8, generator=g).to(dtype)[:, :page, :D]
        v = torch.randn(n, page, 2, D, generator=g).to(dtype)[:, :, 0]
    else:
        k, v = (torch.randn(n, page, D, generator=g).to(dtype) for _ in range(2))
    lens = torch.tensor(lengths, dtype=torch.int32).reshape(B, Hkv)
    table = torch.randperm(n, generator=g).to(torch.int32).reshape(B, Hkv, max_pages)
    unused = torch.arange(max_pages) * page >= lens[..., None]
    return q, k, v, table.masked_fill(unused, -1), lens


# (B, Hq, Hkv, page_size, max_pages, D, dtype, lengths, strided)
CASES = [
    (1, 1, 1, 16, 1, 64, torch.float32, [1], False),
    (2, 4, 2, 16, 3, 64, torch.float32, [0, 17, 48, 1], True),
    (1, 8, 1, 5, 10, 72, torch.float32, [33], False),  # group 8, odd page size
    (2, 4, 4, 64, 1, 80, torch.float16, [0, 1, 17, 64, 5, 16, 32, 63], True),
    (1, 8, 2, 32, 3, 128, torch.float16, [70, 3], False),  # group 4
    (2, 4, 2, 1, 40, 64, torch.float16, [40, 0, 17, 1], True),  # pages of one token (CompressedCache's default)
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(map(str, c[:7])).replace("torch.", ""))
def test_paged_decode_attention_matches_reference(case):
    B, Hq, Hkv, page, max_pages, D, dtype, lengths, strided = case
    q, k, v, table, lens = _inputs(B, Hq, Hkv, page, max_pages, D, dtype, lengths, seed=page, strided=strided)
    before = [t.clone() for t in (q, k, v, table, lens)]
    with poisoned_outputs():  # unwritten output elements would be NaN
        out = triton_paged.paged_decode_attention(q, k, v, table, lens, D ** -0.5)
    want = ref.paged_decode_attention(q.double(), k.double(), v.double(), table, lens, D ** -0.5)
    assert out.shape == q.shape and out.dtype == dtype and out.is_contiguous()
    torch.testing.assert_close(out.double(), want, atol=OUT_TOL[dtype], rtol=0)
    empty = (lens == 0).repeat_interleave(Hq // Hkv, dim=1)
    assert torch.equal(out[empty], torch.zeros_like(out[empty]))
    assert all(torch.equal(a, b) for a, b in zip((q, k, v, table, lens), before))


def test_paged_decode_attention_supports():
    q, k, v, table, lens = _inputs(1, 2, 1, 16, 1, 64, torch.float16, [8], seed=0)
    assert triton_paged.supports(q, k, v, table, lens, 0.125) is None
    bf = [t.bfloat16() for t in (q, k, v)]
    assert "interpreter" in triton_paged.supports(*bf, table, lens, 0.125)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_out_of_range_inputs_act_clamped(dtype):
    """Past the public checks (torch.compile, graph capture) the kernels stay inside the pool: lengths act
    clamped to [0, max_pages * page_size], used page ids to [0, num_pages). Called as the registered op,
    which checks nothing; reading past the pool or the table gives NaN."""
    args, clamped = bad_decode_inputs("cpu", dtype, paged=True)
    with poisoned_outputs():
        out = run_forced("triton", torch.ops.vtattn.paged_decode_attention, *args, 0.125)
    want = ref.paged_decode_attention(*(t.double() if t.is_floating_point() else t for t in clamped), 0.125)
    torch.testing.assert_close(out.double(), want, atol=OUT_TOL[dtype], rtol=0)


def test_paged_decode_attention_pages_past_int32():
    """Page 8 of the pool starts at element 2^31 (page stride 2^28): page * stride must be int64. One 4 GiB
    storage, allocated but untouched except for the pages used; k and v are views of it."""
    P, S, D = 9, 8, 16
    try:
        store = torch.empty(((P - 1) << 28) + S * 2 * D, dtype=torch.float16)
    except RuntimeError as e:  # a host that refuses 4 GiB of address space
        pytest.skip(f"cannot reserve 4 GiB: {e}")
    k, v = (store.as_strided((P, S, D), (1 << 28, 2 * D, 1), i * D) for i in range(2))
    g = torch.Generator().manual_seed(0)
    for t in (k, v):
        t.copy_(torch.randn(P, S, D, generator=g))
    q = torch.randn(1, 2, 1, D, generator=g).half()
    table, lens = torch.tensor([[[8, 0, 4]]], dtype=torch.int32), torch.tensor([[20]], dtype=torch.int32)
    out = triton_paged.paged_decode_attention(q, k, v, table, lens, D ** -0.5)
    want = ref.paged_decode_attention(q.double(), k.double(), v.double(), table, lens, D ** -0.5)
    torch.testing.assert_close(out.double(), want, atol=OUT_TOL[torch.float16], rtol=0)
