import pytest
import torch

import vtattn
from vtattn._registry import DECODE_ATTENTION
from helpers import (DTYPES, OUT_TOL, backend_params, bad_decode_inputs, poisoned_outputs, run_forced,
                     skip_unless_supported)


def naive_decode(q, k, v, lengths, scale):
    """float64 ground truth, one (batch, query head) at a time over its valid prefix."""
    B, Hq, _, D = q.shape
    group = Hq // k.shape[1]
    out = torch.zeros(B, Hq, 1, D, dtype=torch.float64)
    for b in range(B):
        for h in range(Hq):
            n = int(lengths[b, h // group])
            if n:
                kk, vv = k[b, h // group, :n].double().cpu(), v[b, h // group, :n].double().cpu()
                p = torch.softmax(q[b, h].double().cpu() @ kk.T * scale, dim=-1)
                out[b, h] = p @ vv
    return out


def make_inputs(B, Hq, Hkv, cap, D, dtype, device, lengths, layout="contiguous", seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, Hq, 1, D, generator=g).to(device, dtype)
    if layout == "strided":  # a [B, L, H, D] buffer viewed as [B, H, L, D]
        k, v = (torch.randn(B, cap, Hkv, D, generator=g).to(device, dtype).transpose(1, 2) for _ in range(2))
    elif layout == "sliced":  # a wider cache: L_cap is a prefix of the allocation, rows padded
        k, v = (torch.randn(B, Hkv, cap + 5, D + 8, generator=g).to(device, dtype)[:, :, :cap, :D] for _ in range(2))
    else:
        k, v = (torch.randn(B, Hkv, cap, D, generator=g).to(device, dtype) for _ in range(2))
    lengths = torch.as_tensor(lengths, dtype=torch.int32).reshape(B, Hkv).to(device)
    return q, k, v, lengths


# (B, Hq, Hkv, L_cap, D, lengths, layout): lengths 0, 1, 17, 5000 mixed per head; GQA groups 1/4/8.
CASES = [
    (2, 2, 2, 5000, 64, [0, 1, 17, 5000], "contiguous"),
    (2, 8, 2, 5000, 128, [5000, 17, 1, 0], "strided"),
    (1, 16, 2, 5003, 72, [17, 5000], "sliced"),
    (2, 4, 4, 17, 80, [1, 17, 0, 3, 16, 2, 17, 9], "strided"),
    (1, 8, 1, 1, 64, [1], "contiguous"),
]


@pytest.mark.parametrize("device,backend", backend_params(DECODE_ATTENTION))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", range(len(CASES)))
def test_decode_attention_matches_float64(device, backend, dtype, case):
    B, Hq, Hkv, cap, D, lengths, layout = CASES[case]
    q, k, v, lens = make_inputs(B, Hq, Hkv, cap, D, dtype, device, lengths, layout, seed=case)
    scale = D ** -0.5
    skip_unless_supported(DECODE_ATTENTION, (q, k, v, lens, scale), backend)
    before = [t.clone() for t in (q, k, v, lens)]
    with poisoned_outputs():
        out = run_forced(backend, vtattn.decode_attention, q, k, v, lens)
    assert out.shape == q.shape and out.dtype == dtype and out.is_contiguous()
    want = naive_decode(q, k, v, lens.cpu(), scale)
    torch.testing.assert_close(out.double().cpu(), want, atol=OUT_TOL[dtype], rtol=0)
    empty = (lens == 0).repeat_interleave(Hq // Hkv, dim=1)
    assert bool((out[empty] == 0).all()), "a head with length 0 gives zeros"
    for t, b in zip((q, k, v, lens), before):
        assert torch.equal(t, b), "inputs must not be modified"



@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_cuda_graph_replay_with_new_lengths(backend):
    """No host sync inside the op: it captures into a CUDA graph, and a replay after lengths change
    in place uses the new lengths (the split count never depended on them)."""
    q, k, v, lens = make_inputs(2, 8, 2, 3000, 128, torch.bfloat16, "cuda", [3000, 1, 0, 1000])
    skip_unless_supported(DECODE_ATTENTION, (q, k, v, lens, 128 ** -0.5), backend)
    with vtattn.use_backend(backend):
        vtattn.decode_attention(q, k, v, lens)  # compilation and allocator warm-up, outside the capture
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = vtattn.decode_attention(q, k, v, lens)
    lens.copy_(torch.tensor([[17, 3000], [5, 0]], dtype=torch.int32))
    graph.replay()
    torch.cuda.synchronize()
    want = naive_decode(q, k, v, lens.cpu(), 128 ** -0.5)
    torch.testing.assert_close(out.double().cpu(), want, atol=OUT_TOL[torch.bfloat16], rtol=0)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_key_offsets_past_int32(backend):
    """Key 64's row starts at element 2^31 of the cache (row stride 2^25, one 4 GiB storage holding k and
    v): row offsets must be computed in int64."""
    S, L, D = 1 << 25, 65, 16
    store = torch.empty((L - 1) * S + 2 * D, dtype=torch.float16, device="cuda")
    k = store.as_strided((1, 1, L, D), (L * S, L * S, S, 1))
    v = store.as_strided((1, 1, L, D), (L * S, L * S, S, 1), D)
    g = torch.Generator().manual_seed(0)
    k.copy_(torch.randn(1, 1, L, D, generator=g).half())
    v.copy_(torch.randn(1, 1, L, D, generator=g).half())
    q = torch.randn(1, 1, 1, D, generator=g).half().cuda()
    lens = torch.tensor([[L]], dtype=torch.int32, device="cuda")
    skip_unless_supported(DECODE_ATTENTION, (q, k, v, lens, D ** -0.5), backend)
    out = run_forced(backend, vtattn.decode_attention, q, k, v, lens)
    want = naive_decode(q.cpu(), k.cpu(), v.cpu(), lens.cpu(), D ** -0.5)
    torch.testing.assert_close(out.double().cpu(), want, atol=OUT_TOL[torch.float16], rtol=0)
    del store


def test_reference_matches_float64():
    q, k, v, lens = make_inputs(2, 8, 2, 40, 72, torch.float64, "cpu", [0, 40, 7, 1], "strided")
    torch.testing.assert_close(vtattn.reference.decode_attention(q, k, v, lens, 0.3),
                               naive_decode(q, k, v, lens, 0.3))


def test_full_lengths_equal_dense_attention():
    q, k, v, lens = make_inputs(2, 4, 2, 33, 64, torch.float32, "cpu", [33] * 4)
    torch.testing.assert_close(vtattn.decode_attention(q, k, v, lens, scale=0.2),
                               vtattn.attention(q, k, v, scale=0.2), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_opcheck(device):
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    q, k, v, lens = make_inputs(2, 8, 2, 50, 64, dtype, device, [0, 50, 17, 1], "strided")
    torch.library.opcheck(torch.ops.vtattn.decode_attention.default, (q, k, v, lens, 0.125))


def test_meta_tensors_and_compile():
    q = torch.empty(2, 8, 1, 72, device="meta", dtype=torch.float16)
    k = torch.empty(2, 2, 100, 72, device="meta", dtype=torch.float16)
    lens = torch.empty(2, 2, device="meta", dtype=torch.int32)
    out = vtattn.decode_attention(q, k, k, lens)
    assert out.shape == (2, 8, 1, 72) and out.device.type == "meta" and out.dtype == torch.float16

    q, k, v, lens = make_inputs(2, 4, 2, 30, 64, torch.float32, "cpu", [30, 0, 9, 1])
    fn = torch.compile(lambda q, k, v, n: vtattn.decode_attention(q, k, v, n), fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(fn(q, k, v, lens), vtattn.decode_attention(q, k, v, lens))


BAD = [
    (lambda q, k, v, n: (q[0], k, v, n), ValueError, "q must be 4-D"),
    (lambda q, k, v, n: (q.expand(2, 8, 3, 64), k, v, n), ValueError, r"q must be \[B, Hq, 1, D\]"),
    (lambda q, k, v, n: (q, k.half(), v, n), TypeError, "k_cache has dtype"),
    (lambda q, k, v, n: (q, k, v.double(), n), TypeError, "v_cache must have dtype"),
    (lambda q, k, v, n: (q, k[..., :32], v, n), ValueError, "k_cache must be"),
    (lambda q, k, v, n: (q, k, v[:, :, :5], n), ValueError, "v_cache must have k_cache's shape"),
    (lambda q, k, v, n: (q[:, :3], k, v, n), ValueError, "multiple of k_cache's"),
    (lambda q, k, v, n: (q, k[:1], v[:1], n), ValueError, "k_cache must be"),
    (lambda q, k, v, n: (q, k.transpose(2, 3).contiguous().transpose(2, 3), v, n), ValueError, "unit-stride"),
    (lambda q, k, v, n: (q, k, v, n.long()), TypeError, "lengths must have dtype"),
    (lambda q, k, v, n: (q, k, v, n[:, :1]), ValueError, r"lengths must be \[B, Hkv\]"),
    (lambda q, k, v, n: (q, k, v, n[0]), ValueError, "lengths must be 2-D"),
    (lambda q, k, v, n: (q, k, v, n.to("meta")), ValueError, "lengths is on meta"),
    (lambda q, k, v, n: (q, k, v, n + 20), ValueError, r"lengths must lie in \[0, L_cap=16\]"),
    (lambda q, k, v, n: (q, k, v, n - 5), ValueError, "lengths must lie in"),
    (lambda q, k, v, n: (q, k, v, n.tolist()), TypeError, "lengths must be a torch.Tensor"),
]


@pytest.mark.parametrize("bad", range(len(BAD)))
def test_bad_inputs_raise_naming_the_argument(bad):
    q, k, v, lens = make_inputs(2, 8, 2, 16, 64, torch.float32, "cpu", [0, 16, 3, 1])
    make, exc, msg = BAD[bad]
    with pytest.raises(exc, match=msg):
        vtattn.decode_attention(*make(q, k, v, lens))


def test_cpp_kernel_checks_lengths_itself():
    """The C++ kernel reads [0, length) rows: out-of-range lengths are refused even past the public checks
    (on CPU that costs no sync; the other backends clamp them: test_out_of_range_lengths_act_clamped)."""
    q, k, v, lens = make_inputs(1, 2, 1, 8, 64, torch.float32, "cpu", [8])
    skip_unless_supported(DECODE_ATTENTION, (q, k, v, lens, 0.125), "cpp")
    for bad in (9, -1):
        with pytest.raises(RuntimeError, match="outside"):
            torch.ops.vtattn_C.decode_attention(q, k, v, torch.full_like(lens, bad), 0.125)


@pytest.mark.parametrize("device,backend", [p for p in backend_params(DECODE_ATTENTION) if p.id != "cpu-cpp"])
def test_out_of_range_lengths_act_clamped(device, backend):
    """Past the public checks (torch.compile, graph capture) the op stays inside the cache without a sync:
    lengths act clamped to [0, L_cap]. Called as the registered op, which checks nothing."""
    args, clamped = bad_decode_inputs(device, torch.float16)
    skip_unless_supported(DECODE_ATTENTION, (*args, 0.125), backend)
    with poisoned_outputs():
        out = run_forced(backend, torch.ops.vtattn.decode_attention, *args, 0.125)
    want = vtattn.reference.decode_attention(*(t.double() if t.is_floating_point() else t for t in clamped), 0.125)
    torch.testing.assert_close(out.double(), want, atol=OUT_TOL[torch.float16], rtol=0)
