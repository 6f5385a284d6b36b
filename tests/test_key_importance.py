import pytest
import torch

import vtattn
from vtattn._registry import KEY_IMPORTANCE
from helpers import (DTYPES, PROB_TOL, backend_params, naive_probs, rand_qkv, run_forced,
                     skip_unless_supported)

# (B, Hq, Hkv, Nq, Nk, D, causal)
CASES = [
    (2, 2, 2, 1, 1, 64, False),
    (2, 4, 2, 17, 17, 72, True),
    (1, 4, 1, 17, 33, 80, True),
    (1, 2, 2, 33, 17, 128, True),
    (2, 2, 1, 577, 577, 64, False),
    (2, 2, 2, 577, 577, 72, True),
    (1, 2, 1, 1000, 1000, 128, False),
]
LAYOUTS = ("contiguous", "strided", "sliced")


def _rows_variants(B, Nq, device):
    """(public `rows` argument, the row set per batch item it means)."""
    last = Nq - 1
    many = torch.randint(0, Nq, (B, 19), device=device)  # > 16 rows: the many-row kernels
    mask = torch.rand(B, Nq, device=device) < 0.3
    mask[:, last] = True
    return {
        "cls": (0, [[0]] * B),
        "last": (-1, [[last]] * B),
        "all": ("all", [list(range(Nq))] * B),
        "few": (torch.tensor([0, last, 0], device=device), [[0, last, 0]] * B),  # duplicates count twice
        "many": (many, many.tolist()),
        "mask": (mask, [m.nonzero().flatten().tolist() for m in mask]),
        "slice": (slice(None, None, 2), [list(range(0, Nq, 2))] * B),
    }


def _expected(probs, row_sets):
    return torch.stack([probs[b][:, rows].sum(1) if rows else probs[b][:, :0].sum(1)
                        for b, rows in enumerate(row_sets)])


@pytest.mark.parametrize("device,backend", backend_params(KEY_IMPORTANCE))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", range(len(CASES)))
def test_key_importance_matches_eager_probabilities(device, backend, dtype, case):
    B, Hq, Hkv, Nq, Nk, D, causal = CASES[case]
    q, k, _ = rand_qkv(B, Hq, Hkv, Nq, Nk, D, dtype, device, LAYOUTS[case % 3])
    scale = D ** -0.5
    skip_unless_supported(KEY_IMPORTANCE, (q, k, None, None, causal, scale, 0.0, -1, None), backend)
    before = [q.clone(), k.clone()]
    probs = naive_probs(q, k, causal, scale)
    lse = vtattn.reference.attention(q, k, k, causal, scale)[1]
    for name, (rows, row_sets) in _rows_variants(B, Nq, device).items():
        want = _expected(probs, [[r for r in rs if r >= 0] for rs in row_sets])
        for given_lse in (None, lse):
            got = run_forced(backend, vtattn.key_importance, q, k, rows=rows, lse=given_lse,
                             causal=causal)
            assert got.shape == (B, Hq, Nk) and got.dtype == torch.float32
            tol = PROB_TOL[dtype] * max(1, len(row_sets[0]) ** 0.5)
            torch.testing.assert_close(got.double(), want, atol=tol, rtol=1e-4,
                                       msg=lambda m: f"rows={name} lse={given_lse is not None}: {m}")
    assert torch.equal(q, before[0]) and torch.equal(k, before[1])


# (B, Hq, Hkv, Nq, Nk, D, causal, softcap, window, sinks)
OPTION_CASES = [
    (2, 4, 2, 17, 17, 64, True, 5.0, None, False),
    (1, 2, 1, 33, 70, 72, False, None, 9, False),
    (1, 4, 2, 40, 25, 80, True, None, 0, True),  # the first 15 rows see no key
    (2, 2, 2, 50, 50, 64, False, 20.0, 30, True),
]


@pytest.mark.parametrize("device,backend", backend_params(KEY_IMPORTANCE))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", range(len(OPTION_CASES)))
def test_key_importance_options_match_eager_probabilities(device, backend, dtype, case):
    """The scores are the probabilities of the model's real attention: softcapped logits, the window,
    the sink in the denominator; with the lse of `attention` with the same options too."""
    B, Hq, Hkv, Nq, Nk, D, causal, softcap, window, use_sinks = OPTION_CASES[case]
    q, k, v = rand_qkv(B, Hq, Hkv, Nq, Nk, D, dtype, device, LAYOUTS[case % 3], seed=case)
    k = k * 3  # sharp rows: a wrong cap, window or sink shows
    scale = D ** -0.5
    sinks = torch.randn(Hq, generator=torch.Generator().manual_seed(case)).to(device) if use_sinks else None
    opts = (softcap or 0.0, -1 if window is None else window, sinks)
    skip_unless_supported(KEY_IMPORTANCE, (q, k, None, None, causal, scale, *opts), backend)
    probs = naive_probs(q, k, causal, scale, *opts)
    lse = vtattn.reference.attention(q, k, v, causal, scale, *opts)[1]
    kw = dict(causal=causal, softcap=softcap, window=window, sinks=sinks)
    for name, (rows, row_sets) in _rows_variants(B, Nq, device).items():
        if name not in ("cls", "last", "all", "few", "many"):
            continue
        want = _expected(probs, row_sets)
        for given_lse in (None, lse):
            got = run_forced(backend, vtattn.key_importance, q, k, rows=rows, lse=given_lse, **kw)
            tol = PROB_TOL[dtype] * max(1, len(row_sets[0]) ** 0.5)
            torch.testing.assert_close(got.double(), want, atol=tol, rtol=1e-4,
                                       msg=lambda m: f"rows={name} lse={given_lse is not None}: {m}")


def test_key_importance_with_sinks_sums_below_one():
    """With a sink each row's probabilities sum to 1 - exp(sink - lse): the mass the sink takes."""
    q, k, v = rand_qkv(1, 2, 2, 9, 12, 64, torch.float32)
    sinks = torch.tensor([1.0, -1.0])
    lse = vtattn.attention(q, k, v, return_lse=True, sinks=sinks)[1]
    got = vtattn.key_importance(q, k, rows="all", sinks=sinks).sum(-1)
    torch.testing.assert_close(got, (1 - torch.exp(sinks[:, None] - lse)).sum(-1))


@pytest.mark.parametrize("D", [64, 72])
@pytest.mark.parametrize("causal", [False, True])
def test_cls_row_and_column_sums_to_1e5(D, causal):
    """The issue's acceptance check: N=577, fp32, against eager probs."""
    q, k, _ = rand_qkv(2, 3, 3, 577, 577, D, torch.float32)
    probs = naive_probs(q, k, causal, D ** -0.5)
    torch.testing.assert_close(vtattn.key_importance(q, k, rows=0, causal=causal).double(),
                               probs[:, :, 0, :], atol=1e-5, rtol=0)
    torch.testing.assert_close(vtattn.key_importance(q, k, rows="all", causal=causal).double(),
                               probs.sum(-2), atol=1e-5 * 577 ** 0.5, rtol=1e-5)


def test_reduce_heads():
    q, k, _ = rand_qkv(2, 4, 2, 9, 13, 64, torch.float32)
    full = vtattn.key_importance(q, k, rows=0)
    for name, fn in (("mean", full.mean), ("sum", full.sum), ("max", lambda d: full.amax(d))):
        torch.testing.assert_close(vtattn.key_importance(q, k, rows=0, reduce_heads=name), fn(1))


@pytest.mark.parametrize("Nk", [40, 33000])  # the C++ kernel's one-pass path, and its two-pass one (long keys)
@pytest.mark.parametrize("causal,window", [(False, -1), (True, -1), (True, 5)])
def test_cpp_rows_without_lse_keep_the_reference_nonfinite_rules(Nk, causal, window):
    """NaN among a row's visible logits makes its visible keys NaN; +-inf logits as softmax takes them;
    rows that see no key add nothing (the kernel is called directly: the public op refuses NaN)."""
    if vtattn._ext.load() is not None:
        pytest.skip("vtattn._C is not built")
    g = torch.Generator().manual_seed(Nk)
    q, k = torch.randn(1, 2, 40, 16, generator=g), torch.randn(1, 1, Nk, 16, generator=g)
    q[0, 0, 7, 3] = float("nan")
    q[0, 1, 9] = float("inf")
    k[0, 0, Nk - 30] = -float("inf")
    for rows in (None, torch.randint(-1, 40, (1, 25), generator=g)):
        args = (q, k, None, rows, causal, 0.25, 0.0, window, None)
        got, want = torch.ops.vtattn_C.key_importance(*args), vtattn.reference.key_importance(*args)
        assert got.isnan().any()  # (the case reaches the rule)
        torch.testing.assert_close(got, want, equal_nan=True, atol=1e-5, rtol=1e-4)


def test_reference_matches_float64():
    q, k, _ = rand_qkv(2, 4, 2, 21, 30, 80, torch.float64, layout="strided")
    rows = torch.tensor([[3, -1, 3], [0, 20, -1]])
    sinks = torch.randn(4, dtype=torch.float64)
    for causal in (False, True):
        for opts in ((0.0, -1, None), (1.5, 6, sinks), (0.0, 0, sinks)):
            probs = naive_probs(q, k, causal, 0.2, *opts)
            got = vtattn.reference.key_importance(q, k, None, rows, causal, 0.2, *opts)
            torch.testing.assert_close(got.double(), _expected(probs, [[3, 3], [0, 20]]), atol=1e-6, rtol=0)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_opcheck(device):
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    q, k, _ = rand_qkv(2, 4, 2, 17, 23, 64, dtype, device, layout="strided")
    lse = vtattn.attention(q, k, k, return_lse=True)[1]
    rows = torch.tensor([[0, 5, -1], [16, 2, 2]], device=device)
    off = (0.0, -1, None)
    on = (3.0, 4, torch.randn(4, device=device))
    for args in ((q, k, None, None, False, 0.125, *off), (q, k, lse, rows, False, 0.125, *off),
                 (q, k, None, rows[:, :1].contiguous(), True, 0.125, *off), (q, k, None, rows, True, 0.125, *on),
                 (q, k, None, None, False, 0.125, *on)):
        torch.library.opcheck(torch.ops.vtattn.key_importance.default, args)


def test_meta_tensors_and_compile():
    q, k, _ = rand_qkv(2, 4, 2, 17, 23, 72, torch.bfloat16, device="meta")
    assert vtattn.key_importance(q, k, rows="all").shape == (2, 4, 23)
    assert vtattn.key_importance(q, k, rows=0, reduce_heads="mean").shape == (2, 23)

    q, k, _ = rand_qkv(2, 4, 2, 17, 23, 64, torch.float32)
    fn = torch.compile(lambda q, k: vtattn.key_importance(q, k, rows=0, reduce_heads="mean"),
                       fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(fn(q, k), vtattn.key_importance(q, k, rows=0, reduce_heads="mean"))
    sinks = torch.randn(4)
    fn = torch.compile(lambda q, k, s: vtattn.key_importance(q, k, rows="all", causal=True, softcap=2.0, window=3,
                                                             sinks=s), fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(fn(q, k, sinks), vtattn.key_importance(q, k, rows="all", causal=True, softcap=2.0,
                                                                      window=3, sinks=sinks))


BAD = [
    (dict(rows=9), IndexError, "out of range"),
    (dict(rows=-10), IndexError, "out of range"),
    (dict(rows=torch.tensor([0, 9])), IndexError, "out of range"),
    (dict(rows=torch.tensor([], dtype=torch.long)), ValueError, "selects no query row"),
    (dict(rows=slice(5, 2)), ValueError, "selects no query row"),
    (dict(rows=torch.zeros(2, 9, dtype=torch.bool)), ValueError, "selects no query row"),
    (dict(rows=torch.ones(2, 5, dtype=torch.bool)), ValueError, "Nq=9 columns"),
    (dict(rows=torch.zeros(3, 2, dtype=torch.long)), ValueError, r"\[B=2, R\]"),
    (dict(rows=torch.tensor([0.5])), TypeError, "integer or bool"),
    (dict(rows="first"), ValueError, "'all'"),
    (dict(rows=True), TypeError, "got a bool"),
    (dict(rows=0, reduce_heads="median"), ValueError, "reduce_heads"),
    (dict(rows=0, lse=torch.zeros(2, 4, 9, dtype=torch.float64)), TypeError, "lse must have dtype"),
    (dict(rows=0, lse=torch.zeros(2, 4, 8)), ValueError, "lse must have shape"),
    (dict(rows=torch.tensor([0]).to("meta")), ValueError, "rows is on meta"),
    (dict(rows=0, softcap=-1.0), ValueError, "softcap must be"),
    (dict(rows=0, window=1.5), ValueError, "window must be an int"),
    (dict(rows=0, sinks=torch.zeros(2)), ValueError, "sinks must have one logit per query head"),
]


@pytest.mark.parametrize("bad", range(len(BAD)))
def test_bad_inputs_raise_naming_the_argument(bad):
    q, k, _ = rand_qkv(2, 4, 2, 9, 12, 64, torch.float32)
    kwargs, exc, msg = BAD[bad]
    with pytest.raises(exc, match=msg):
        vtattn.key_importance(q, k, **kwargs)


def test_bad_qk():
    q, k, _ = rand_qkv(2, 4, 2, 9, 12, 64, torch.float32)
    with pytest.raises(ValueError, match="multiple of k's"):
        vtattn.key_importance(q[:, :3], k, rows=0)
    with pytest.raises(TypeError, match="k has dtype"):
        vtattn.key_importance(q, k.half(), rows=0)
