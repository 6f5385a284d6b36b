"""The CUDA kernels of attention, varlen_attention and key_importance with softcap, a left window and
sinks (the tensor-core flash kernel's option instantiation, key_importance's few-rows and column
kernels), against the float64 reference. GPU only; the CPU kernels run the shared tests."""
import pytest
import torch

import vtattn
from helpers import OUT_TOL, PROB_TOL, poisoned_outputs, rand_qkv, run_forced

pytestmark = pytest.mark.gpu
HALF = (torch.float16, torch.bfloat16)
# (softcap, window, sinks): each alone, all together, and a window of 0 (the own key only).
OPTIONS = [(5.0, None, False), (None, 37, False), (None, None, True), (30.0, 100, True), (None, 0, True)]


def _sinks(H, on, device="cuda"):
    return torch.randn(H, generator=torch.Generator().manual_seed(H)).mul(2).to(device) if on else None


def _cpu64(*ts):
    return [None if t is None else t.detach().cpu().double() for t in ts]


def _want_attention(q, k, v, causal, scale, softcap, window, sinks):
    out, lse = vtattn.reference.attention(*_cpu64(q, k, v), causal, scale, softcap or 0.0,
                                          -1 if window is None else window, *_cpu64(sinks))
    return out, lse.double()


@pytest.mark.parametrize("dtype", HALF, ids=str)
@pytest.mark.parametrize("D", (64, 72, 128))
@pytest.mark.parametrize("causal", (False, True))
@pytest.mark.parametrize("opt", range(len(OPTIONS)))
def test_attention(dtype, D, causal, opt):
    """Several 128 x 64 tiles with ragged tails, Nq != Nk both ways, GQA, strided q: tiles wholly
    left of the window are skipped, tiles across its edge are masked."""
    softcap, window, use_sinks = OPTIONS[opt]
    for Nq, Nk in ((300, 300), (129, 700), (700, 129)):
        q, k, v = rand_qkv(2, 4, 2, Nq, Nk, D, dtype, "cuda", "strided", seed=Nq + D)
        k = k * 2  # sharper rows: a wrong mask or cap shows
        sinks = _sinks(4, use_sinks)
        with poisoned_outputs():
            out, lse = run_forced("cuda", vtattn.attention, q, k, v, causal=causal, return_lse=True,
                                  softcap=softcap, window=window, sinks=sinks)
        want_out, want_lse = _want_attention(q, k, v, causal, D ** -0.5, softcap, window, sinks)
        torch.testing.assert_close(out.cpu().double(), want_out, atol=OUT_TOL[dtype], rtol=OUT_TOL[dtype])
        torch.testing.assert_close(lse.cpu().double(), want_lse, atol=2e-4, rtol=1e-5)


def test_attention_rows_without_keys_take_the_sink():
    q, k, v = rand_qkv(1, 2, 1, 9, 4, 64, torch.float16, "cuda", seed=0)
    sinks = torch.tensor([0.5, -1.0], device="cuda")
    out, lse = run_forced("cuda", vtattn.attention, q, k, v, causal=True, return_lse=True, sinks=sinks)
    assert torch.all(out[:, :, :5] == 0)
    assert torch.equal(lse[0, :, :5].cpu(), sinks.cpu()[:, None].expand(2, 5))
    # no keys at all: the launcher's early path
    out, lse = run_forced("cuda", vtattn.attention, q, k[:, :, :0], v[:, :, :0], return_lse=True, sinks=sinks)
    assert torch.all(out == 0) and torch.equal(lse[0].cpu(), sinks.cpu()[:, None].expand(2, 9))


def test_attention_nan_stays_in_its_row():
    q, k, v = rand_qkv(1, 2, 2, 200, 200, 64, torch.bfloat16, "cuda", seed=1)
    q[0, 0, 150] = float("nan")
    for kwargs in ({}, dict(softcap=5.0, window=20, sinks=_sinks(2, True))):
        out, lse = run_forced("cuda", vtattn.attention, q, k, v, causal=True, return_lse=True, **kwargs)
        assert out[0, 0, 150].isnan().all() and lse[0, 0, 150].isnan()
        assert not out[0, :, :150].isnan().any() and not lse[0, 1].isnan().any()


def _varlen_case(D, dtype):
    lq, lk = [300, 129, 0, 5, 513], [257, 129, 7, 0, 600]
    g = torch.Generator().manual_seed(D)
    q = torch.randn(6, sum(lq), D, generator=g).to("cuda", dtype).transpose(0, 1)  # strided view
    k, v = (torch.randn(sum(lk), 2, D, generator=g).to("cuda", dtype) * s for s in (2, 1))
    cu = [torch.tensor([0] + torch.tensor(x).cumsum(0).tolist(), dtype=torch.int32, device="cuda") for x in (lq, lk)]
    return q, k, v, *cu, max(lq)


@pytest.mark.parametrize("dtype", HALF, ids=str)
@pytest.mark.parametrize("D", (64, 80, 128))
@pytest.mark.parametrize("causal", (False, True))
@pytest.mark.parametrize("opt", range(len(OPTIONS)))
def test_varlen_attention(dtype, D, causal, opt):
    """Per-sequence windows and sinks, with an empty sequence and one without keys (its rows: out 0,
    lse = the sink)."""
    softcap, window, use_sinks = OPTIONS[opt]
    q, k, v, cu_q, cu_k, longest = _varlen_case(D, dtype)
    sinks = _sinks(6, use_sinks)
    with poisoned_outputs():
        out, lse = run_forced("cuda", vtattn.varlen_attention, q, k, v, cu_q, cu_k, max_seqlen_q=longest,
                              causal=causal, return_lse=True, softcap=softcap, window=window, sinks=sinks)
    want_out, want_lse = vtattn.reference.varlen_attention(
        *_cpu64(q, k, v), cu_q.cpu(), cu_k.cpu(), longest, causal, D ** -0.5, softcap or 0.0,
        -1 if window is None else window, *_cpu64(sinks))
    torch.testing.assert_close(out.cpu().double(), want_out, atol=OUT_TOL[dtype], rtol=OUT_TOL[dtype])
    torch.testing.assert_close(lse.cpu().double(), want_lse.double(), atol=2e-4, rtol=1e-5)


@pytest.mark.parametrize("dtype", HALF + (torch.float32,), ids=str)
@pytest.mark.parametrize("causal", (False, True))
@pytest.mark.parametrize("opt", range(len(OPTIONS)))
def test_key_importance(dtype, causal, opt):
    """The few-rows kernels (<= 16 rows, fp32 too) and, in fp16/bf16, the LSE-only flash pass and the
    column kernel (> 16 rows, with the window's row-tile skipping), each with and without a given lse."""
    softcap, window, use_sinks = OPTIONS[opt]
    B, H, Nq, Nk, D = 2, 4, 300, 700, 72
    q, k, _ = rand_qkv(B, H, 2, Nq, Nk, D, dtype, "cuda", "strided", seed=opt)
    sinks = _sinks(H, use_sinks)
    w = -1 if window is None else window
    many = torch.randint(0, Nq, (B, 40), generator=torch.Generator().manual_seed(3)).to("cuda")
    row_sets = {"few": torch.tensor([[0, 299, 5, 5], [150, 150, 299, 7]], device="cuda"), "many": many}
    if dtype != torch.float32:
        row_sets["all"] = "all"
    lse = vtattn.reference.attention(*_cpu64(q, k, k), causal, D ** -0.5, softcap or 0.0, w, *_cpu64(sinks))[1]
    for name, rows in row_sets.items():
        if dtype == torch.float32 and name == "many":
            continue  # fp32 with > 16 rows is Triton's
        op_rows = None if isinstance(rows, str) else rows.cpu()
        want = vtattn.reference.key_importance(*_cpu64(q, k), None, op_rows, causal, D ** -0.5, softcap or 0.0, w,
                                               *_cpu64(sinks)).double()
        n = Nq if op_rows is None else op_rows.shape[1]
        for given in (None, lse.float().cuda()):
            got = run_forced("cuda", vtattn.key_importance, q, k, rows=rows, lse=given, causal=causal,
                             softcap=softcap, window=window, sinks=sinks)
            torch.testing.assert_close(got.cpu().double(), want, atol=PROB_TOL[dtype] * max(1, n ** 0.5), rtol=1e-4,
                                       msg=lambda m: f"rows={name} lse={given is not None}: {m}")
