"""paged_evict (decode-time H2O eviction of kv.pages.Pages) against its reference, and the reference
against a plain per-head loop: odd page sizes and head dims, GQA, several queries, heads of
different lengths (empty, nothing dropped, recent window 0 or more), strided queries and pools,
ties. The moves are copies, so k, v and pos match exactly; scores within fp32 rounding."""
import numpy as np
import pytest
import torch

import vtattn
from vtattn._registry import PAGED_EVICT
from helpers import DTYPES, backend_params, run_forced, skip_unless_supported

START = 500


def make_inputs(B, H, G, n, D, ps, recent, dtype, device="cpu", layout="contiguous", seed=0, ties=False):
    """Each head owns a run of 1-4 whole pages, filled to a random length (head (0, 0) empty, head
    (0, 1) full and keeping everything), its tokens at distinct random positions below START + n (so
    queries see more and more of them), and keeps a random count the recent window allows. layout
    "strided": queries are a view of [B, n, Hq, D] storage, pools and pos views of wider buffers.
    ties: zero queries and equal scores (uniform attention: equal masses among equally seen tokens)."""
    g = torch.Generator().manual_seed(seed)
    pages = torch.randint(1, 5, (B, H), generator=g)
    first = (pages.flatten().cumsum(0) - pages.flatten()).view(B, H) * ps
    lengths = (torch.rand(B, H, generator=g) * (pages * ps + 1)).long().clamp(max=pages * ps)
    lengths[0, 0] = 0
    droppable = (lengths - recent).clamp(min=0)
    keep = lengths - (torch.rand(B, H, generator=g) * (droppable + 1)).long().clamp(max=droppable)
    if H > 1:
        lengths[0, 1], keep[0, 1] = pages[0, 1] * ps, pages[0, 1] * ps
    P = int(pages.sum()) + 1  # a spare page after the last head's: untouched
    pos = torch.randperm(START + n, generator=g)[:P * ps].repeat(2)[:P * ps].view(P, ps)
    if layout == "strided":
        k_pages = torch.randn(P, ps + 2, D + 8, generator=g).to(dtype)[:, 1:ps + 1, 3:D + 3]
        v_pages = torch.randn(P, ps, 2, D, generator=g).to(dtype)[:, :, 1]
        pos = torch.cat([pos, pos], 1)[:, ::2]
        queries = torch.randn(B, n, G * H, D, generator=g).to(dtype).transpose(1, 2)
    else:
        k_pages, v_pages = (torch.randn(P, ps, D, generator=g).to(dtype) for _ in range(2))
        queries = torch.randn(B, G * H, n, D, generator=g).to(dtype)
    score = torch.rand(P, ps, generator=g)
    if ties:
        queries, score = torch.zeros_like(queries), torch.ones_like(score)
    dev = [t.to(device) for t in (k_pages, v_pages, pos, score, queries)]
    return (*dev, first, lengths, keep, START, recent, D ** -0.5)


def clone(args):
    return tuple(a.clone() if isinstance(a, torch.Tensor) else a for a in args)


def assert_same_evictions(got, want, rtol=1e-5, atol=1e-6):
    for i in range(3):  # k_pages, v_pages, pos: copies, so the selection must agree exactly
        assert torch.equal(got[i].cpu(), want[i].cpu()), f"argument {i} differs"
    torch.testing.assert_close(got[3].cpu(), want[3].cpu(), rtol=rtol, atol=atol)


def naive(args):
    """The semantics as a loop over heads, queries and tokens (float64 mass), on copies."""
    k_pages, v_pages, pos, score, queries, first, lengths, keep, start, recent, scale = clone(args)
    ps, H = k_pages.shape[1], lengths.shape[1]
    G, n = queries.shape[1] // H, queries.shape[2]
    at = lambda s: (s // ps, s % ps)  # noqa: E731
    for b in range(lengths.shape[0]):
        for h in range(H):
            L, s0, kept = int(lengths[b, h]), int(first[b, h]), int(keep[b, h])
            mass = [0.0] * L
            for q in queries[b, h * G:(h + 1) * G].double() * scale:
                for i in range(n):
                    seen = [t for t in range(L) if int(pos[at(s0 + t)]) <= start + i]
                    if seen:
                        p = torch.stack([q[i] @ k_pages[at(s0 + t)].double() for t in seen]).softmax(0)
                        for t, pt in zip(seen, p.tolist()):
                            mass[t] += pt
            sc = [float(score[at(s0 + t)]) + mass[t] / G for t in range(L)]
            order = sorted(range(max(L - recent, 0)), key=lambda t: (sc[t], t))
            kept_tokens = [t for t in range(L) if t not in order[:L - kept]]
            old = [(k_pages[at(s0 + t)].clone(), v_pages[at(s0 + t)].clone(), int(pos[at(s0 + t)])) for t in range(L)]
            for t in range(L):
                src = kept_tokens[t] if t < kept else t
                k_pages[at(s0 + t)], v_pages[at(s0 + t)] = old[src][0], old[src][1]
                pos[at(s0 + t)] = old[src][2] if t < kept else -1
                score[at(s0 + t)] = sc[src]
    return k_pages, v_pages, pos, score


CASES = [  # (B, H, G, n, D, page_size, recent)
    (2, 3, 1, 1, 64, 16, 0),
    (2, 3, 4, 2, 80, 3, 2),
    (3, 2, 4, 5, 128, 16, 3),
    (1, 4, 1, 3, 128, 3, 0),
    (2, 2, 2, 4, 64, 16, 40),  # a window longer than most heads: they keep everything
]
LAYOUTS = ["contiguous", "strided"]


@pytest.mark.parametrize("ties", [False, True], ids=["random", "ties"])
@pytest.mark.parametrize("case", CASES[:4], ids=lambda c: "-".join(map(str, c)))
def test_reference_matches_a_naive_loop(case, ties):
    args = make_inputs(*case, torch.float32, seed=sum(case), ties=ties)
    got = clone(args)
    vtattn.reference.paged_evict(*got)
    assert_same_evictions(got, naive(args))
    lengths, keep = args[6], args[7]
    assert (keep < lengths).any() and (keep == lengths).any()  # the cases drop in some heads, not all


@pytest.mark.parametrize("device,backend", backend_params(PAGED_EVICT))
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(map(str, c)))
def test_paged_evict_matches_reference(device, backend, dtype, layout, case):
    args = make_inputs(*case, dtype, device, layout, seed=sum(case))
    skip_unless_supported(PAGED_EVICT, args, backend)
    got, want = clone(args), clone(args)
    run_forced(backend, torch.ops.vtattn.paged_evict, *got)
    vtattn.reference.paged_evict(*want)
    assert_same_evictions(got, want)
    assert torch.equal(got[4], args[4]), "queries must not be modified"


@pytest.mark.parametrize("device,backend", backend_params(PAGED_EVICT))
def test_ties_go_as_in_the_reference(device, backend):
    args = make_inputs(*CASES[2], torch.float32, device, ties=True)
    skip_unless_supported(PAGED_EVICT, args, backend)
    got, want = clone(args), clone(args)
    run_forced(backend, torch.ops.vtattn.paged_evict, *got)
    vtattn.reference.paged_evict(*want)
    assert_same_evictions(got, want)


def with_counts(args, device):
    """args plus the pools' own counts to set, as views of wider [H, B] buffers (any strides)."""
    B, H = args[6].shape
    counts = torch.full((H, 3 * B), -7, dtype=torch.int32, device=device)[:, ::3].t()
    next_slot = torch.full((H, B), -7, dtype=torch.int64, device=device).t()
    return (*args, counts, next_slot)


@pytest.mark.parametrize("device,backend", backend_params(PAGED_EVICT))
@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(map(str, c)))
def test_paged_evict_sets_the_pools_counts(device, backend, case):
    """counts = keep and next_slot = head_start + keep where given (the evictions as without them)."""
    args = make_inputs(*case, torch.float32, device, seed=sum(case))
    skip_unless_supported(PAGED_EVICT, args, backend)
    got, want = clone(with_counts(args, device)), clone(args)
    run_forced(backend, torch.ops.vtattn.paged_evict, *got)
    vtattn.reference.paged_evict(*want)
    assert_same_evictions(got, want)
    head_start, keep = args[5], args[7]
    assert got[11].dtype == torch.int32 and torch.equal(got[11].cpu(), keep.int())
    assert torch.equal(got[12].cpu(), head_start + keep)


def test_cpp_kernel_refuses_counts_of_another_dtype_or_shape_before_any_write():
    args = with_counts(make_inputs(*CASES[1], torch.float32), "cpu")
    skip_unless_supported(PAGED_EVICT, args[:11], "cpp")
    for i, bad_value, name in ((11, args[11].long(), "counts"), (12, args[12][:1], "next_slot")):
        bad = list(clone(args))
        bad[i] = bad_value
        before = clone(bad)
        with pytest.raises(RuntimeError, match=f"paged_evict: {name} must be a CPU"):
            torch.ops.vtattn_C.paged_evict(*bad)
        for a, b in zip(bad[:4], before[:4]):
            assert torch.equal(a, b), "nothing is written before the checks"


@pytest.mark.parametrize("counts", [False, True], ids=["plain", "counts"])
def test_opcheck(counts):
    args = make_inputs(*CASES[1], torch.float32)
    torch.library.opcheck(torch.ops.vtattn.paged_evict.default, with_counts(args, "cpu") if counts else args)


def test_compiled_evict_equals_eager():
    """A mutating op under torch.compile: functionalised and written back into the caller's tensors."""
    args = make_inputs(*CASES[1], torch.float32)
    got, want = clone(args), clone(args)
    torch.compile(lambda *a: torch.ops.vtattn.paged_evict(*a), fullgraph=True, backend="aot_eager")(*got)
    vtattn.reference.paged_evict(*want)
    assert_same_evictions(got, want)


def test_cpp_kernel_refuses_heads_outside_the_pools_or_drops_in_the_window():
    args = make_inputs(*CASES[1], torch.float32)
    skip_unless_supported(PAGED_EVICT, args, "cpp")
    bad = clone(args)
    bad[5][1, 2] = bad[0].shape[0] * bad[0].shape[1] - 1  # its run falls off the pools
    with pytest.raises(RuntimeError, match=r"head \(1, 2\) spans slots .* outside the pools"):
        torch.ops.vtattn_C.paged_evict(*bad)
    bad = clone(args)
    bad[7][0, 1] = 0  # drops its recent tokens too
    with pytest.raises(RuntimeError, match=r"head \(0, 1\) keeps 0 of .* first lengths - 2"):
        torch.ops.vtattn_C.paged_evict(*bad)


def test_decode_evict_is_one_op_call(monkeypatch):
    """kv.decode.evict: one paged_evict per eviction, which sets the device counts; the host's follow,
    and the room it freed is found again before a growth."""
    from vtattn.kv import decode, pages
    k = torch.randn(1, 2, 6, 8)
    p = pages.Pages(k, k, torch.arange(6).expand(1, 2, 6), np.array([[6, 4]]), 4, room=2,
                    scores=torch.arange(1.0, 7.0).expand(1, 2, 6))
    p.append(torch.ones(1, 2, 2, 8), torch.ones(1, 2, 2, 8), 6)
    calls = []
    real = decode._EVICT
    monkeypatch.setattr(decode, "_EVICT", lambda *a, stamp: calls.append(a) or real(*a, stamp=stamp))
    decode.evict(p, torch.zeros(1, 2, 2, 8), 6, np.array([[6, 4]]), recent=1)
    assert len(calls) == 1
    assert p.positions().tolist() == [[[1, 2, 3, 4, 5, 7], [1, 2, 3, 7, -1, -1]]]  # the new token 6 and the oldest went
    assert p.lengths.tolist() == [[6, 4]] and p.host_lengths.tolist() == [[6, 4]]
    assert p.next.tolist() == (p.start + p.lengths).tolist() and p.room == 2  # the room the floor leaves
    k_pool = p.k
    p.append(torch.ones(1, 2, 2, 8), torch.ones(1, 2, 2, 8), 8)  # the two freed slots: no growth
    assert p.k is k_pool and p.room == 0 and p.host_lengths.tolist() == [[8, 6]]
    # a head below its floor (nothing to drop) keeps more room than the floor leaves: found before a growth
    decode.evict(p, torch.zeros(1, 2, 2, 8), 8, np.array([[6, 8]]), recent=1)
    assert p.host_lengths.tolist() == [[6, 6]] and p.lengths.tolist() == [[6, 6]] and p.room == 0
    p.append(torch.ones(1, 2, 2, 8), torch.ones(1, 2, 2, 8), 10)
    assert p.k is k_pool and p.room == 0 and p.lengths.tolist() == [[8, 8]]
