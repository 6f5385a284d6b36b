"""paged_evict_step (DecodeH2O's decode step on a static cache, on device counts) against its
reference, and the reference against a plain per-head loop: odd page sizes and head dims, GQA,
heads of different capacities and lengths (empty, at their floor, full), steps that evict and steps
that do not, recent windows of 0 and more, strided pools and queries, ties. The moves are copies,
so k, v and pos match exactly; scores within fp32 rounding."""
import pytest
import torch

import vtattn
from vtattn._registry import PAGED_EVICT_STEP
from helpers import DTYPES, backend_params, run_forced, skip_unless_supported

CASES = [  # (B, H, G, D, page_size, every, recent)
    (2, 3, 1, 64, 16, 1, 0),
    (2, 3, 4, 80, 3, 3, 2),
    (3, 2, 4, 128, 16, 4, 3),
    (1, 4, 1, 128, 3, 2, 0),
    (2, 2, 2, 64, 5, 3, 9),  # a window as long as most heads' floors
    (1, 2, 3, 40, 4, 2, 1),  # a group of 3, a head dim of 40
]
LAYOUTS = ["contiguous", "strided"]


def make_inputs(B, H, G, D, ps, every, recent, dtype, device="cpu", layout="contiguous", seed=0, due=True,
                ties=False):
    """Each head has a floor of at least `recent`, owns whole pages for `every` slots past it (the
    widest sets width) and holds a random count of tokens up to floor + every (head (0, 0) none,
    head (0, 1) that many) at distinct random positions. due: the step's `since` reaches `every`.
    layout "strided": q is a view of [B, 1, Hq, D] storage, the pools views of wider buffers."""
    g = torch.Generator().manual_seed(seed)
    floor = recent + torch.randint(0, 3 * ps, (B, H), generator=g)
    capacity = (floor + every + ps - 1) // ps * ps
    first = (capacity.flatten().cumsum(0) - capacity.flatten()).view(B, H)
    lengths = torch.minimum((torch.rand(B, H, generator=g) * (floor + every + 1)).long(), floor + every)
    lengths[0, 0] = 0
    if H > 1:
        lengths[0, 1] = floor[0, 1] + every
    P = int(capacity.sum()) // ps + 1  # a spare page after the last head's: untouched
    pos = torch.full((P * ps,), -1, dtype=torch.int64)
    for b in range(B):
        for h in range(H):
            n, s0 = int(lengths[b, h]), int(first[b, h])
            pos[s0:s0 + n] = torch.randperm(4 * n + 1, generator=g)[:n]
    pos = pos.view(P, ps)
    if layout == "strided":
        k_pages = torch.randn(P, ps + 2, D + 8, generator=g).to(dtype)[:, 1:ps + 1, 3:D + 3]
        v_pages = torch.randn(P, ps, 2, D, generator=g).to(dtype)[:, :, 1]
        wide = torch.full((P, 2 * ps), -7, dtype=torch.int64)
        wide[:, ::2] = pos
        pos = wide[:, ::2]
        q = torch.randn(B, 1, G * H, D, generator=g).to(dtype).transpose(1, 2)
    else:
        k_pages, v_pages = (torch.randn(P, ps, D, generator=g).to(dtype) for _ in range(2))
        q = torch.randn(B, G * H, 1, D, generator=g).to(dtype)
    score = torch.rand(P, ps, generator=g)
    if ties:
        q, score = torch.zeros_like(q), torch.ones_like(score)
    since = torch.tensor(every - 1 if due else max(every - 2, 0), dtype=torch.int64)
    counts = [first, capacity, floor, lengths.int(), first + lengths, since]
    dev = [t.to(device) for t in (k_pages, v_pages, pos, score, q, *counts)]
    return (*dev, every, recent, int(capacity.max()), D ** -0.5)


def clone(args):
    return tuple(a.clone() if isinstance(a, torch.Tensor) else a for a in args)


WRITTEN = (0, 1, 2, 8, 9, 10)  # k_pages, v_pages, pos, lengths, next_slot, since: exact


def assert_same_steps(got, want, rtol=1e-5, atol=1e-6):
    for i in WRITTEN:
        assert torch.equal(got[i].cpu(), want[i].cpu()), f"argument {i} differs"
    torch.testing.assert_close(got[3].cpu(), want[3].cpu(), rtol=rtol, atol=atol)


def naive(args):
    """The semantics as a loop over heads and tokens (float64 mass), on copies."""
    k_pages, v_pages, pos, score, q, first, capacity, floor, lengths, next_slot, since, every, recent, _, scale = \
        clone(args)
    ps, (B, H) = k_pages.shape[1], lengths.shape
    G = q.shape[1] // H
    at = lambda s: (s // ps, s % ps)  # noqa: E731
    since += 1
    due = int(since) >= every
    if due:
        since.zero_()
    for b in range(B):
        for h in range(H):
            n, s0 = int(lengths[b, h]), int(first[b, h])
            if n == 0:
                continue
            keys = torch.stack([k_pages[at(s0 + t)].double() for t in range(n)])
            mass = (q[b, h * G:(h + 1) * G, 0].double() @ keys.T * scale).softmax(-1).sum(0) / G
            sc = [float(score[at(s0 + t)]) + float(mass[t]) for t in range(n)]
            for t in range(n):
                score[at(s0 + t)] = sc[t]
            drop = max(n - int(floor[b, h]), 0) if due else 0
            if drop == 0:
                continue
            p = [int(pos[at(s0 + t)]) for t in range(n)]
            newest = sorted(p)[n - recent:] if recent else []
            cand = [t for t in range(n) if p[t] not in newest]
            gone = set(sorted(cand, key=lambda t: (sc[t], p[t]))[:drop])
            keep = n - drop
            holes = [t for t in range(keep) if t in gone]
            survivors = [t for t in range(keep, n) if t not in gone]
            assert len(holes) == len(survivors)
            for dst, src in zip(holes, survivors):
                k_pages[at(s0 + dst)], v_pages[at(s0 + dst)] = k_pages[at(s0 + src)], v_pages[at(s0 + src)]
                pos[at(s0 + dst)], score[at(s0 + dst)] = p[src], sc[src]
            for t in range(keep, n):
                pos[at(s0 + t)] = -1
            lengths[b, h], next_slot[b, h] = keep, s0 + keep
    return k_pages, v_pages, pos, score, q, first, capacity, floor, lengths, next_slot, since


@pytest.mark.parametrize("due", [True, False], ids=["due", "between"])
@pytest.mark.parametrize("ties", [False, True], ids=["random", "ties"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(map(str, c)))
def test_reference_matches_a_naive_loop(case, ties, due):
    if not due and case[5] == 1:
        pytest.skip("every = 1: every step evicts")
    args = make_inputs(*case, torch.float32, seed=sum(case), due=due, ties=ties)
    got = clone(args)
    vtattn.reference.paged_evict_step(*got)
    assert_same_steps(got, naive(args))
    lengths = args[8]
    if due:  # the cases evict in some heads, not all
        assert (got[8] < lengths).any() and (got[8] == lengths).any()
    else:
        assert torch.equal(got[8], lengths) and not torch.equal(got[3], args[3])  # scores grow, nothing goes


@pytest.mark.parametrize("device,backend", backend_params(PAGED_EVICT_STEP))
@pytest.mark.parametrize("due", [True, False], ids=["due", "between"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(map(str, c)))
def test_paged_evict_step_matches_reference(device, backend, dtype, layout, case, due):
    args = make_inputs(*case, dtype, device, layout, seed=sum(case), due=due)
    skip_unless_supported(PAGED_EVICT_STEP, args, backend)
    got, want = clone(args), clone(args)
    run_forced(backend, torch.ops.vtattn.paged_evict_step, *got)
    vtattn.reference.paged_evict_step(*want)
    assert_same_steps(got, want)
    assert torch.equal(got[4], args[4]), "q must not be modified"


@pytest.mark.parametrize("device,backend", backend_params(PAGED_EVICT_STEP))
def test_ties_go_as_in_the_reference(device, backend):
    args = make_inputs(*CASES[2], torch.float32, device, ties=True)
    skip_unless_supported(PAGED_EVICT_STEP, args, backend)
    got, want = clone(args), clone(args)
    run_forced(backend, torch.ops.vtattn.paged_evict_step, *got)
    vtattn.reference.paged_evict_step(*want)
    assert_same_steps(got, want)


@pytest.mark.parametrize("device,backend", backend_params(PAGED_EVICT_STEP))
def test_steps_in_a_row_follow_the_reference(device, backend):
    """A decode: each step appends a token (a new position) and runs the op; `since` cycles, the
    heads fill and evict back to their floors, as the reference's."""
    args = list(make_inputs(*CASES[1], torch.float32, device, seed=3))
    args[8] = torch.minimum(args[8], args[7]).int()  # at most its floor and no step since an eviction
    args[9], args[10] = args[5] + args[8], torch.zeros_like(args[10])
    skip_unless_supported(PAGED_EVICT_STEP, args, backend)
    got, want = list(clone(args)), list(clone(args))
    g = torch.Generator().manual_seed(4)
    evicting = 0
    for step in range(10):
        q = torch.randn(args[4].shape, generator=g).to(device)
        k, v = (torch.randn(args[0].shape[-1], generator=g).to(device) for _ in range(2))
        for state in (got, want):  # paged_append's write of one token per head
            k_pages, v_pages, pos, score, _, first, capacity, _, lengths, next_slot = state[:10]
            ps = k_pages.shape[1]
            for b, h in (lengths < capacity).nonzero().tolist():
                s = int(next_slot[b, h])
                k_pages[s // ps, s % ps], v_pages[s // ps, s % ps] = k, v
                pos[s // ps, s % ps], score[s // ps, s % ps] = 1000 + step, 0.0
                lengths[b, h] += 1
                next_slot[b, h] += 1
            state[4] = q
        before = got[8].clone()
        run_forced(backend, torch.ops.vtattn.paged_evict_step, *got)
        vtattn.reference.paged_evict_step(*want)
        assert_same_steps(got, want)
        evicting += bool((got[8] < before).any())
    assert evicting == 3  # steps 2, 5 and 8 of every = 3


def test_cpp_kernel_refuses_bad_counts_before_any_write():
    args = make_inputs(*CASES[1], torch.float32)
    skip_unless_supported(PAGED_EVICT_STEP, args, "cpp")
    for i, value, match in ((8, args[8].long(), "lengths must be a CPU Int"),
                            (9, args[9][:1], r"next_slot must be a CPU Long \[2, 3\]"),
                            (10, args[10].int(), "since must be a CPU int64"),
                            (4, args[4].expand(-1, -1, 2, -1), r"q must be a CPU \[B, G \* H, 1, D\]")):
        bad = list(clone(args))
        bad[i] = value
        before = clone(bad)
        with pytest.raises(RuntimeError, match=f"paged_evict_step: {match}"):
            torch.ops.vtattn_C.paged_evict_step(*bad)
        for a, b in zip(bad[:11], before[:11]):
            assert torch.equal(a, b), "nothing is written before the checks"


def test_cpp_kernel_refuses_heads_outside_the_pools_or_below_the_window():
    args = make_inputs(*CASES[1], torch.float32)
    skip_unless_supported(PAGED_EVICT_STEP, args, "cpp")
    bad = clone(args)
    bad[5][1, 2] = bad[0].shape[0] * bad[0].shape[1] - 1  # its run falls off the pools
    with pytest.raises(RuntimeError, match=r"head \(1, 2\) spans slots .* outside the pools"):
        torch.ops.vtattn_C.paged_evict_step(*bad)
    for too_many in (int(args[6][1, 0]) + 1, int(args[7][1, 0]) + 4):  # past its capacity, or floor + every
        bad = clone(args)
        bad[8][1, 0] = too_many
        with pytest.raises(RuntimeError, match=r"head \(1, 0\) holds .* at most its capacity and floor \+ every"):
            torch.ops.vtattn_C.paged_evict_step(*bad)
    bad = clone(args)
    bad[7][0, 1], bad[8][0, 1] = 1, 0  # a floor inside the recent window (2)
    with pytest.raises(RuntimeError, match=r"head \(0, 1\) .* floor at least recent = 2"):
        torch.ops.vtattn_C.paged_evict_step(*bad)
    assert torch.equal(bad[10], args[10]), "the step counter moves only after the checks"


def test_opcheck():
    torch.library.opcheck(torch.ops.vtattn.paged_evict_step.default, make_inputs(*CASES[1], torch.float32))


def test_compiled_step_equals_eager():
    """A mutating op under torch.compile: functionalised and written back into the caller's tensors."""
    args = make_inputs(*CASES[1], torch.float32)
    got, want = clone(args), clone(args)
    torch.compile(lambda *a: torch.ops.vtattn.paged_evict_step(*a), fullgraph=True, backend="aot_eager")(*got)
    vtattn.reference.paged_evict_step(*want)
    assert_same_steps(got, want)
