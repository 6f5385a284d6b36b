"""paged_decode_step (a compressed layer's decode step: paged_append, then paged_decode_attention, in
one op call) against its reference, the two references in turn: writes exactly, the output within
attention's tolerance; GQA, odd head dims and page sizes, strided rows and pools, clamped heads."""
import pytest
import torch

import vtattn
from vtattn import kv
from vtattn._registry import PAGED_DECODE_STEP
from helpers import DTYPES, OUT_TOL, backend_params, run_forced, skip_unless_supported
from test_paged_append import assert_same_writes, clone, make_inputs


def make_step(B, Hkv, G, D, ps, dtype, device="cpu", last=True, score=True, layout="contiguous", seed=0):
    """paged_append's inputs for one token per head (test_paged_append.make_inputs), a query of G
    heads per kv head, and the table of every head's run of pages (its first page on: each head
    owns whole pages from slot next_slot - lengths), as many entries as its length after the write."""
    append = make_inputs(B, Hkv, 1, D, ps, dtype, "cpu", last, score, layout, seed)
    next_slot, lengths = append[3], append[4]
    first = (next_slot - lengths) // ps  # [B, Hkv] pages
    entries = -(-(lengths.long() + 1) // ps)
    i = torch.arange(int(entries.max()))
    P = append[0].shape[0]
    table = torch.where(i < entries[..., None], (first[..., None] + i).clamp(max=P - 1), -1).int()
    g = torch.Generator().manual_seed(seed + 1)
    q = torch.randn(B, 1, Hkv * G, D, generator=g).to(dtype).transpose(1, 2)  # transformers' strides
    args = (q, *append, table, 0.3)
    return tuple(a.to(device) if isinstance(a, torch.Tensor) else a for a in args)


CASES = [  # (B, Hkv, G, D, page_size, last, score, layout)
    (3, 5, 1, 72, 16, True, True, "contiguous"),
    (3, 2, 4, 40, 5, True, False, "strided"),
    (2, 3, 2, 72, 5, False, True, "contiguous"),
    (1, 2, 3, 128, 16, False, False, "strided"),
    (2, 2, 4, 64, 1, True, True, "contiguous"),  # pages of one token (CompressedCache's default)
]


def _writes(args):
    return args[1:11]  # paged_append's arguments


@pytest.mark.parametrize("device,backend", backend_params(PAGED_DECODE_STEP))
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(map(str, c)))
def test_paged_decode_step_matches_reference(device, backend, dtype, case):
    args = make_step(*case[:5], dtype, device, *case[5:], seed=sum(case[:5]))
    skip_unless_supported(PAGED_DECODE_STEP, args, backend)
    got, want = clone(args), clone(args)
    out = run_forced(backend, torch.ops.vtattn.paged_decode_step, *got)
    ref = vtattn.reference.paged_decode_step(*want)
    assert_same_writes(_writes(got), _writes(want))
    torch.testing.assert_close(out.double().cpu(), ref.double().cpu(), atol=OUT_TOL[dtype], rtol=0)
    assert torch.equal(got[0], args[0]) and torch.equal(got[6], args[6]), "q and k must not be modified"


def test_reference_is_the_write_then_the_read():
    args = make_step(2, 2, 3, 40, 5, torch.float32)
    got, want = clone(args), clone(args)
    out = vtattn.reference.paged_decode_step(*got)
    vtattn.reference.paged_append(*_writes(want))
    q, table, scale = want[0], want[11], want[12]
    assert torch.equal(out, vtattn.reference.paged_decode_attention(q, want[1], want[2], table, want[5], scale))
    assert_same_writes(_writes(got), _writes(want))


def test_opcheck():
    args = make_step(2, 3, 2, 40, 5, torch.float32, last=False)
    torch.library.opcheck(torch.ops.vtattn.paged_decode_step.default, clone(args))


def test_grad_requiring_inputs_are_refused_by_name():
    args = make_step(2, 3, 1, 40, 5, torch.float32)
    with pytest.raises(RuntimeError, match="vtattn.paged_decode_step has no gradient"):
        torch.ops.vtattn.paged_decode_step(args[0].clone().requires_grad_(), *args[1:])


def test_compiled_step_equals_eager():
    """Mutating and returning under torch.compile: the writes land in the caller's tensors."""
    args = make_step(2, 3, 2, 40, 5, torch.float32)
    got, want = clone(args), clone(args)
    out = torch.compile(lambda *a: torch.ops.vtattn.paged_decode_step(*a), fullgraph=True, backend="aot_eager")(*got)
    ref = vtattn.reference.paged_decode_step(*want)
    assert_same_writes(_writes(got), _writes(want))
    torch.testing.assert_close(out, ref, atol=OUT_TOL[torch.float32], rtol=0)


def test_a_compressed_layer_decode_step_is_one_op_call(monkeypatch):
    """CompressedLayer: update keeps the token, its attention writes and reads it in one op call; the
    backend choice is made once over steps of two layers of different sizes, and kept when they grow
    (the stamp names the layout's class, not its size)."""
    from vtattn import _dispatch
    from vtattn.kv import CompressedCache, pages
    from vtattn.patch import core
    calls = []
    monkeypatch.setattr(pages, "_APPEND", lambda *a, stamp: calls.append("append"))
    g = torch.Generator().manual_seed(0)
    cache = CompressedCache([None, kv.SnapKV(0.3, window=2)], page_size=4, room=1)  # (growing within the steps)

    def step(i, q, k, v):  # as a model's layer runs it: update, then the attention that claims the keys
        keys, values = cache.update(k, v, i)
        layer = core.claim(keys)
        assert layer is cache.layers[i]
        return layer.attend(q, keys, values, None, None)

    seen = []  # layer 0 keeps everything: its k, v so far
    for i in range(2):
        q, k, v = (torch.randn(1, 2, 6 + 4 * i, 8, generator=g) for _ in range(3))
        step(i, q, k, v)
        seen = seen or [k, v]
    assert cache.layers[0].pages.k.shape[0] != cache.layers[1].pages.k.shape[0]  # pools of other sizes
    chosen = []
    real = _dispatch.choose
    monkeypatch.setattr(_dispatch, "choose", lambda *a: chosen.append(a[0]) or real(*a))
    _dispatch.clear_cache()  # (an earlier test's steps may have chosen for this class)
    sizes = [layer.pages.k.shape[0] for layer in cache.layers]
    for _ in range(6):
        for i in range(2):
            q1, k1, v1 = (torch.randn(1, 2, 1, 8, generator=g) for _ in range(3))
            before = cache.layers[i].pages.positions().shape[-1]
            out = step(i, q1, k1, v1)
            assert cache.layers[i].pages.positions().shape[-1] == before + 1
            if i == 0:
                seen = [torch.cat([t, t1], 2) for t, t1 in zip(seen, (k1, v1))]
                torch.testing.assert_close(out, vtattn.reference.attention(q1, *seen, False, 8 ** -0.5, 0.0, -1,
                                                                           None)[0])
    assert [layer.pages.k.shape[0] for layer in cache.layers] != sizes  # the pools grew
    assert chosen.count("paged_decode_step") == 1  # once for both layers, before and after growth
    assert calls == []  # no separate write


def test_cpp_backend_refuses_bad_slots_and_pages_by_name():
    """The internal op's arguments are valid by construction; the C++ parts still check what would read
    or write outside the pools: a slot outside the pools (raised before any write), a table entry
    outside the pool (raised by the read, after the write: the op is internal, its callers never get here)."""
    args = make_step(2, 3, 2, 40, 5, torch.float32, last=False)
    skip_unless_supported(PAGED_DECODE_STEP, args, "cpp")
    bad = clone(args)
    bad[4][1, 2] = bad[1].shape[0] * bad[1].shape[1]  # next_slot past the pools
    before = clone(bad)
    with pytest.raises(RuntimeError, match=r"head \(1, 2\) writes slots .* outside the pools"):
        torch.ops.vtattn_C.paged_decode_step(*bad)
    assert_same_writes(_writes(bad), _writes(before))
    bad = clone(args)
    bad[11][0, 0, 0] = bad[1].shape[0]  # a used page id outside the pool
    with pytest.raises(RuntimeError, match=r"block_table\[0, 0, 0\] = .* is outside"):
        torch.ops.vtattn_C.paged_decode_step(*bad)
