import pytest
import torch

import vtattn
from vtattn._registry import VARLEN_ATTENTION
from helpers import (DTYPES, OUT_TOL, backend_params, naive_attention, naive_lse, poisoned_outputs, run_forced,
                     skip_unless_supported)

# (query lengths, key lengths, Hq, Hkv, D, causal): odd sizes, empty sequences, a single key,
# a sequence without keys, GQA, causal with Nq != Nk both ways.
CASES = [
    ([1], [1], 2, 2, 64, False),
    ([17, 0, 33], [17, 5, 20], 4, 2, 72, True),
    ([5, 9, 3], [1, 0, 70], 2, 1, 80, False),
    ([40, 7], [13, 7], 2, 2, 128, True),  # 27 rows of the first sequence see no key
    ([100, 1, 77], [130, 64, 77], 3, 3, 64, True),
    ([0, 0], [3, 0], 2, 1, 64, False),  # no query rows at all
    ([150], [65], 4, 1, 72, False),
]
LAYOUTS = ("contiguous", "strided", "sliced")


def cu(lens, device="cpu"):
    return torch.tensor([0] + lens, device=device).cumsum(0).to(torch.int32)


def packed(T, H, D, dtype, device, layout, g):
    if layout == "strided":  # [H, T, D] storage
        return torch.randn(H, T, D, generator=g).to(device, dtype).transpose(0, 1)
    if layout == "sliced":
        return torch.randn(T, H, D + 8, generator=g).to(device, dtype)[..., 3:D + 3]
    return torch.randn(T, H, D, generator=g).to(device, dtype)


def make(case, dtype, device="cpu", layout="contiguous", seed=0):
    lq, lk, Hq, Hkv, D, causal = CASES[case]
    g = torch.Generator().manual_seed(seed)
    q = packed(sum(lq), Hq, D, dtype, device, layout, g)
    k, v = (packed(sum(lk), Hkv, D, dtype, device, layout, g) for _ in range(2))
    return q, k, v, cu(lq, device), cu(lk, device), causal


def naive(q, k, v, cu_q, cu_k, causal, scale, softcap=0.0, window=-1, sinks=None):
    """float64 out [Tq, Hq, D] and lse [Hq, Tq], sequence by sequence."""
    out = torch.zeros(q.shape, dtype=torch.float64)
    lse = torch.full((q.shape[1], q.shape[0]), float("-inf"), dtype=torch.float64)
    bq, bk = cu_q.tolist(), cu_k.tolist()
    sinks = None if sinks is None else sinks.cpu()
    for b in range(len(bq) - 1):
        qs, ks, vs = (x[lo:hi].cpu().double().transpose(0, 1)[None]
                      for x, lo, hi in ((q, *bq[b:b + 2]), (k, *bk[b:b + 2]), (v, *bk[b:b + 2])))
        opts = (softcap, window, sinks)
        out[bq[b]:bq[b + 1]] = naive_attention(qs, ks, vs, causal, scale, *opts)[0].transpose(0, 1)
        lse[:, bq[b]:bq[b + 1]] = naive_lse(qs, ks, causal, scale, *opts)[0]
    return out, lse


@pytest.mark.parametrize("device,backend", backend_params(VARLEN_ATTENTION))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", range(len(CASES)))
def test_varlen_matches_float64(device, backend, dtype, case):
    q, k, v, cu_q, cu_k, causal = make(case, dtype, device, LAYOUTS[case % 3], seed=case)
    scale = q.shape[-1] ** -0.5
    max_q = max(CASES[case][0])
    skip_unless_supported(VARLEN_ATTENTION, (q, k, v, cu_q, cu_k, max_q, causal, scale, 0.0, -1, None), backend)
    before = [t.clone() for t in (q, k, v, cu_q, cu_k)]
    with poisoned_outputs():
        out, lse = run_forced(backend, vtattn.varlen_attention, q, k, v, cu_q, cu_k, causal=causal,
                              return_lse=True)
    assert out.shape == q.shape and out.dtype == dtype and out.is_contiguous()
    assert lse.shape == (q.shape[1], q.shape[0]) and lse.dtype == torch.float32
    want_out, want_lse = naive(q, k, v, cu_q, cu_k, causal, scale)
    tol = OUT_TOL[dtype]
    torch.testing.assert_close(out.cpu().double(), want_out, atol=tol, rtol=tol)
    torch.testing.assert_close(lse.cpu().double(), want_lse, atol=1e-4, rtol=1e-5)
    for t, b in zip((q, k, v, cu_q, cu_k), before):
        assert torch.equal(t, b), "inputs must not be modified"


@pytest.mark.parametrize("device,backend", backend_params(VARLEN_ATTENTION))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_sequence_without_keys_is_zero_with_lse_minus_inf(device, backend, dtype):
    q, k, v, cu_q, cu_k, _ = make(2, dtype, device)  # sequence 1: 9 rows, no keys
    skip_unless_supported(VARLEN_ATTENTION, (q, k, v, cu_q, cu_k, 9, False, 0.125, 0.0, -1, None), backend)
    out, lse = run_forced(backend, vtattn.varlen_attention, q, k, v, cu_q, cu_k, return_lse=True)
    assert torch.all(out[5:14] == 0) and torch.all(lse[:, 5:14] == float("-inf"))
    assert torch.isfinite(lse[:, :5]).all() and torch.isfinite(lse[:, 14:]).all()


@pytest.mark.gpu
@pytest.mark.parametrize("D", (64, 72, 80, 128))
@pytest.mark.parametrize("dtype", (torch.float16, torch.bfloat16), ids=str)
@pytest.mark.parametrize("causal", (False, True))
def test_cuda_several_tiles(D, dtype, causal):
    """Several query and key tiles (128 x 64 in the CUDA kernel) with ragged tails, causal tile
    skipping, an empty sequence, a sequence without keys, GQA, q a view of [H, T, D] storage."""
    lq, lk = [300, 129, 0, 5, 513], [257, 129, 7, 0, 600]
    g = torch.Generator().manual_seed(D)
    q = packed(sum(lq), 6, D, dtype, "cuda", "strided", g)
    k, v = (packed(sum(lk), 2, D, dtype, "cuda", "contiguous", g) for _ in range(2))
    cu_q, cu_k = cu(lq, "cuda"), cu(lk, "cuda")
    with poisoned_outputs():
        out, lse = run_forced("cuda", vtattn.varlen_attention, q, k, v, cu_q, cu_k, causal=causal, return_lse=True)
    want_out, want_lse = naive(q, k, v, cu_q, cu_k, causal, D ** -0.5)
    torch.testing.assert_close(out.cpu().double(), want_out, atol=OUT_TOL[dtype], rtol=OUT_TOL[dtype])
    torch.testing.assert_close(lse.cpu().double(), want_lse, atol=1e-4, rtol=1e-5)


@pytest.mark.gpu
def test_cuda_refuses_fp32_and_dispatch_falls_back():
    q, k, v, cu_q, cu_k, causal = make(1, torch.float32, "cuda")
    args = (q, k, v, cu_q, cu_k, 33, causal, 0.125, 0.0, -1, None)
    assert "fp32 goes to Triton" in VARLEN_ATTENTION["cuda"].supports(*args)
    assert VARLEN_ATTENTION["cuda"].supports(*(t.half() if t.is_floating_point() else t for t in args[:5]),
                                             *args[5:]) is None
    out = vtattn.varlen_attention(q, k, v, cu_q, cu_k, causal=causal)
    torch.testing.assert_close(out.cpu().double(), naive(q, k, v, cu_q, cu_k, causal, 72 ** -0.5)[0],
                               atol=OUT_TOL[torch.float32], rtol=OUT_TOL[torch.float32])


# (case of CASES, softcap, window, sinks): each option alone and together, over empty sequences,
# sequences without keys (lse = the sink), Nq != Nk both ways and a window of 0.
OPTION_CASES = [(1, 5.0, None, False), (3, None, 6, False), (2, None, None, True), (4, 20.0, 0, True),
                (1, None, 3, True)]


@pytest.mark.parametrize("device,backend", backend_params(VARLEN_ATTENTION))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("opt", range(len(OPTION_CASES)))
def test_varlen_options_match_float64(device, backend, dtype, opt):
    case, softcap, window, use_sinks = OPTION_CASES[opt]
    q, k, v, cu_q, cu_k, causal = make(case, dtype, device, LAYOUTS[opt % 3], seed=opt)
    k = k * 3  # sharp rows: a wrong cap, window or sink shows
    Hq, scale = q.shape[1], q.shape[-1] ** -0.5
    sinks = torch.randn(Hq, generator=torch.Generator().manual_seed(opt)).to(device) if use_sinks else None
    opts = (softcap or 0.0, -1 if window is None else window, sinks)
    max_q = max(CASES[case][0])
    skip_unless_supported(VARLEN_ATTENTION, (q, k, v, cu_q, cu_k, max_q, causal, scale, *opts), backend)
    with poisoned_outputs():
        out, lse = run_forced(backend, vtattn.varlen_attention, q, k, v, cu_q, cu_k, causal=causal, return_lse=True,
                              softcap=softcap, window=window, sinks=sinks)
    want_out, want_lse = naive(q, k, v, cu_q, cu_k, causal, scale, *opts)
    tol = OUT_TOL[dtype]
    torch.testing.assert_close(out.cpu().double(), want_out, atol=tol, rtol=tol)
    torch.testing.assert_close(lse.cpu().double(), want_lse, atol=1e-4, rtol=1e-5)


def test_options_equal_attention_per_sequence():
    q, k, v, cu_q, cu_k, _ = make(4, torch.float32)
    sinks = torch.randn(3)
    opts = dict(causal=True, softcap=3.0, window=20, sinks=sinks)
    out, lse = vtattn.varlen_attention(q, k, v, cu_q, cu_k, return_lse=True, **opts)
    bq, bk = cu_q.tolist(), cu_k.tolist()
    for b in range(3):
        seq = lambda x, c: x[c[b]:c[b + 1]].transpose(0, 1)[None]  # noqa: E731
        want, want_lse = vtattn.attention(seq(q, bq), seq(k, bk), seq(v, bk), return_lse=True, **opts)
        torch.testing.assert_close(out[bq[b]:bq[b + 1]], want[0].transpose(0, 1))
        torch.testing.assert_close(lse[:, bq[b]:bq[b + 1]], want_lse[0])


def test_equals_attention_on_one_sequence():
    q, k, v, cu_q, cu_k, _ = make(6, torch.float32)
    out, lse = vtattn.varlen_attention(q, k, v, cu_q, cu_k, causal=True, return_lse=True)
    want, want_lse = vtattn.attention(*(t.transpose(0, 1)[None] for t in (q, k, v)), causal=True, return_lse=True)
    torch.testing.assert_close(out, want[0].transpose(0, 1))
    torch.testing.assert_close(lse, want_lse[0])


def test_reference_matches_float64():
    for case in (1, 3):
        q, k, v, cu_q, cu_k, causal = make(case, torch.float64, layout="strided")
        for opts in ((0.0, -1, None), (2.0, 4, torch.randn(q.shape[1], dtype=torch.float64))):
            out, lse = vtattn.reference.varlen_attention(q, k, v, cu_q, cu_k, 40, causal, 0.3, *opts)
            want_out, want_lse = naive(q, k, v, cu_q, cu_k, causal, 0.3, *opts)
            torch.testing.assert_close(out, want_out)
            torch.testing.assert_close(lse.double(), want_lse, atol=1e-5, rtol=1e-6)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_opcheck(device):
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    for case in (1, 4):
        q, k, v, cu_q, cu_k, _ = make(case, dtype, device, "strided")
        sinks = torch.randn(q.shape[1], device=device)
        for causal, opts in ((False, (0.0, -1, None)), (True, (0.0, -1, None)), (True, (4.0, 3, sinks))):
            torch.library.opcheck(torch.ops.vtattn.varlen_attention.default,
                                  (q, k, v, cu_q, cu_k, max(CASES[case][0]), causal, 0.125, *opts))


def test_meta_tensors_and_compile():
    q = torch.empty(50, 4, 72, device="meta", dtype=torch.float16)
    k = torch.empty(30, 2, 72, device="meta", dtype=torch.float16)
    cu_q = torch.empty(3, dtype=torch.int32, device="meta")
    out, lse = torch.ops.vtattn.varlen_attention(q, k, k, cu_q, cu_q, 40, False, 0.1, 0.0, -1, None)
    assert out.shape == (50, 4, 72) and lse.shape == (4, 50) and out.device.type == "meta"

    q, k, v, cu_q, cu_k, _ = make(1, torch.float32)
    fn = torch.compile(lambda q, k, v, a, b: vtattn.varlen_attention(q, k, v, a, b, max_seqlen_q=33, causal=True),
                       fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(fn(q, k, v, cu_q, cu_k), vtattn.varlen_attention(q, k, v, cu_q, cu_k, causal=True))
    opts = dict(causal=True, softcap=2.0, window=5)
    fn = torch.compile(lambda q, k, v, a, b, s: vtattn.varlen_attention(q, k, v, a, b, max_seqlen_q=33, sinks=s,
                                                                        **opts), fullgraph=True, backend="aot_eager")
    sinks = torch.randn(q.shape[1])
    torch.testing.assert_close(fn(q, k, v, cu_q, cu_k, sinks),
                               vtattn.varlen_attention(q, k, v, cu_q, cu_k, sinks=sinks, **opts))
    without = torch.compile(lambda q, k, v, a, b: vtattn.varlen_attention(q, k, v, a, b), fullgraph=True,
                            backend="aot_eager")
    with pytest.raises(Exception, match="max_seqlen_q must be given under torch.compile"):
        without(q, k, v, cu_q, cu_k)


BAD = [
    (lambda q, k, v, a, b: (q[0], k, v, a, b), ValueError, "q must be 3-D"),
    (lambda q, k, v, a, b: (q, k.half(), v, a, b), TypeError, "k has dtype"),
    (lambda q, k, v, a, b: (q[:, :3], k, v, a, b), ValueError, "multiple of k's"),
    (lambda q, k, v, a, b: (q, k, v[:, :, :8], a, b), ValueError, "v must have k's shape"),
    (lambda q, k, v, a, b: (q, k, v, a.long(), b), TypeError, "cu_seqlens_q must have dtype"),
    (lambda q, k, v, a, b: (q, k, v, a, b.flip(0)), ValueError, "cu_seqlens_k must start at 0 and be non-decreasing"),
    (lambda q, k, v, a, b: (q, k, v, torch.tensor([0, 30, 20, 50], dtype=torch.int32), b), ValueError,
     "non-decreasing"),
    (lambda q, k, v, a, b: (q, k, v, a + torch.tensor([0, 0, 0, 1], dtype=torch.int32), b), ValueError,
     "must end at the packed length 50"),
    (lambda q, k, v, a, b: (q, k, v, torch.tensor([0, 50], dtype=torch.int32), b), ValueError, "both B \\+ 1"),
    (lambda q, k, v, a, b: (q, k, v, a.to("meta"), b), ValueError, "cu_seqlens_q is on meta"),
]


@pytest.mark.parametrize("bad", range(len(BAD)))
def test_bad_inputs_raise_naming_the_argument(bad):
    q, k, v, cu_q, cu_k, _ = make(1, torch.float32)
    make_args, exc, msg = BAD[bad]
    with pytest.raises(exc, match=msg):
        vtattn.varlen_attention(*make_args(q, k, v, cu_q, cu_k))


def test_bad_options():
    q, k, v, cu_q, cu_k, _ = make(1, torch.float32)
    with pytest.raises(ValueError, match="window must be an int >= 0"):
        vtattn.varlen_attention(q, k, v, cu_q, cu_k, window=-3)
    with pytest.raises(ValueError, match="softcap must be"):
        vtattn.varlen_attention(q, k, v, cu_q, cu_k, softcap=-2.0)
    with pytest.raises(ValueError, match=r"sinks must have one logit per query head, \[4\]"):
        vtattn.varlen_attention(q, k, v, cu_q, cu_k, sinks=torch.zeros(2))


def test_bad_max_seqlen():
    q, k, v, cu_q, cu_k, _ = make(1, torch.float32)
    with pytest.raises(ValueError, match="max_seqlen_q=32 is below the longest sequence \\(33\\)"):
        vtattn.varlen_attention(q, k, v, cu_q, cu_k, max_seqlen_q=32)
    with pytest.raises(ValueError, match="max_seqlen_k=3 is below"):
        vtattn.varlen_attention(q, k, v, cu_q, cu_k, max_seqlen_k=3)
