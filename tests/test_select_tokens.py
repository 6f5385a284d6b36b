import pytest
import torch

import vtattn
from vtattn._registry import SELECT_TOKENS
from helpers import backend_params, poisoned_outputs, run_forced, skip_unless_supported

SCORE_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def naive_select(scores, budgets, segments, sort):
    """Python loops: per (sample, segment) the budget's best (fp32 score desc, index asc) tokens."""
    B, N = scores.shape
    values = scores.float().tolist()
    indices, mask, counts = [], torch.zeros(B, N, dtype=torch.bool), []
    for b in range(B):
        row, start = [], 0
        for s, length in enumerate(segments):
            ranked = sorted(range(start, start + length), key=lambda i: (-values[b][i], i))
            kept = ranked[:budgets[b][s]]
            mask[b, kept] = True
            row += sorted(kept) if sort else kept
            start += length
        indices.append(row)
        counts.append(len(row))
    K = max(counts)
    return torch.tensor([r + [-1] * (K - len(r)) for r in indices]), mask, torch.tensor(counts)


def _scores(B, N, dtype, device, ties, seed):
    g = torch.Generator().manual_seed(seed)
    s = torch.randint(0, 4, (B, N), generator=g).float() if ties else torch.randn(B, N, generator=g)
    if ties:
        s[:, ::7] = -0.0  # -0 ties with +0
    return s.to(device, dtype)


CROPS = [576] * 5 + [576]  # LLaVA-NeXT-like: 5 crops and a base view (full-size here)
# (B, N, segments, keep, ties)
CASES = [
    (2, 1, None, 1.0, False),
    (3, 17, None, 0.3, False),
    (3, 17, None, 5, True),
    (2, 17, [5, 1, 11], 1, True),
    (2, 576, None, 0.1, False),
    (2, 577, None, 0.25, True),
    (1, 577, None, 1.0, True),
    (2, sum(CROPS), CROPS, 0.1, False),
    (3, 40, [10, 30], "per_sample", True),
    (3, 40, None, "per_sample", False),
]


def _keep(keep, B, segments, N, device):
    """The public keep argument ({"keep": ratio} or {"keep_tokens": counts}) and the per-(sample,
    segment) counts it means."""
    segments = segments or [N]
    if keep == "per_sample":
        g = torch.Generator().manual_seed(B * N)
        counts = torch.stack([torch.randint(0, n + 1, (B,), generator=g) for n in segments], 1)
        counts[:, 0] = counts[:, 0].clamp(min=1)  # every sample keeps something
        counts[0] = torch.tensor(segments)  # one sample keeps everything
        public = counts if len(segments) > 1 else counts[:, 0]
        return {"keep_tokens": public.to(device)}, counts.tolist()
    if isinstance(keep, float):
        return {"keep": keep}, [[max(1, round(keep * n)) for n in segments]] * B
    return {"keep_tokens": keep}, [[keep] * len(segments)] * B


@pytest.mark.parametrize("device,backend", backend_params(SELECT_TOKENS))
@pytest.mark.parametrize("dtype", SCORE_DTYPES, ids=str)
@pytest.mark.parametrize("case", range(len(CASES)))
@pytest.mark.parametrize("sort", [True, False])
def test_select_matches_naive(device, backend, dtype, case, sort):
    B, N, segments, keep, ties = CASES[case]
    scores = _scores(B, N, dtype, device, ties, seed=case)
    keep, budgets = _keep(keep, B, segments, N, device)
    budgets_t = torch.tensor(budgets, device=device)
    skip_unless_supported(SELECT_TOKENS, (scores, budgets_t, segments or [N], 1, sort), backend)
    before = scores.clone()
    with poisoned_outputs():
        sel = run_forced(backend, vtattn.select_tokens, scores, **keep, segments=segments, sort=sort)
    indices, mask, counts = naive_select(scores.cpu(), budgets, segments or [N], sort)
    assert torch.equal(sel.indices.cpu(), indices)
    assert torch.equal(sel.mask.cpu(), mask)
    assert torch.equal(sel.counts.cpu(), counts)
    assert sel.cu_seqlens.dtype == torch.int32 and sel.cu_seqlens.tolist() == [0] + counts.cumsum(0).tolist()
    tensor = isinstance(keep.get("keep_tokens"), torch.Tensor)
    assert sel.total == (int(counts.sum()) if len(set(counts.tolist())) == 1 or not tensor else None)
    assert torch.equal(scores, before)


@pytest.mark.parametrize("device,backend", backend_params(SELECT_TOKENS))
def test_deterministic_under_ties(device, backend):
    scores = torch.zeros(4, 577, device=device)
    scores[:, 100:300] = 1.0
    args = (scores, torch.full((4, 1), 250, device=device), [577], 250, True)
    skip_unless_supported(SELECT_TOKENS, args, backend)
    for sort, order in ((True, [*range(50), *range(100, 300)]), (False, [*range(100, 300), *range(50)])):
        first = run_forced(backend, vtattn.select_tokens, scores, keep_tokens=250, sort=sort)
        assert first.indices.tolist() == [order] * 4
        for _ in range(3):
            again = run_forced(backend, vtattn.select_tokens, scores, keep_tokens=250, sort=sort)
            assert all(torch.equal(a, b) for a, b in zip(first, again))


def test_reference_matches_naive():
    scores = _scores(3, 50, torch.float64, "cpu", ties=True, seed=7)
    budgets = [[3, 0, 9], [1, 20, 1], [4, 4, 4]]
    for sort in (True, False):
        got = vtattn.reference.select_tokens(scores, torch.tensor(budgets), [10, 20, 20], 22, sort)
        want = naive_select(scores, budgets, [10, 20, 20], sort)
        assert all(torch.equal(a, b) for a, b in zip(got, want))


def test_opcheck():
    scores = torch.randn(3, 40)
    for args in ((scores, torch.full((3, 1), 7), [40], 7, True),
                 (scores[:, ::2], torch.tensor([[1, 2], [0, 3], [5, 5]]), [8, 12], 10, False),
                 (scores.half(), torch.full((1, 2), 3).expand(3, 2), [20, 20], 6, True)):
        torch.library.opcheck(torch.ops.vtattn.select_tokens.default, args)


def test_meta_tensors_and_compile():
    sel = vtattn.select_tokens(torch.empty(4, 3456, device="meta"), 0.1, segments=CROPS)
    assert sel.indices.shape == (4, 348) and sel.mask.shape == (4, 3456) and sel.counts.shape == (4,)
    assert sel.total == 4 * 348

    def fn(scores):
        sel = vtattn.select_tokens(scores, 0.25, segments=[10, 30])
        return sel.indices, sel.mask, sel.cu_seqlens

    scores = torch.randn(3, 40)
    got = torch.compile(fn, fullgraph=True, backend="aot_eager")(scores)
    assert all(torch.equal(a, b) for a, b in zip(got, fn(scores)))


BAD = [
    (lambda s: (s[0], 0.5), {}, ValueError, "scores must be 2-D"),
    (lambda s: (s.long(), 0.5), {}, TypeError, "scores must have dtype"),
    (lambda s: (s, 0.0), {}, ValueError, r"keep must be a ratio in \(0, 1\]"),
    (lambda s: (s, 1.5), {}, ValueError, r"keep must be a ratio in \(0, 1\]"),
    (lambda s: (s, float("nan")), {}, ValueError, r"keep must be a ratio in \(0, 1\]"),
    (lambda s: (s, 0), {}, ValueError, r"keep must be a ratio in \(0, 1\]"),
    (lambda s: (s, 1), {}, ValueError, "keep=1 is ambiguous"),
    (lambda s: (s, True), {}, TypeError, "keep must be a float ratio"),
    (lambda s: (s, "all"), {}, TypeError, "keep must be a float ratio"),
    (lambda s: (s,), {}, TypeError, "needs keep= .* or keep_tokens="),
    (lambda s: (s, 0.5), {"keep_tokens": 3}, ValueError, "not both"),
    (lambda s: (s,), {"keep_tokens": 0}, ValueError, "keep_tokens must be an int >= 1"),
    (lambda s: (s,), {"keep_tokens": 2.0}, TypeError, "keep_tokens must be an int"),
    (lambda s: (s,), {"keep_tokens": 13}, ValueError, "keep_tokens=13 is more than the 12 tokens"),
    (lambda s: (s,), {"keep_tokens": 5, "segments": [4, 8]}, ValueError,
     "keep_tokens=5 is more than the 4 tokens"),
    (lambda s: (s, 0.5), {"segments": [4, 7]}, ValueError, "segments sum to 11"),
    (lambda s: (s, 0.5), {"segments": [4, 0, 8]}, ValueError, "no empty segment"),
    (lambda s: (s, 0.5), {"segments": 12}, TypeError, "segments must be a list"),
    (lambda s: (s, 0.5), {"segments": [4.0, 8.0]}, TypeError, "segments must be a list"),
    (lambda s: (s,), {"keep_tokens": torch.tensor([1.0, 2.0])}, TypeError, "keep_tokens must be an integer tensor"),
    (lambda s: (s,), {"keep_tokens": torch.tensor([1, 2, 3])}, ValueError, r"keep_tokens must have shape \[B\]"),
    (lambda s: (s,), {"keep_tokens": torch.tensor([1, 2]), "segments": [4, 8]}, ValueError, r"give \[B, S\]"),
    (lambda s: (s,), {"keep_tokens": torch.tensor([1, -2])}, ValueError, "keep_tokens has negative counts"),
    (lambda s: (s,), {"keep_tokens": torch.tensor([1, 13])}, ValueError, "more tokens than a segment has"),
    (lambda s: (s,), {"keep_tokens": torch.tensor([[1, 9], [4, 1]]), "segments": [4, 8]}, ValueError,
     "more tokens than a segment"),
    (lambda s: (s,), {"keep_tokens": torch.tensor([3, 0])}, ValueError, "keeps no token of sample 1"),
    (lambda s: (s,), {"keep_tokens": torch.tensor([1, 2], device="meta")}, ValueError, "keep_tokens is on meta"),
    (lambda s: (s.index_fill(1, torch.tensor([3]), float("nan")), 0.5), {}, ValueError, "scores contains NaN"),
    (lambda s: (s[:, :0], 0.5), {}, ValueError, "no tokens"),
]


@pytest.mark.parametrize("bad", range(len(BAD)))
def test_bad_inputs_raise_naming_the_argument(bad):
    scores = torch.randn(2, 12)
    before = scores.clone()
    make, kwargs, exc, msg = BAD[bad]
    args = make(scores)
    with pytest.raises(exc, match=msg):
        vtattn.select_tokens(*args, **kwargs)
    assert torch.equal(scores, before)
