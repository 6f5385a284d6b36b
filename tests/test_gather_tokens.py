import pytest
import torch

import vtattn
from vtattn._registry import GATHER_TOKENS
from helpers import backend_params, poisoned_outputs, run_forced, skip_unless_supported

X_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
LAYOUTS = ("contiguous", "transposed", "sliced")


def make_x(B, N, C, dtype, device, layout, seed=0):
    g = torch.Generator().manual_seed(seed)
    if layout == "transposed":  # unit stride along N, not C
        return torch.randn(B, C, N, generator=g).to(device, dtype).transpose(1, 2)
    if layout == "sliced":  # rows padded, a 2-element offset: no 16-byte chunks
        return torch.randn(B, N, C + 6, generator=g).to(device, dtype)[..., 2:C + 2]
    return torch.randn(B, N, C, generator=g).to(device, dtype)


def naive_gather(x, sel):
    """Python loops over samples and slots."""
    B, K = sel.indices.shape
    padded = torch.zeros(B, K, x.shape[2], dtype=x.dtype)
    packed = []
    for b in range(B):
        for k in range(int(sel.counts[b])):
            padded[b, k] = x[b, int(sel.indices[b, k])].cpu()
            packed.append(padded[b, k])
    return padded, torch.stack(packed)


# (B, N, C, keep, segments)
CASES = [
    (2, 1, 8, 1.0, None),
    (3, 17, 33, 0.3, None),
    (3, 17, 64, "per_sample", None),
    (2, 577, 72, 0.1, None),
    (2, 1152, 16, 0.25, [576, 576]),
]


def _selection(B, N, keep, segments, device, seed):
    g = torch.Generator().manual_seed(seed)
    scores = torch.randn(B, N, generator=g).to(device)
    if keep == "per_sample":
        return vtattn.select_tokens(scores, keep_tokens=torch.randint(1, N + 1, (B,), generator=g).to(device),
                                    segments=segments)
    return vtattn.select_tokens(scores, keep, segments=segments)


@pytest.mark.parametrize("device,backend", backend_params(GATHER_TOKENS))
@pytest.mark.parametrize("dtype", X_DTYPES, ids=str)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("case", range(len(CASES)))
def test_gather_matches_naive(device, backend, dtype, layout, case):
    B, N, C, keep, segments = CASES[case]
    x = make_x(B, N, C, dtype, device, layout, seed=case)
    sel = _selection(B, N, keep, segments, device, seed=case)
    skip_unless_supported(GATHER_TOKENS, (x, sel.indices, None, 0), backend)
    before = x.clone()
    padded, packed = naive_gather(x, sel)
    with poisoned_outputs():
        got = run_forced(backend, vtattn.gather_tokens, x, sel)
        got_packed, cu = run_forced(backend, vtattn.gather_tokens, x, sel, packed=True)
    assert got.dtype == dtype and got.is_contiguous()
    assert torch.equal(got.cpu(), padded)
    assert torch.equal(got_packed.cpu(), packed) and cu is sel.cu_seqlens
    assert torch.equal(x, before)


def test_padding_and_out_of_range_indices_give_zero_rows():
    x = torch.randn(2, 5, 4)
    indices = torch.tensor([[4, -1, 7], [0, 1, -5]])
    for backend in ("cpp", "torch"):
        with vtattn.use_backend(backend):
            out = torch.ops.vtattn.gather_tokens(x, indices, None, 0)
        assert torch.equal(out[0, 0], x[0, 4]) and torch.equal(out[1, :2], x[1, :2])
        assert not out[0, 1:].any() and not out[1, 2].any()


def test_reference_packed_layout():
    x = torch.randn(3, 6, 2, dtype=torch.float64)
    indices = torch.tensor([[5, 2, -1], [0, 1, 3], [4, -1, -1]])
    cu = torch.tensor([0, 2, 5, 6], dtype=torch.int32)
    got = vtattn.reference.gather_tokens(x, indices, cu, 6)
    want = torch.stack([x[0, 5], x[0, 2], x[1, 0], x[1, 1], x[1, 3], x[2, 4]])
    assert torch.equal(got, want)


def test_opcheck():
    x = make_x(3, 17, 24, torch.float32, "cpu", "transposed")
    sel = vtattn.select_tokens(torch.randn(3, 17), keep_tokens=torch.tensor([2, 5, 1]))
    for args in ((x, sel.indices, None, 0), (x.half(), sel.indices, sel.cu_seqlens, 8),
                 (x[:, :, ::3], sel.indices[:, :2], None, 0)):
        torch.library.opcheck(torch.ops.vtattn.gather_tokens.default, args)


def test_meta_tensors_and_compile():
    x = torch.empty(4, 576, 1024, device="meta", dtype=torch.bfloat16)
    sel = vtattn.select_tokens(torch.empty(4, 576, device="meta"), 0.1)
    assert vtattn.gather_tokens(x, sel).shape == (4, 58, 1024)
    assert vtattn.gather_tokens(x, sel, packed=True)[0].shape == (4 * 58, 1024)

    def fn(scores, x):
        sel = vtattn.select_tokens(scores, 0.25)
        return vtattn.gather_tokens(x, sel), vtattn.gather_tokens(x, sel, packed=True)[0]

    scores, x = torch.randn(3, 40), torch.randn(3, 40, 16)
    got = torch.compile(fn, fullgraph=True, backend="aot_eager")(scores, x)
    assert all(torch.equal(a, b) for a, b in zip(got, fn(scores, x)))


def test_bad_inputs():
    x = torch.randn(2, 12, 8)
    sel = vtattn.select_tokens(torch.randn(2, 12), keep_tokens=3)
    before = x.clone()
    with pytest.raises(ValueError, match="x must be 3-D"):
        vtattn.gather_tokens(x[0], sel)
    with pytest.raises(TypeError, match="x must have dtype"):
        vtattn.gather_tokens(x.int(), sel)
    with pytest.raises(TypeError, match="selection must be a vtattn.Selection"):
        vtattn.gather_tokens(x, sel.indices)
    with pytest.raises(ValueError, match="selection.mask is"):
        vtattn.gather_tokens(x[:, :10], sel)
    with pytest.raises(ValueError, match=r"selection.indices must be int64 \[B=3"):
        vtattn.gather_tokens(torch.randn(3, 12, 8), sel)
    with pytest.raises(ValueError, match="selection is on meta"):
        vtattn.gather_tokens(x, vtattn.Selection(*(t.to("meta") for t in sel)))
    assert torch.equal(x, before)
