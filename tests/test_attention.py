import pytest
import torch

import vtattn
from vtattn._registry import ATTENTION
from helpers import (DTYPES, OUT_TOL, backend_params, naive_attention, rand_qkv, run_forced,
                     skip_unless_supported)

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
    skip_unless_supported(ATTENTION, (q, k, v, causal, scale), backend)
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
    skip_unless_supported(ATTENTION, (q, k, v, True, 0.125), backend)
    out, lse = run_forced(backend, vtattn.attention, q, k, v, causal=True, return_lse=True)
    assert torch.all(out[:, :, :5] == 0) and torch.all(lse[:, :, :5] == float("-inf"))
    assert torch.isfinite(lse[:, :, 5:]).all() and torch.isfinite(out).all()


def test_reference_matches_float64():
    q, k, v = rand_qkv(2, 4, 2, 37, 53, 72, torch.float64, layout="strided")
    for causal in (False, True):
        out, lse = vtattn.reference.attention(q, k, v, causal, 0.3)
        torch.testing.assert_close(out, naive_attention(q, k, v, causal, 0.3))


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
        for causal in (False, True):
            torch.library.opcheck(torch.ops.vtattn.attention.default, (q, k, v, causal, 0.125))


def test_meta_tensors_and_compile():
    q, k, v = rand_qkv(2, 4, 2, 17, 23, 72, torch.float16, device="meta")
    out, lse = vtattn.attention(q, k, v, return_lse=True)
    assert out.shape == (2, 4, 17, 72) and lse.shape == (2, 4, 17) and out.device.type == "meta"

    q, k, v = rand_qkv(2, 4, 2, 17, 23, 64, torch.float32)
    fn = torch.compile(lambda q, k, v: vtattn.attention(q, k, v, causal=True), fullgraph=True,
                       backend="aot_eager")
    torch.testing.assert_close(fn(q, k, v), vtattn.attention(q, k, v, causal=True))


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


def test_bad_scale():
    q, k, v = rand_qkv(1, 1, 1, 4, 4, 64, torch.float32)
    with pytest.raises(ValueError, match="scale must be finite"):
        vtattn.attention(q, k, v, scale=float("nan"))
