"""The Triton key_importance launcher under TRITON_INTERPRET=1 against vtattn.reference, on every
path: lse given (column kernel), no lse and many rows (row-LSE kernel, then columns), no lse and
R <= 16 rows (logits + per-chunk partials, then a normalising pass; 32-key chunks here)."""
import pytest
import torch

import vtattn.reference as ref
from helpers import PROB_TOL, poisoned_outputs, rand_qkv
from vtattn.triton_kernels import key_importance as triton_key_importance
from vtattn.triton_kernels.key_importance import FEW_ROWS

# (B, Hq, Hkv, Nq, Nk, D, causal, dtype, layout)
CASES = [
    (1, 2, 2, 1, 1, 64, False, torch.float32, "contiguous"),
    (2, 4, 2, 33, 33, 64, True, torch.float32, "strided"),
    (1, 2, 1, 17, 50, 72, True, torch.float32, "sliced"),  # Nq < Nk
    (1, 4, 1, 50, 17, 80, True, torch.float32, "contiguous"),  # Nq > Nk: the first rows see no key
    (2, 2, 2, 40, 70, 128, False, torch.float32, "contiguous"),
    (1, 2, 1, 65, 100, 64, True, torch.float16, "strided"),
    (2, 2, 1, 20, 45, 80, False, torch.float16, "sliced"),
]


def _rows(kind, B, Nq, g):
    """int64 [B, R] row indices (-1 = padding), possibly a strided view."""
    if kind == "cls":
        return torch.zeros(B, 1, dtype=torch.long)
    if kind == "last":
        return torch.full((B, 1), Nq - 1, dtype=torch.long)
    if kind == "few":  # duplicates and padding, read through a column slice
        wide = torch.randint(0, Nq, (B, 12), generator=g)
        wide[:, 1] = wide[:, 3]
        wide[0, 7:] = -1
        return wide[:, 1::2]
    if kind == "many":
        assert 17 > FEW_ROWS
        rows = torch.randint(-1, Nq, (B, 17), generator=g)
        rows[:, 0] = rows[:, 1]
        return rows
    return None  # "all"


def _check(q, k, lse, rows, causal, *opts):
    scale = q.shape[-1] ** -0.5
    with poisoned_outputs():  # unwritten outputs (and buffers read before written) would be NaN
        got = triton_key_importance.key_importance(q, k, lse, rows, causal, scale, *opts)
    want = ref.key_importance(q, k, lse, rows, causal, scale, *opts)
    assert got.shape == want.shape and got.dtype == torch.float32 and got.is_contiguous()
    assert not got.isnan().any()
    n_rows = q.shape[2] if rows is None else rows.shape[1]
    torch.testing.assert_close(got, want, atol=PROB_TOL[q.dtype] * n_rows ** 0.5, rtol=1e-4)
    return got


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(map(str, c)).replace("torch.", ""))
@pytest.mark.parametrize("kind", ["all", "cls", "last", "few", "many"])
def test_key_importance_matches_reference(case, kind):
    B, Hq, Hkv, Nq, Nk, D, causal, dtype, layout = case
    q, k, _ = rand_qkv(B, Hq, Hkv, Nq, Nk, D, dtype, layout=layout, seed=Nq * 1000 + Nk)
    rows = _rows(kind, B, Nq, torch.Generator().manual_seed(Nq))
    before = [q.clone(), k.clone()]
    _check(q, k, None, rows, causal)
    _check(q, k, ref.attention(q, k, k, causal, D ** -0.5)[1], rows, causal)
    assert torch.equal(q, before[0]) and torch.equal(k, before[1])


# (case of CASES, softcap, window, sinks): each option alone and together, a window of 0 and one
# narrower than a key tile; the first rows of case 3 see no key.
OPTIONS = [(1, 4.0, -1, False), (2, 0.0, 5, False), (3, 0.0, 20, True), (4, 30.0, 0, True), (5, 1.0, 40, True)]


@pytest.mark.parametrize("opt", range(len(OPTIONS)))
@pytest.mark.parametrize("kind", ["all", "cls", "few", "many"])
def test_key_importance_options_match_reference(opt, kind):
    """Every path: the row-LSE, few-rows and column kernels fold softcap, window and sinks in (with a
    given lse the sinks are already in it)."""
    case, softcap, window, use_sinks = OPTIONS[opt]
    B, Hq, Hkv, Nq, Nk, D, causal, dtype, layout = CASES[case]
    q, k, _ = rand_qkv(B, Hq, Hkv, Nq, Nk, D, dtype, layout=layout, seed=opt)
    k = k * 3
    sinks = torch.randn(Hq, generator=torch.Generator().manual_seed(opt)) if use_sinks else None
    rows = _rows(kind, B, Nq, torch.Generator().manual_seed(Nq))
    opts = (softcap, window, sinks)
    _check(q, k, None, rows, causal, *opts)
    _check(q, k, ref.attention(q, k, k, causal, D ** -0.5, *opts)[1], rows, causal, *opts)


def test_key_importance_larger():
    q, k, _ = rand_qkv(1, 2, 1, 300, 300, 64, torch.float16, layout="strided", seed=5)
    for rows in (None, torch.tensor([[0, 299, 150]])):
        _check(q, k, None, rows, True)


def test_key_importance_strided_lse_and_determinism():
    q, k, _ = rand_qkv(2, 4, 2, 40, 50, 64, torch.float32, seed=6)
    lse = ref.attention(q, k, k, False, 0.125)[1]
    lse_view = torch.empty(2, 40, 4).transpose(1, 2).copy_(lse)  # [B, Hq, Nq] with other strides
    rows = torch.tensor([[3, -1, 3], [0, 39, -1]])
    for r in (None, rows):
        first = _check(q, k, lse_view, r, False)
        assert torch.equal(first, triton_key_importance.key_importance(q, k, lse_view, r, False, 0.125))
        assert torch.equal(first, triton_key_importance.key_importance(q, k, lse_view, r, False, 0.125))


def test_key_importance_empty_rows():
    q, k, _ = rand_qkv(2, 2, 1, 9, 13, 64, torch.float32, seed=7)
    for rows in (torch.full((2, 3), -1), torch.full((2, 20), -1), torch.zeros(2, 0, dtype=torch.long)):
        with poisoned_outputs():
            got = triton_key_importance.key_importance(q, k, None, rows, True, 0.125)
        assert torch.equal(got, torch.zeros(2, 2, 13))


@pytest.mark.xfail(strict=True, reason="the Triton interpreter computes bf16 tl.dot wrongly (ENV.md)")
@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # its garbage overflows exp2
def test_key_importance_bf16_under_interpreter():
    q, k, _ = rand_qkv(1, 2, 1, 33, 40, 64, torch.bfloat16, seed=8)
    _check(q, k, None, None, True)
