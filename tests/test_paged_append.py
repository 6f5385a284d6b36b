"""paged_append (a decode step's write into kv.pages.Pages) against its reference, and the reference
against a naive loop: odd head dims and page sizes, several tokens, non-contiguous rows and pools,
heads clamped at their last slot, with and without scores. A copy: every backend matches exactly."""
import pytest
import torch

import vtattn
from vtattn._registry import PAGED_APPEND
from helpers import DTYPES, backend_params, run_forced, skip_unless_supported


def make_inputs(B, H, n, D, ps, dtype, device="cpu", last=True, score=True, layout="contiguous", seed=0):
    """Pools where each head owns a run of whole pages, filled up to a random length; with `last`,
    head (0, 0) sits at its last slot and head (0, 1) has fewer free slots than n (both clamp).
    layout "strided": k, v are views of [B, n, H, D] storage and the pools views of wider buffers."""
    g = torch.Generator().manual_seed(seed)
    pages = torch.randint(1, 4, (B, H), generator=g)
    first = (pages.flatten().cumsum(0) - pages.flatten()).view(B, H) * ps
    cap = pages * ps
    used = (torch.rand(B, H, generator=g) * cap).long()
    if last:
        used[0, 0] = cap[0, 0] - 1
        used[0, 1] = cap[0, 1] - max(1, n // 2)
    else:
        cap = cap + n  # room for every token: the pools get a spare page per head
    P = int(-(-(first + cap).max() // ps)) + 1
    if layout == "strided":
        k_pages = torch.randn(P, ps + 2, D + 8, generator=g).to(dtype)[:, 1:ps + 1, 3:D + 3]
        v_pages = torch.randn(P, ps, 2, D, generator=g).to(dtype)[:, :, 1]
        k = torch.randn(B, n, H, D, generator=g).to(dtype).transpose(1, 2)
        v = torch.randn(B, H, n, D + 5, generator=g).to(dtype)[..., 2:D + 2]
    else:
        k_pages, v_pages = (torch.randn(P, ps, D, generator=g).to(dtype) for _ in range(2))
        k, v = (torch.randn(B, H, n, D, generator=g).to(dtype) for _ in range(2))
    pos = torch.randint(0, 1000, (P, ps), generator=g)
    sc = torch.rand(P, ps, generator=g) if score else None
    args = (k_pages, v_pages, pos, first + used, used.int(), k, v, torch.tensor(777),
            first + cap - 1 if last else None, sc)
    return tuple(a.to(device) if isinstance(a, torch.Tensor) else a for a in args)


def clone(args):
    return tuple(a.clone() if isinstance(a, torch.Tensor) else a for a in args)


WRITTEN = (0, 1, 2, 3, 4, 9)  # k_pages, v_pages, pos, next_slot, lengths, score


def assert_same_writes(got, want):
    for i in WRITTEN:
        if want[i] is None:
            assert got[i] is None
        else:
            assert torch.equal(got[i].cpu(), want[i].cpu()), f"argument {i} differs"


def naive(args):
    """The semantics as a loop over heads and tokens, on copies."""
    k_pages, v_pages, pos, next_slot, lengths, k, v, start, last, score = clone(args)
    B, H, n, _ = k.shape
    ps = k_pages.shape[1]
    for b in range(B):
        for h in range(H):
            s0 = int(next_slot[b, h])
            for t in range(n):
                s = s0 + t if last is None else min(s0 + t, int(last[b, h]))
                src = t if last is None or s0 + t < int(last[b, h]) else n - 1
                k_pages[s // ps, s % ps] = k[b, h, src]
                v_pages[s // ps, s % ps] = v[b, h, src]
                pos[s // ps, s % ps] = int(start) + src
                if score is not None:
                    score[s // ps, s % ps] = 0
    next_slot += n
    lengths += n
    return k_pages, v_pages, pos, next_slot, lengths, k, v, start, last, score


CASES = [  # (B, H, n, D, page_size, last, score, layout)
    (3, 5, 1, 72, 16, True, True, "contiguous"),
    (3, 5, 3, 40, 5, True, False, "strided"),
    (3, 5, 3, 72, 5, False, True, "contiguous"),
    (3, 5, 1, 40, 16, False, False, "strided"),
    (1, 2, 3, 128, 16, True, True, "strided"),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(map(str, c)))
def test_reference_matches_a_naive_loop(case):
    args = make_inputs(*case[:5], torch.float32, "cpu", *case[5:])
    got = clone(args)
    vtattn.reference.paged_append(*got)
    assert_same_writes(got, naive(args))


@pytest.mark.parametrize("device,backend", backend_params(PAGED_APPEND))
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(map(str, c)))
def test_paged_append_matches_reference(device, backend, dtype, case):
    args = make_inputs(*case[:5], dtype, device, *case[5:], seed=sum(case[:5]))
    skip_unless_supported(PAGED_APPEND, args, backend)
    got, want = clone(args), clone(args)
    run_forced(backend, torch.ops.vtattn.paged_append, *got)
    vtattn.reference.paged_append(*want)
    assert_same_writes(got, want)
    assert torch.equal(got[5], args[5]) and torch.equal(got[6], args[6]), "k and v must not be modified"


@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.gpu
def test_gpu_kernels_read_start_on_the_host_or_the_device(backend):
    """A CPU start (the dynamic cache's int) is read at launch, a device one in the kernel."""
    args = make_inputs(2, 3, 2, 64, 16, torch.float16, "cuda")
    want = clone(args)
    vtattn.reference.paged_append(*want)
    for start in (args[7].cpu(), args[7]):
        got = clone(args)
        got = got[:7] + (start,) + got[8:]
        skip_unless_supported(PAGED_APPEND, got, backend)
        run_forced(backend, torch.ops.vtattn.paged_append, *got)
        assert_same_writes(got, want)


def test_opcheck():
    args = make_inputs(2, 3, 2, 40, 5, torch.float32)
    torch.library.opcheck(torch.ops.vtattn.paged_append.default, clone(args))


def test_grad_requiring_rows_are_refused_by_name():
    args = make_inputs(2, 3, 1, 40, 5, torch.float32)
    with pytest.raises(RuntimeError, match="vtattn.paged_append has no gradient"):
        torch.ops.vtattn.paged_append(*args[:5], args[5].clone().requires_grad_(), *args[6:])


def test_compiled_append_equals_eager():
    """A mutating op under torch.compile: functionalised and written back into the caller's tensors."""
    args = make_inputs(2, 3, 1, 40, 5, torch.float32)
    got, want = clone(args), clone(args)
    torch.compile(lambda *a: torch.ops.vtattn.paged_append(*a), fullgraph=True, backend="aot_eager")(*got)
    vtattn.reference.paged_append(*want)
    assert_same_writes(got, want)


def test_cpp_kernel_refuses_slots_outside_the_pools():
    args = make_inputs(2, 3, 2, 40, 5, torch.float32, last=False)
    skip_unless_supported(PAGED_APPEND, args, "cpp")
    bad = clone(args)
    bad[3][1, 2] = bad[0].shape[0] * bad[0].shape[1] - 1  # its second token falls off the pools
    before = clone(bad)
    with pytest.raises(RuntimeError, match=r"head \(1, 2\) writes slots .* outside the pools"):
        torch.ops.vtattn_C.paged_append(*bad)
    assert_same_writes(bad, before)  # nothing written


def test_pages_append_is_one_op_call(monkeypatch):
    """kv.pages.Pages.append: one paged_append per step, the host bookkeeping in Python."""
    from vtattn.kv import pages
    k = torch.randn(1, 2, 4, 8)
    p = pages.Pages(k, k, torch.arange(4).expand(1, 2, 4), torch.tensor([[4, 2]]), 4, room=2, fixed=True)
    calls = []
    real = pages._APPEND
    monkeypatch.setattr(pages, "_APPEND", lambda *a, stamp: calls.append(a) or real(*a, stamp=stamp))
    p.append(torch.ones(1, 2, 1, 8), torch.ones(1, 2, 1, 8), torch.tensor(9))
    assert len(calls) == 1
    assert p.positions().tolist() == [[[0, 1, 2, 3, 9], [0, 1, 9, -1, -1]]]
    assert p.lengths.tolist() == [[5, 3]] and p.host_lengths.tolist() == [[5, 3]]
