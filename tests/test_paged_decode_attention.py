import pytest
import torch

import vtattn
from vtattn._registry import PAGED_DECODE_ATTENTION
from helpers import (DTYPES, OUT_TOL, backend_params, bad_decode_inputs, poisoned_outputs, run_forced,
                     skip_unless_supported)
from test_decode_attention import naive_decode


def paginate(k, v, lengths, page, layout="contiguous", seed=0):
    """Dense caches [B, Hkv, L, D] -> pools [num_pages, page, D] holding each head's used pages in a
    shuffled order (plus two spare pages), and block_table [B, Hkv, max_pages] with -1 past the used
    pages. layout "strided": the pools are views with padded slots and rows; "mixed": only k is."""
    B, Hkv, cap, D = k.shape
    max_pages = -(-cap // page)
    used = [-(-int(n) // page) for n in lengths.flatten().tolist()]
    perm = torch.randperm(sum(used) + 2, generator=torch.Generator().manual_seed(seed))
    pad = (0, 0, 0, max_pages * page - cap)
    kp, vp = (torch.nn.functional.pad(x, pad).reshape(B * Hkv, max_pages, page, D) for x in (k, v))
    table = torch.full((B * Hkv, max_pages), -1, dtype=torch.int32)
    k_pool, v_pool = (torch.randn(len(perm), page, D).to(k.dtype) for _ in range(2))  # spares: noise
    i = 0
    for h, n in enumerate(used):
        for p in range(n):
            table[h, p] = perm[i]
            k_pool[perm[i]], v_pool[perm[i]] = kp[h, p], vp[h, p]
            i += 1
    if layout in ("strided", "mixed"):
        wide = torch.zeros(len(perm), page + 3, D + 8, dtype=k.dtype)
        wide[:, :page, :D] = k_pool
        k_pool = wide[:, :page, :D]
        if layout == "strided":
            wide = torch.zeros(len(perm), page, 2, D, dtype=k.dtype)
            wide[:, :, 1] = v_pool
            v_pool = wide[:, :, 1]
    return k_pool.to(k.device), v_pool.to(k.device), table.reshape(B, Hkv, max_pages).to(k.device)


def make_inputs(B, Hq, Hkv, cap, D, dtype, device, lengths, page, layout="contiguous", seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, Hq, 1, D, generator=g).to(device, dtype)
    k, v = (torch.randn(B, Hkv, cap, D, generator=g).to(dtype) for _ in range(2))
    lens = torch.as_tensor(lengths, dtype=torch.int32).reshape(B, Hkv)
    k_pool, v_pool, table = paginate(k, v, lens, page, layout, seed)
    return q, k.to(device), v.to(device), k_pool, v_pool, table, lens.to(device)


# (B, Hq, Hkv, L_cap, D, lengths, page_size, layout): lengths 0, 1, 17, 5000 mixed per head; GQA 1/4/8.
CASES = [
    (2, 2, 2, 5000, 64, [0, 1, 17, 5000], 16, "contiguous"),
    (2, 8, 2, 5000, 128, [5000, 17, 1, 0], 64, "strided"),
    (1, 16, 2, 5003, 72, [17, 5000], 64, "mixed"),
    (2, 4, 4, 17, 80, [1, 17, 0, 3, 16, 2, 17, 9], 16, "strided"),
    (1, 8, 1, 1, 64, [1], 16, "contiguous"),
    (2, 4, 2, 300, 64, [300, 0, 129, 37], 37, "mixed"),  # an odd page size (CPU backends)
    (2, 4, 2, 70, 64, [70, 0, 33, 1], 1, "strided"),  # pages of one token (CompressedCache's default)
]


@pytest.mark.parametrize("device,backend", backend_params(PAGED_DECODE_ATTENTION))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", range(len(CASES)))
def test_paged_matches_float64_and_dense(device, backend, dtype, case):
    B, Hq, Hkv, cap, D, lengths, page, layout = CASES[case]
    q, k, v, k_pool, v_pool, table, lens = make_inputs(B, Hq, Hkv, cap, D, dtype, device, lengths, page, layout, case)
    scale = D ** -0.5
    skip_unless_supported(PAGED_DECODE_ATTENTION, (q, k_pool, v_pool, table, lens, scale), backend)
    before = [t.clone() for t in (q, k_pool, v_pool, table, lens)]
    with poisoned_outputs():
        out = run_forced(backend, vtattn.decode_attention, q, k_pool, v_pool, lens, block_table=table)
    assert out.shape == q.shape and out.dtype == dtype and out.is_contiguous()
    want = naive_decode(q, k, v, lens.cpu(), scale)
    torch.testing.assert_close(out.double().cpu(), want, atol=OUT_TOL[dtype], rtol=0)
    dense = run_forced(backend, vtattn.decode_attention, q, k, v, lens)
    torch.testing.assert_close(out, dense, atol=OUT_TOL[dtype], rtol=0)
    empty = (lens == 0).repeat_interleave(Hq // Hkv, dim=1)
    assert bool((out[empty] == 0).all()), "a head with length 0 gives zeros"
    for t, b in zip((q, k_pool, v_pool, table, lens), before):
        assert torch.equal(t, b), "inputs must not be modified"


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_cuda_graph_replay_with_new_lengths_and_table(backend):
    """No host sync inside the op: it captures into a CUDA graph; a replay after lengths and the
    table change in place reads the new ones."""
    q, k, v, k_pool, v_pool, table, lens = make_inputs(2, 8, 2, 3000, 128, torch.bfloat16, "cuda",
                                                       [3000, 1, 0, 1000], 64)
    args = (q, k_pool, v_pool, table, lens, 128 ** -0.5)
    skip_unless_supported(PAGED_DECODE_ATTENTION, args, backend)
    with vtattn.use_backend(backend):
        vtattn.decode_attention(q, k_pool, v_pool, lens, block_table=table)  # warm-up outside the capture
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = vtattn.decode_attention(q, k_pool, v_pool, lens, block_table=table)
    table.copy_(table[:, [1, 0]].clone())  # the kv heads swap their pages (and so their data)
    lens.copy_(torch.tensor([[17, 2000], [900, 0]], dtype=torch.int32))  # within each head's new pages
    graph.replay()
    torch.cuda.synchronize()
    want = naive_decode(q, k[:, [1, 0]], v[:, [1, 0]], lens.cpu(), 128 ** -0.5)
    torch.testing.assert_close(out.double().cpu(), want, atol=OUT_TOL[torch.bfloat16], rtol=0)


def test_reference_matches_float64():
    q, k, v, k_pool, v_pool, table, lens = make_inputs(2, 8, 2, 40, 72, torch.float64, "cpu", [0, 40, 7, 1], 5,
                                                       "strided")
    torch.testing.assert_close(vtattn.reference.paged_decode_attention(q, k_pool, v_pool, table, lens, 0.3),
                               naive_decode(q, k, v, lens, 0.3))


def test_reference_on_an_empty_pool():
    q = torch.randn(1, 2, 1, 16)
    pool = torch.empty(0, 16, 16)
    out = vtattn.decode_attention(q, pool, pool, torch.zeros(1, 1, dtype=torch.int32),
                                  block_table=torch.full((1, 1, 3), -1, dtype=torch.int32))
    assert torch.equal(out, torch.zeros_like(q))


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_opcheck(device):
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    q, _, _, k_pool, v_pool, table, lens = make_inputs(2, 8, 2, 50, 64, dtype, device, [0, 50, 17, 1], 16, "mixed")
    torch.library.opcheck(torch.ops.vtattn.paged_decode_attention.default, (q, k_pool, v_pool, table, lens, 0.125))


def test_meta_tensors_and_compile():
    q = torch.empty(2, 8, 1, 72, device="meta", dtype=torch.float16)
    pool = torch.empty(10, 16, 72, device="meta", dtype=torch.float16)
    table = torch.empty(2, 2, 4, device="meta", dtype=torch.int32)
    lens = torch.empty(2, 2, device="meta", dtype=torch.int32)
    out = vtattn.decode_attention(q, pool, pool, lens, block_table=table)
    assert out.shape == (2, 8, 1, 72) and out.device.type == "meta" and out.dtype == torch.float16

    q, _, _, k_pool, v_pool, table, lens = make_inputs(2, 4, 2, 30, 64, torch.float32, "cpu", [30, 0, 9, 1], 16)
    fn = torch.compile(lambda q, k, v, n, t: vtattn.decode_attention(q, k, v, n, block_table=t), fullgraph=True,
                       backend="aot_eager")
    torch.testing.assert_close(fn(q, k_pool, v_pool, lens, table),
                               vtattn.decode_attention(q, k_pool, v_pool, lens, block_table=table))


def _set(t, index, value):
    t = t.clone()
    t[index] = value
    return t


# Inputs from make_inputs(2, 8, 2, 16, 64, fp32, lengths [0, 16, 3, 1], page 4): 4 pages per head,
# head (0, 1) uses all 4, head (1, 0) one, head (0, 0) none.
BAD = [
    (lambda q, k, v, t, n: (q, k, v, _set(t, (0, 1, 2), 99), n), ValueError,
     r"block_table\[0, 1, 2\] = 99 .* outside the pool's \[0, num_pages=8\)"),
    (lambda q, k, v, t, n: (q, k, v, _set(t, (1, 0, 0), -1), n), ValueError, r"block_table\[1, 0, 0\] = -1"),
    (lambda q, k, v, t, n: (q, k, v, t[..., :3], n), ValueError,
     r"lengths must lie in \[0, max_pages \* page_size = 12\]"),
    (lambda q, k, v, t, n: (q, k, v, t, n - 1), ValueError, "lengths must lie in"),
    (lambda q, k, v, t, n: (q, k, v, t.long(), n), TypeError, "block_table must have dtype"),
    (lambda q, k, v, t, n: (q, k, v, t[0], n), ValueError, "block_table must be 3-D"),
    (lambda q, k, v, t, n: (q, k, v, t[:1], n), ValueError, r"block_table must be \[B=2"),
    (lambda q, k, v, t, n: (q, k, v, t[:, :1], n), ValueError, r"lengths must be \[B, Hkv\]"),
    (lambda q, k, v, t, n: (q[:, :3], k, v, t, n), ValueError, "multiple of block_table's"),
    (lambda q, k, v, t, n: (q, k[..., :32], v, t, n), ValueError, "k_cache must be a page pool"),
    (lambda q, k, v, t, n: (q, k, v[:5], t, n), ValueError, "v_cache must have k_cache's shape"),
    (lambda q, k, v, t, n: (q, k[None], v, t, n), ValueError, "k_cache must be 3-D"),
    (lambda q, k, v, t, n: (q, k.half(), v, t, n), TypeError, "k_cache has dtype"),
    (lambda q, k, v, t, n: (q, k, v.transpose(1, 2).contiguous().transpose(1, 2), t, n), ValueError, "unit-stride"),
    (lambda q, k, v, t, n: (q, k, v, t.to("meta"), n), ValueError, "block_table is on meta"),
    (lambda q, k, v, t, n: (q, k, v, t.tolist(), n), TypeError, "block_table must be a torch.Tensor"),
]


@pytest.mark.parametrize("bad", range(len(BAD)))
def test_bad_inputs_raise_naming_the_argument(bad):
    q, _, _, k_pool, v_pool, table, lens = make_inputs(2, 8, 2, 16, 64, torch.float32, "cpu", [0, 16, 3, 1], 4)
    before = [t.clone() for t in (q, k_pool, v_pool, table, lens)]
    make, exc, msg = BAD[bad]
    with pytest.raises(exc, match=msg):
        q2, k2, v2, t2, n2 = make(q, k_pool, v_pool, table, lens)
        vtattn.decode_attention(q2, k2, v2, n2, block_table=t2)
    for t, b in zip((q, k_pool, v_pool, table, lens), before):
        assert torch.equal(t, b), "inputs must not be modified"


def test_cpp_kernel_checks_pages_itself():
    """The C++ kernel reads the used pages: bad page ids and lengths are refused past the public checks
    (on CPU that costs no sync; the other backends clamp them: test_out_of_range_inputs_act_clamped)."""
    q, _, _, k_pool, v_pool, table, lens = make_inputs(1, 2, 1, 8, 64, torch.float32, "cpu", [8], 4)
    skip_unless_supported(PAGED_DECODE_ATTENTION, (q, k_pool, v_pool, table, lens, 0.125), "cpp")
    op = torch.ops.vtattn_C.paged_decode_attention
    with pytest.raises(RuntimeError, match=r"block_table\[0, 0, 1\] = 7 is outside"):
        op(q, k_pool, v_pool, _set(table, (0, 0, 1), 7), lens, 0.125)
    with pytest.raises(RuntimeError, match=r"block_table\[0, 0, 0\] = -1 is outside"):
        op(q, k_pool, v_pool, _set(table, (0, 0, 0), -1), lens, 0.125)
    for bad in (lens + 1, lens - 9):
        with pytest.raises(RuntimeError, match="lengths.*outside"):
            op(q, k_pool, v_pool, table, bad, 0.125)


@pytest.mark.parametrize("device,backend", [p for p in backend_params(PAGED_DECODE_ATTENTION) if p.id != "cpu-cpp"])
def test_out_of_range_inputs_act_clamped(device, backend):
    """Past the public checks (torch.compile, graph capture) the op stays inside the pool without a sync:
    lengths act clamped to [0, max_pages * page_size], used page ids to [0, num_pages). Called as the
    registered op, which checks nothing."""
    args, clamped = bad_decode_inputs(device, torch.float16, paged=True)
    skip_unless_supported(PAGED_DECODE_ATTENTION, (*args, 0.125), backend)
    with poisoned_outputs():
        out = run_forced(backend, torch.ops.vtattn.paged_decode_attention, *args, 0.125)
    want = vtattn.reference.paged_decode_attention(*(t.double() if t.is_floating_point() else t for t in clamped),
                                                   0.125)
    torch.testing.assert_close(out.double(), want, atol=OUT_TOL[torch.float16], rtol=0)
