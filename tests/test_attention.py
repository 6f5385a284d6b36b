import pytest
import torch

import vtattn
from vtattn._registry import ATTENTION
from helpers import (DTYPES, OUT_TOL, backend_params, naive_attention, naive_lse, poisoned_outputs, rand_qkv,
                     run_forced, skip_unless_supported)

# (B, Hq, Hkv, Nq, Nk, D, causal): odd sizes, GQA, causal with Nq != Nk both ways.
CASES = [
    (2, 2, 2, 1, 1, 64, False),
    (2, 4, 2, 17, 17, 72, True),
    (1, 4, 1, 17, 33, 80, True),
    (1, 2, 2, 33, 17, 128, True),  # the first 16 rows see no key
    (2, 2, 1, 577, 577, 64, False),
    (1, 2, 2, 577, 577, 72, True),
    (1, 2, 1, 1000, 1000, 128, False),
    (1, 3, 3, 5, 300, 80, False),
]
LAYOUTS = ("contiguous", "strided", "sliced")


@pytest.mark.parametrize("device,backend", backend_params(ATTENTION))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", range(len(CASES)))
def test_attention_matches_float64(device, backend, dtype, case):
    B, Hq, Hkv, Nq, Nk, D, causal = CASES[case]
    q, k, v = rand_qkv(B, Hq, Hkv, Nq, Nk, D, dtype, device, LAYOUTS[case % 3])
    scale = D ** -0.5
    skip_unless_supported(ATTENTION, (q, k, v, causal, scale, 0.0, -1, None), backend)
    before = [t.clone() for t in (q, k, v)]
    out, lse = run_forced(backend, vtattn.attention, q, k, v, causal=causal, return_lse=True)

    assert out.shape == q.shape and out.dtype == dtype
    assert out.transpose(1, 2).is_contiguous(), "out must be laid out as [B, Nq, Hq, D]"
    assert lse.shape == q.shape[:3] and lse.dtype == torch.float32
    want = naive_attention(q, k, v, causal, scale)
    tol = OUT_TOL[dtype]
    torch.testing.assert_close(out.double(), want, atol=tol, rtol=tol)
    logits = (q.double() @ k.double().repeat_interleave(Hq // Hkv, 1).transpose(-1, -2)) * scale
    if causal:
        i = torch.arange(Nq, device=device)[:, None]
        logits = logits.masked_fill(torch.arange(Nk, device=device) > i + Nk - Nq, float("-inf"))
    torch.testing.assert_close(lse.double(), torch.logsumexp(logits, -1), atol=1e-4, rtol=1e-5)
    for t, b in zip((q, k, v), before):
        assert torch.equal(t, b), "inputs must not be modified"


@pytest.mark.parametrize("device,backend", backend_params(ATTENTION))
def test_rows_without_keys_are_zero_with_lse_minus_inf(device, backend):
    q, k, v = rand_qkv(1, 2, 1, 9, 4, 64, torch.float32, device)
    skip_unless_supported(ATTENTION, (q, k, v, True, 0.125, 0.0, -1, None), backend)
    out, lse = run_forced(backend, vtattn.attention, q, k, v, causal=True, return_lse=True)
    assert torch.all(out[:, :, :5] == 0) and torch.all(lse[:, :, :5] == float("-inf"))
    assert torch.isfinite(lse[:, :, 5:]).all() and torch.isfinite(out).all()


# (B, Hq, Hkv, Nq, Nk, D, causal, softcap, window, sinks): each option alone and together, windows of
# 0 keys (the own key only), inside and wider than the sequence, Nq != Nk both ways, GQA.
OPTION_CASES = [
    (2, 4, 2, 17, 17, 64, True, 5.0, None, False),
    (1, 2, 1, 33, 70, 72, False, None, 9, False),
    (1, 4, 2, 40, 25, 80, True, None, 0, True),  # the first 15 rows see no key: out 0, lse = sink
    (2, 2, 2, 50, 50, 64, False, None, None, True),
    (1, 4, 1, 65, 130, 128, True, 20.0, 37, True),
    (1, 2, 2, 20, 20, 64, False, 0.5, 100, True),  # the window covers every key
]


def _options(case, device):
    *_, softcap, window, use_sinks = OPTION_CASES[case]
    Hq = OPTION_CASES[case][1]
    sinks = torch.randn(Hq, generator=torch.Generator().manual_seed(case)).mul(2).to(device) if use_sinks else None
    return softcap, window, sinks


def _op_args(q, k, v, causal, scale, softcap, window, sinks):
    """The registered op's arguments for the public options (what a backend's supports() is asked)."""
    return q, k, v, causal, scale, softcap or 0.0, -1 if window is None else window, sinks


@pytest.mark.parametrize("device,backend", backend_params(ATTENTION))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", range(len(OPTION_CASES)))
def test_attention_options_match_float64(device, backend, dtype, case):
    B, Hq, Hkv, Nq, Nk, D, causal = OPTION_CASES[case][:7]
    softcap, window, sinks = _options(case, device)
    q, k, v = rand_qkv(B, Hq, Hkv, Nq, Nk, D, dtype, device, LAYOUTS[case % 3], seed=case)
    k = k * 3  # sharp rows: a wrong cap, window or sink shows
    scale = D ** -0.5
    skip_unless_supported(ATTENTION, _op_args(q, k, v, causal, scale, softcap, window, sinks), backend)
    out, lse = run_forced(backend, vtattn.attention, q, k, v, causal=causal, return_lse=True, softcap=softcap,
                          window=window, sinks=sinks)
    assert out.transpose(1, 2).is_contiguous() and lse.dtype == torch.float32
    opts = (softcap or 0.0, -1 if window is None else window, sinks)
    tol = OUT_TOL[dtype]
    torch.testing.assert_close(out.double(), naive_attention(q, k, v, causal, scale, *opts), atol=tol, rtol=tol)
    torch.testing.assert_close(lse.double(), naive_lse(q, k, causal, scale, *opts), atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("device,backend", backend_params(ATTENTION))
def test_rows_without_keys_take_the_sink(device, backend):
    q, k, v = rand_qkv(1, 2, 1, 9, 4, 64, torch.float32, device)
    sinks = torch.tensor([0.5, -2.0], device=device)
    skip_unless_supported(ATTENTION, (q, k, v, True, 0.125, 0.0, -1, sinks), backend)
    out, lse = run_forced(backend, vtattn.attention, q, k, v, causal=True, return_lse=True, sinks=sinks)
    assert torch.all(out[:, :, :5] == 0) and torch.isfinite(out).all()
    torch.testing.assert_close(lse[0, :, :5], sinks[:, None].expand(2, 5))
    # no keys at all
    out, lse = run_forced(backend, vtattn.attention, q, k[:, :, :0], v[:, :, :0], return_lse=True, sinks=sinks)
    assert torch.all(out == 0)
    torch.testing.assert_close(lse[0], sinks[:, None].expand(2, 9))


# One query row (a decode step; the C++ kernel's key-by-key path, not its tiles): (B, Hq, Hkv, Nq, Nk,
# D, causal, softcap, window, sinks, layout). Key counts that are not multiples of the vector width
# and span several 64-key chunks (the online softmax rescales), odd head dims, GQA, every option;
# "d-strided" views have a head dim that is not unit-stride. Nq 65 ends in a block of one row.
ONE_ROW_CASES = [
    (1, 2, 2, 1, 1, 72, False, None, None, False, "contiguous"),  # a single key
    (2, 4, 2, 1, 3, 40, True, None, None, False, "strided"),
    (1, 8, 2, 1, 17, 128, True, 5.0, None, True, "sliced"),
    (1, 4, 1, 1, 130, 72, False, None, 9, False, "d-strided"),
    (2, 3, 3, 1, 130, 64, True, 20.0, 100, True, "strided"),
    (1, 4, 2, 1, 24, 128, True, None, 0, False, "d-strided"),  # window 0: the last key only
    (1, 2, 1, 65, 130, 40, True, 3.0, 70, True, "sliced"),
]


def _d_strided(t):
    """The same values with a head dim of stride N (no unit-stride rows)."""
    return t.transpose(-1, -2).contiguous().transpose(-1, -2)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", range(len(ONE_ROW_CASES)))
def test_one_query_row_matches_float64(dtype, case):
    B, Hq, Hkv, Nq, Nk, D, causal, softcap, window, use_sinks, layout = ONE_ROW_CASES[case]
    strided = layout == "d-strided"
    q, k, v = rand_qkv(B, Hq, Hkv, Nq, Nk, D, dtype, layout="contiguous" if strided else layout, seed=case)
    if strided:
        q, k, v = map(_d_strided, (q, k, v))
        assert k.stride(-1) == Nk
    k = k * 3  # sharp rows: a wrong cap, window or sink shows
    sinks = torch.randn(Hq, generator=torch.Generator().manual_seed(case)).mul(2) if use_sinks else None
    scale = D ** -0.5
    with poisoned_outputs():
        out, lse = run_forced("cpp", vtattn.attention, q, k, v, causal=causal, return_lse=True, softcap=softcap,
                              window=window, sinks=sinks)
    assert out.transpose(1, 2).is_contiguous() and out.dtype == dtype and lse.dtype == torch.float32
    opts = (softcap or 0.0, -1 if window is None else window, sinks)
    tol = OUT_TOL[dtype]
    torch.testing.assert_close(out.double(), naive_attention(q, k, v, causal, scale, *opts), atol=tol, rtol=tol)
    torch.testing.assert_close(lse.double(), naive_lse(q, k, causal, scale, *opts), atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_one_query_row_without_keys(dtype):
    q, k, v = rand_qkv(1, 4, 2, 1, 0, 72, dtype, layout="strided")
    sinks = torch.tensor([0.5, -2.0, 1.0, 3.0])
    with poisoned_outputs():
        out, lse = run_forced("cpp", vtattn.attention, q, k, v, causal=True, return_lse=True)
        assert torch.all(out == 0) and torch.all(lse == float("-inf"))
        out, lse = run_forced("cpp", vtattn.attention, q, k, v, return_lse=True, window=3, sinks=sinks)
    assert torch.all(out == 0)
    torch.testing.assert_close(lse[0, :, 0], sinks)


def test_reference_matches_float64():
    q, k, v = rand_qkv(2, 4, 2, 37, 53, 72, torch.float64, layout="strided")
    sinks = torch.randn(4, dtype=torch.float64)
    for causal in (False, True):
        out, lse = vtattn.reference.attention(q, k, v, causal, 0.3)
        torch.testing.assert_close(out, naive_attention(q, k, v, causal, 0.3))
        for opts in ((2.0, -1, None), (0.0, 5, None), (0.0, -1, sinks), (1.5, 0, sinks), (0.0, 60, sinks)):
            out, lse = vtattn.reference.attention(q, k, v, causal, 0.3, *opts)
            torch.testing.assert_close(out, naive_attention(q, k, v, causal, 0.3, *opts))
            torch.testing.assert_close(lse.double(), naive_lse(q, k, causal, 0.3, *opts), atol=1e-5, rtol=1e-6)


def test_window_semantics():
    """window w: row i sees the w keys before its own position and that key (FlashAttention's
    window_size=(w, 0) under causal); without causal the keys right of it stay visible."""
    q, k, v = rand_qkv(1, 1, 1, 6, 6, 16, torch.float64)
    row4 = torch.tensor([[4]])
    for causal, seen in ((True, [2, 3, 4]), (False, [2, 3, 4, 5])):
        p = vtattn.reference.key_importance(q, k, None, row4, causal, 1.0, 0.0, 2)
        assert p[0, 0].nonzero().flatten().tolist() == seen


def test_default_scale_and_return_lse_flag():
    q, k, v = rand_qkv(1, 2, 2, 8, 8, 64, torch.float32)
    out = vtattn.attention(q, k, v)
    torch.testing.assert_close(out, vtattn.attention(q, k, v, scale=0.125))
    assert isinstance(out, torch.Tensor)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_opcheck(device):
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    for Hkv, layout in ((2, "strided"), (4, "contiguous")):  # GQA (own kernels) and MHA (aten)
        q, k, v = rand_qkv(2, 4, Hkv, 17, 23, 64, dtype, device, layout)
        sinks = torch.randn(4, device=device)
        for causal in (False, True):
            torch.library.opcheck(torch.ops.vtattn.attention.default, (q, k, v, causal, 0.125, 0.0, -1, None))
            torch.library.opcheck(torch.ops.vtattn.attention.default, (q, k, v, causal, 0.125, 3.0, 5, sinks))


def test_meta_tensors_and_compile():
    q, k, v = rand_qkv(2, 4, 2, 17, 23, 72, torch.float16, device="meta")
    out, lse = vtattn.attention(q, k, v, return_lse=True)
    assert out.shape == (2, 4, 17, 72) and lse.shape == (2, 4, 17) and out.device.type == "meta"

    q, k, v = rand_qkv(2, 4, 2, 17, 23, 64, torch.float32)
    fn = torch.compile(lambda q, k, v: vtattn.attention(q, k, v, causal=True), fullgraph=True,
                       backend="aot_eager")
    torch.testing.assert_close(fn(q, k, v), vtattn.attention(q, k, v, causal=True))
    sinks = torch.randn(4)
    opts = dict(causal=True, softcap=5.0, window=7, sinks=sinks)
    fn = torch.compile(lambda q, k, v, s: vtattn.attention(q, k, v, **{**opts, "sinks": s}), fullgraph=True,
                       backend="aot_eager")
    torch.testing.assert_close(fn(q, k, v, sinks), vtattn.attention(q, k, v, **opts))


BAD = [
    (lambda q, k, v: (q[0], k, v), ValueError, "q must be 4-D"),
    (lambda q, k, v: (q, k.half(), v), TypeError, "k has dtype"),
    (lambda q, k, v: (q.int(), k, v), TypeError, "q must have dtype"),
    (lambda q, k, v: (q, k[:, :, :, :32], v), ValueError, "k has head dim"),
    (lambda q, k, v: (q, k, v[:, :, :5]), ValueError, "v must have k's shape"),
    (lambda q, k, v: (q[:, :3], k, v), ValueError, "multiple of k's"),
    (lambda q, k, v: (q, k[:1], v[:1]), ValueError, "k has batch"),
    (lambda q, k, v: (q, k.to("meta"), v), ValueError, "k is on meta"),
    (lambda q, k, v: (q.tolist(), k, v), TypeError, "q must be a torch.Tensor"),
]


@pytest.mark.parametrize("bad", range(len(BAD)))
def test_bad_inputs_raise_naming_the_argument(bad):
    q, k, v = rand_qkv(2, 4, 2, 8, 8, 64, torch.float32)
    make, exc, msg = BAD[bad]
    with pytest.raises(exc, match=msg):
        vtattn.attention(*make(q, k, v))


BAD_OPTIONS = [
    (dict(softcap=-1.0), ValueError, "softcap must be a finite number >= 0"),
    (dict(softcap=float("nan")), ValueError, "softcap must be"),
    (dict(softcap=float("inf")), ValueError, "softcap must be"),
    (dict(softcap="30"), TypeError, "softcap must be a float"),
    (dict(window=-1), ValueError, "window must be an int >= 0"),
    (dict(window=2.0), ValueError, "window must be an int"),
    (dict(window=True), ValueError, "window must be an int"),
    (dict(sinks=[0.0] * 4), TypeError, "sinks must be a torch.Tensor"),
    (dict(sinks=torch.zeros(2)), ValueError, r"sinks must have one logit per query head, \[4\]"),
    (dict(sinks=torch.zeros(1, 4)), ValueError, "sinks must be 1-D"),
    (dict(sinks=torch.zeros(4, dtype=torch.int64)), TypeError, "sinks must be a float tensor"),
    (dict(sinks=torch.zeros(4, device="meta")), ValueError, "sinks is on meta"),
]


@pytest.mark.parametrize("bad", range(len(BAD_OPTIONS)))
def test_bad_options_raise_naming_the_argument(bad):
    q, k, v = rand_qkv(2, 4, 2, 8, 8, 64, torch.float32)
    kwargs, exc, msg = BAD_OPTIONS[bad]
    with pytest.raises(exc, match=msg):
        vtattn.attention(q, k, v, **kwargs)


def test_options_off_equal_the_plain_call():
    q, k, v = rand_qkv(1, 2, 2, 8, 8, 64, torch.float32)
    want = vtattn.attention(q, k, v, causal=True)
    for off in (dict(softcap=None, window=None, sinks=None), dict(softcap=0), dict(window=8), dict(window=100)):
        torch.testing.assert_close(vtattn.attention(q, k, v, causal=True, **off), want)
    # fp16 sinks are read as fp32
    s = torch.randn(2).half()
    torch.testing.assert_close(vtattn.attention(q, k, v, sinks=s), vtattn.attention(q, k, v, sinks=s.float()))


def test_backends_refuse_options_they_lack():
    q, k, v = rand_qkv(1, 2, 2, 8, 8, 64, torch.float32)
    for i, name in enumerate(("softcap", "window", "sinks")):
        opts = [0.0, -1, None]
        opts[i] = (1.0, 3, torch.zeros(2))[i]
        assert name in ATTENTION["aten"].supports(q, k, v, False, 0.1, *opts)
    with vtattn.use_backend("aten"), pytest.raises(vtattn.BackendUnavailable, match="softcap"):
        vtattn.attention(q, k, v, softcap=2.0)


def test_bad_scale():
    q, k, v = rand_qkv(1, 1, 1, 4, 4, 64, torch.float32)
    with pytest.raises(ValueError, match="scale must be finite"):
        vtattn.attention(q, k, v, scale=float("nan"))
