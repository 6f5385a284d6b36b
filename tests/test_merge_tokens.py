import pytest
import torch

import vtattn
from vtattn._registry import MERGE_TOKENS
from helpers import DTYPES, backend_params, poisoned_outputs, run_forced, skip_unless_supported
from test_gather_tokens import make_x

OUT_TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2, torch.float64: 1e-5}


def naive_merge(x, keys, sel, weighted):
    """float64 Python loops: each pruned token's best kept token by cosine (ties to the lower
    index), then the (weighted) means. Also returns the smallest gap between a pruned token's best
    and second-best cosine, so tests can insist the fp32 kernels face no near-tie."""
    x, keys = x.double().cpu(), keys.double().cpu()
    B, K = sel.indices.shape
    unit = keys / keys.norm(dim=-1, keepdim=True).clamp(min=1e-12)
    out = torch.zeros(B, K, x.shape[2], dtype=torch.float64)
    gap = float("inf")
    for b in range(B):
        kept = sel.indices[b, :int(sel.counts[b])].tolist()
        total = {c: x[b, c].clone() for c in kept}
        wsum = dict.fromkeys(kept, 1.0)
        for i in range(x.shape[1]):
            if sel.mask[b, i]:
                continue
            # Rounded so that identical kept keys tie exactly (float64 dots may round them apart).
            cos = {c: round(float(unit[b, i] @ unit[b, c]), 12) for c in kept}
            ranked = sorted(kept, key=lambda c: (-cos[c], c))
            if len(ranked) > 1 and cos[ranked[0]] != cos[ranked[1]]:
                gap = min(gap, cos[ranked[0]] - cos[ranked[1]])
            w = max(cos[ranked[0]], 0.0) if weighted else 1.0
            total[ranked[0]] += w * x[b, i]
            wsum[ranked[0]] += w
        for slot, c in enumerate(kept):
            out[b, slot] = total[c] / wsum[c]
    return out, gap


def make_keys(x_shape, sel, Ck, dtype, device, seed):
    """Keys whose pruned tokens sit near one kept key each (clear winners), plus tokens facing
    exact ties (two kept tokens with one key) and tokens opposite every kept key (negative cosine)."""
    g = torch.Generator().manual_seed(seed)
    B, N, _ = x_shape
    keys = torch.randn(B, N, Ck, generator=g)
    for b in range(B):
        kept = sel.indices[b, :int(sel.counts[b])]
        pruned = (~sel.mask[b].cpu()).nonzero().flatten()
        if len(kept) >= 2:
            keys[b, kept[1]] = keys[b, kept[0]]  # a tie: the lower index must win
        target = kept[torch.randint(0, len(kept), (len(pruned),), generator=g)]
        keys[b, pruned] = keys[b, target] * (0.5 + torch.rand(len(pruned), 1, generator=g)) + \
            0.05 * torch.randn(len(pruned), Ck, generator=g)
        keys[b, pruned[::5]] = -keys[b, kept].sum(0) + 0.05 * torch.randn(len(pruned[::5]), Ck, generator=g)
        keys[b, pruned[1::7]] = 0.0  # zero key: cosine 0 with every kept token, the lowest index wins
    return keys.to(device, dtype)


# (B, N, C, Ck, keep)
CASES = [
    (2, 1, 8, 4, 1.0),
    (3, 17, 33, 16, 0.3),
    (2, 17, 40, 5, "per_sample"),
    (2, 97, 72, 64, 0.2),
    (2, 577, 24, 72, 0.1),
]


@pytest.mark.parametrize("device,backend", backend_params(MERGE_TOKENS))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", range(len(CASES)))
@pytest.mark.parametrize("mode", ["mean", "weighted"])
def test_merge_matches_naive(device, backend, dtype, case, mode):
    B, N, C, Ck, keep = CASES[case]
    x = make_x(B, N, C, dtype, device, ("contiguous", "transposed", "sliced")[case % 3], seed=case)
    g = torch.Generator().manual_seed(case)
    keep = ({"keep_tokens": torch.randint(1, N + 1, (B,), generator=g).to(device)} if keep == "per_sample"
            else {"keep": keep})
    sel = vtattn.select_tokens(torch.randn(B, N, generator=g).to(device), **keep)
    keys = make_keys(x.shape, sel, Ck, dtype if case % 2 else torch.float32, device, seed=case)
    skip_unless_supported(MERGE_TOKENS, (x, keys, sel.indices, sel.mask, mode == "weighted"), backend)
    want, gap = naive_merge(x, keys, sel, mode == "weighted")
    assert gap > 1e-4, "test inputs with a near-tie"
    before = (x.clone(), keys.clone())
    with poisoned_outputs():
        got = run_forced(backend, vtattn.merge_tokens, x, sel, keys=keys, mode=mode)
    assert got.shape == sel.indices.shape + (C,) and got.dtype == dtype
    torch.testing.assert_close(got.double().cpu(), want, atol=OUT_TOL[dtype], rtol=OUT_TOL[dtype])
    assert torch.equal(x, before[0]) and torch.equal(keys, before[1])


def test_reference_matches_naive():
    g = torch.Generator().manual_seed(0)  # seeded: a near-zero weight sum on some draw amplifies rounding
    x = torch.randn(2, 30, 6, dtype=torch.float64, generator=g)
    sel = vtattn.select_tokens(torch.randn(2, 30, generator=g), keep_tokens=torch.tensor([4, 9]), sort=False)
    keys = make_keys(x.shape, sel, 8, torch.float64, "cpu", seed=3)
    for weighted in (False, True):
        got = vtattn.reference.merge_tokens(x, keys, sel.indices, sel.mask, weighted)
        torch.testing.assert_close(got, naive_merge(x, keys, sel, weighted)[0], atol=1e-12, rtol=1e-12)


def test_keep_all_is_gather():
    x, keys = torch.randn(2, 9, 5), torch.randn(2, 9, 3)
    sel = vtattn.select_tokens(torch.randn(2, 9), 1.0)
    for backend in ("cpp", "torch"):
        got = run_forced(backend, vtattn.merge_tokens, x, sel, keys=keys, mode="weighted")
        assert torch.equal(got, vtattn.gather_tokens(x, sel))


def test_opcheck():
    x = make_x(2, 17, 24, torch.float32, "cpu", "transposed")
    sel = vtattn.select_tokens(torch.randn(2, 17), keep_tokens=torch.tensor([3, 6]))
    keys = torch.randn(2, 17, 8)
    for args in ((x, keys, sel.indices, sel.mask, False), (x.half(), keys, sel.indices, sel.mask, True),
                 (x, keys[:, :, ::2], sel.indices, sel.mask, True)):
        torch.library.opcheck(torch.ops.vtattn.merge_tokens.default, args)


def test_meta_tensors_and_compile():
    x = torch.empty(4, 576, 1024, device="meta", dtype=torch.bfloat16)
    sel = vtattn.select_tokens(torch.empty(4, 576, device="meta"), 0.1)
    assert vtattn.merge_tokens(x, sel, keys=x[..., :64]).shape == (4, 58, 1024)

    def fn(scores, x, keys):
        return vtattn.merge_tokens(x, vtattn.select_tokens(scores, 0.25), keys=keys, mode="weighted")

    scores, x, keys = torch.randn(3, 40), torch.randn(3, 40, 16), torch.randn(3, 40, 8)
    got = torch.compile(fn, fullgraph=True, backend="aot_eager")(scores, x, keys)
    torch.testing.assert_close(got, fn(scores, x, keys))


def test_bad_inputs():
    x, keys = torch.randn(2, 12, 8), torch.randn(2, 12, 4)
    sel = vtattn.select_tokens(torch.randn(2, 12), keep_tokens=3)
    before = (x.clone(), keys.clone())
    with pytest.raises(ValueError, match="keys must be 3-D"):
        vtattn.merge_tokens(x, sel, keys=keys[0])
    with pytest.raises(ValueError, match=r"keys must be \[B, N, Ck\]"):
        vtattn.merge_tokens(x, sel, keys=keys[:, :10])
    with pytest.raises(TypeError, match="keys must have dtype"):
        vtattn.merge_tokens(x, sel, keys=keys.long())
    with pytest.raises(ValueError, match="mode must be"):
        vtattn.merge_tokens(x, sel, keys=keys, mode="max")
    with pytest.raises(ValueError, match="keys is on meta"):
        vtattn.merge_tokens(x, sel, keys=keys.to("meta"))
    with pytest.raises(TypeError, match="selection must be"):
        vtattn.merge_tokens(x, None, keys=keys)
    assert torch.equal(x, before[0]) and torch.equal(keys, before[1])
