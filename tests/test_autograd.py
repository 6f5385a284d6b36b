"""Gradients of attention and varlen_attention (FlashAttention's backward in PyTorch from the saved LSE,
python/vtattn/_autograd.py) and gather_tokens, and the refusal of grad-requiring inputs by every other op."""
import pytest
import torch

import vtattn
from vtattn import _autograd
from vtattn._registry import ATTENTION, OPS, SAMPLES, VARLEN_ATTENTION
from helpers import naive_attention, naive_lse, rand_qkv, run_forced, skip_unless_supported

# (B, Hq, Hkv, Nq, Nk, causal, softcap, window, sinks): GQA, Nq != Nk both ways, each option alone and
# together; rows without keys only with sinks (else the naive lse's gradient is NaN there).
CASES = [
    (1, 2, 2, 5, 5, False, 0.0, -1, False),
    (2, 2, 1, 4, 6, True, 0.0, -1, False),
    (1, 2, 2, 6, 4, True, 0.0, -1, True),  # the first 2 rows see no key: lse = sink
    (1, 4, 2, 5, 7, False, 0.0, 2, False),
    (1, 2, 1, 5, 5, True, 1.5, 1, True),
    (2, 2, 2, 3, 6, False, 2.0, -1, True),
]


def _inputs(case, dtype, seed=0):
    B, Hq, Hkv, Nq, Nk, causal, softcap, window, use_sinks = CASES[case]
    q, k, v = (t.mul(2).requires_grad_() for t in rand_qkv(B, Hq, Hkv, Nq, Nk, 8, dtype, seed=seed + case))
    sinks = torch.randn(Hq, dtype=dtype, generator=torch.Generator().manual_seed(case)).requires_grad_()
    return q, k, v, sinks if use_sinks else None, (causal, 0.4, softcap, window)


@pytest.mark.parametrize("case", range(len(CASES)))
def test_attention_gradcheck_float64(case):
    q, k, v, sinks, (causal, scale, softcap, window) = _inputs(case, torch.float64)
    leaves = (q, k, v) if sinks is None else (q, k, v, sinks)

    def fn(q, k, v, sinks=None):
        return torch.ops.vtattn.attention(q, k, v, causal, scale, softcap, window, sinks)[0]

    with vtattn.use_backend("torch"):
        assert torch.autograd.gradcheck(fn, leaves)


def _grads_against_naive(out, lse, q, k, v, sinks, opts, keep_lse=True):
    """The op's gradients of <out, dout> + <lse, dlse> against autograd through the float64 naive
    computation on the same values."""
    causal, scale, softcap, window = opts
    g = torch.Generator().manual_seed(1)
    dout, dlse = torch.randn(out.shape, generator=g), torch.randn(lse.shape, generator=g) * keep_lse
    leaves = [t for t in (q, k, v, sinks) if t is not None]
    got = torch.autograd.grad((out, lse), leaves, (dout.to(out.dtype), dlse))
    ref = [t.detach().double().requires_grad_() for t in leaves]
    q64, k64, v64, s64 = (*ref, None)[:4]
    want_out = naive_attention(q64, k64, v64, causal, scale, softcap, window, s64)
    want_lse = naive_lse(q64, k64, causal, scale, softcap, window, s64)
    want = torch.autograd.grad((want_out, want_lse), ref, (dout.double(), dlse.double()))
    for name, a, b in zip("q k v sinks".split(), got, want):
        torch.testing.assert_close(a.double(), b, atol=2e-5, rtol=2e-5, msg=lambda m: f"d{name}: {m}")


@pytest.mark.parametrize("backend", ["cpp", "torch"])
@pytest.mark.parametrize("case", range(len(CASES)))
def test_attention_fp32_grads_match_naive_autograd(backend, case, monkeypatch):
    """Whichever backend ran the forward (the backward only reads its out and lse); one query row per
    chunk, so the chunk loop runs."""
    monkeypatch.setattr(_autograd, "CHUNK_LOGITS", 1)
    q, k, v, sinks, opts = _inputs(case, torch.float32)
    causal, scale, softcap, window = opts
    skip_unless_supported(ATTENTION, (q, k, v, causal, scale, softcap, window, sinks), backend)
    out, lse = run_forced(backend, vtattn.attention, q, k, v, causal=causal, scale=scale, return_lse=True,
                          softcap=softcap, window=None if window < 0 else window, sinks=sinks)
    _grads_against_naive(out, lse, q, k, v, sinks, opts)


def test_low_precision_inputs_get_gradients_in_their_dtype():
    q, k, v, sinks, (causal, scale, softcap, window) = _inputs(4, torch.float32)
    leaves = [t.detach().bfloat16().requires_grad_() for t in (q, k, v)] + [sinks.detach().half().requires_grad_()]
    out = vtattn.attention(*leaves[:3], causal=causal, scale=scale, softcap=softcap, window=window, sinks=leaves[3])
    out.float().square().sum().backward()
    assert [t.grad.dtype for t in leaves] == [torch.bfloat16] * 3 + [torch.float16]
    assert all(torch.isfinite(t.grad).all() for t in leaves)


VARLEN = ([3, 0, 5, 2], [4, 2, 0, 6])  # an empty sequence, a sequence without keys, Nq != Nk both ways


def _varlen_inputs(dtype, Hq=4, Hkv=2, D=8):
    g = torch.Generator().manual_seed(3)
    lq, lk = VARLEN
    q = torch.randn(sum(lq), Hq, D, generator=g, dtype=dtype).requires_grad_()
    k, v = (torch.randn(sum(lk), Hkv, D, generator=g, dtype=dtype).requires_grad_() for _ in range(2))
    cu = lambda lens: torch.tensor([0] + lens).cumsum(0).to(torch.int32)  # noqa: E731
    return q, k, v, cu(lq), cu(lk), torch.randn(Hq, generator=g, dtype=dtype).requires_grad_()


@pytest.mark.parametrize("opts", [(False, 0.0, -1, False), (True, 0.0, -1, False), (True, 1.5, 1, True),
                                  (False, 0.0, 0, True)])
def test_varlen_gradcheck_float64(opts):
    causal, softcap, window, use_sinks = opts
    q, k, v, cu_q, cu_k, sinks = _varlen_inputs(torch.float64, Hq=2, Hkv=1, D=4)

    def fn(q, k, v, sinks=None):
        return torch.ops.vtattn.varlen_attention(q, k, v, cu_q, cu_k, 5, causal, 0.4, softcap, window, sinks)[0]

    with vtattn.use_backend("torch"):
        assert torch.autograd.gradcheck(fn, (q, k, v, sinks) if use_sinks else (q, k, v), fast_mode=True)


@pytest.mark.parametrize("backend", ["cpp", "torch"])
@pytest.mark.parametrize("opts", [(True, 0.0, -1, False), (True, 3.0, 2, True)])
def test_varlen_fp32_grads_equal_attention_per_sequence(backend, opts, monkeypatch):
    """varlen's gradients (packed, every sequence in one chunk loop) equal those of attention run
    sequence by sequence."""
    monkeypatch.setattr(_autograd, "CHUNK_LOGITS", 16)
    causal, softcap, window, use_sinks = opts
    q, k, v, cu_q, cu_k, sinks = _varlen_inputs(torch.float32)
    sinks = sinks if use_sinks else None
    args = (q, k, v, cu_q, cu_k, 5, causal, 0.4, softcap, window, sinks)
    skip_unless_supported(VARLEN_ATTENTION, args, backend)
    kw = dict(causal=causal, scale=0.4, softcap=softcap, window=None if window < 0 else window, sinks=sinks)
    out, lse = run_forced(backend, vtattn.varlen_attention, q, k, v, cu_q, cu_k, return_lse=True, **kw)
    g = torch.Generator().manual_seed(2)
    dout, dlse = torch.randn(out.shape, generator=g), torch.randn(lse.shape, generator=g)
    dlse[lse.isneginf()] = 0  # rows without keys (no sink): lse -inf has no gradient
    leaves = [t for t in (q, k, v, sinks) if t is not None]
    got = torch.autograd.grad((out, lse), leaves, (dout, dlse))
    bq, bk = cu_q.tolist(), cu_k.tolist()
    parts = []
    for b in range(len(bq) - 1):
        seq = lambda x, c: x[c[b]:c[b + 1]].transpose(0, 1)[None]  # noqa: E731
        o, s = vtattn.attention(seq(q, bq), seq(k, bk), seq(v, bk), return_lse=True, **kw)
        parts.append((o * seq(dout, bq)).sum() + (s[0] * dlse[:, bq[b]:bq[b + 1]]).nan_to_num(0.0).sum())
    want = torch.autograd.grad(sum(parts), leaves)
    for name, a, b in zip("q k v sinks".split(), got, want):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5, msg=lambda m: f"d{name}: {m}")


def test_compiled_backward_equals_eager():
    q, k, v, sinks, (causal, scale, softcap, window) = _inputs(4, torch.float32)
    kw = dict(causal=causal, scale=scale, softcap=softcap, window=window)

    def loss(q, k, v, s):
        out, lse = vtattn.attention(q, k, v, return_lse=True, sinks=s, **kw)
        return out.square().sum() + lse.sum()

    leaves = (q, k, v, sinks)
    want = torch.autograd.grad(loss(*leaves), leaves)
    got = torch.autograd.grad(torch.compile(loss, fullgraph=True, backend="aot_eager")(*leaves), leaves)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)

    q, k, v, cu_q, cu_k, sinks = _varlen_inputs(torch.float32)

    def varlen_loss(q, k, v, s):
        return vtattn.varlen_attention(q, k, v, cu_q, cu_k, max_seqlen_q=5, causal=True, window=2, sinks=s).sum()

    leaves = (q, k, v, sinks)
    want = torch.autograd.grad(varlen_loss(*leaves), leaves)
    got = torch.autograd.grad(torch.compile(varlen_loss, fullgraph=True, backend="aot_eager")(*leaves), leaves)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)


def test_opcheck_with_grad():
    q, k, v, sinks, (causal, scale, softcap, window) = _inputs(4, torch.float32)
    torch.library.opcheck(torch.ops.vtattn.attention.default, (q, k, v, causal, scale, softcap, window, sinks))
    q, k, v, cu_q, cu_k, sinks = _varlen_inputs(torch.float32)
    torch.library.opcheck(torch.ops.vtattn.varlen_attention.default,
                          (q, k, v, cu_q, cu_k, 5, True, 0.4, 2.0, 1, sinks))


@pytest.mark.parametrize("backend", ["cpp", "torch"])
def test_gather_tokens_gradient(backend):
    """The adjoint of the gather (duplicates add, padding and out-of-range indices get nothing), batched and
    packed (rows past a sample's slots are zero), whichever backend ran the forward."""
    x = torch.randn(2, 7, 5, dtype=torch.float64, requires_grad=True)
    idx = torch.tensor([[0, 3, 3, -1], [6, 1, 9, 2]])
    for cu, total in ((None, 0), (torch.tensor([0, 3, 6], dtype=torch.int32), 6),
                      (torch.tensor([0, 4, 5], dtype=torch.int32), 7)):
        with vtattn.use_backend("torch"):
            assert torch.autograd.gradcheck(lambda x: torch.ops.vtattn.gather_tokens(x, idx, cu, total), (x,))
        xf = x.detach().float().requires_grad_()
        out = run_forced(backend, torch.ops.vtattn.gather_tokens, xf, idx, cu, total)
        dout = torch.randn(out.shape)
        want = torch.autograd.grad(vtattn.reference.gather_tokens(xf, idx, cu, total), xf, dout)[0]
        torch.testing.assert_close(torch.autograd.grad(out, xf, dout)[0], want)


NO_GRAD = sorted(op for op in OPS if op not in ("attention", "varlen_attention", "gather_tokens", "select_tokens"))


@pytest.mark.parametrize("op", NO_GRAD)
def test_ops_without_gradient_refuse_inputs_that_require_grad(op):
    args = list(SAMPLES[op]("cpu", torch.float32))
    args[0] = args[0].clone().requires_grad_()
    fn = getattr(torch.ops.vtattn, op)
    with pytest.raises(RuntimeError, match=f"vtattn.{op} has no gradient"):
        fn(*args)
    with torch.no_grad():
        fn(*args)
    fn(args[0].detach(), *args[1:])


def test_key_importance_refuses_grad_naming_the_op():
    q, k, _ = rand_qkv(1, 2, 2, 4, 4, 64, torch.float32)
    with pytest.raises(RuntimeError, match="key_importance has no gradient"):
        vtattn.key_importance(q, k.requires_grad_(), rows=0)
