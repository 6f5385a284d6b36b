"""The Triton decode_attention launcher under TRITON_INTERPRET=1 against vtattn.reference (tiny
caches; the interpreter splits the key range every 16 keys, so these lengths span several splits
and exercise the LSE merge, splits past a head's length, and empty heads)."""
import pytest
import torch

import vtattn.reference as ref
from helpers import OUT_TOL, bad_decode_inputs, poisoned_outputs, run_forced
from vtattn.triton_kernels import decode_attention as triton_decode


def _inputs(B, Hq, Hkv, cap, D, dtype, lengths, seed, strided=False):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, Hq, 1, D, generator=g).to(dtype)
    if strided:  # views of [B, L, H, D] buffers, as a token-major cache stores them
        k, v = (torch.randn(B, cap, Hkv, D, generator=g).to(dtype).transpose(1, 2) for _ in range(2))
    else:
        k, v = (torch.randn(B, Hkv, cap, D, generator=g).to(dtype) for _ in range(2))
    return q, k, v, torch.tensor(lengths, dtype=torch.int32).reshape(B, Hkv)


# (B, Hq, Hkv, L_cap, D, dtype, lengths, strided)
CASES = [
    (1, 1, 1, 1, 64, torch.float32, [1], False),
    (2, 4, 2, 40, 64, torch.float32, [0, 17, 40, 1], True),
    (1, 8, 1, 50, 72, torch.float32, [33], False),  # group 8
    (2, 4, 4, 37, 80, torch.float16, [0, 1, 17, 37, 5, 16, 32, 36], True),
    (1, 8, 2, 70, 128, torch.float16, [70, 3], False),  # group 4
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(map(str, c[:6])).replace("torch.", ""))
def test_decode_attention_matches_reference(case):
    B, Hq, Hkv, cap, D, dtype, lengths, strided = case
    q, k, v, lens = _inputs(B, Hq, Hkv, cap, D, dtype, lengths, seed=cap, strided=strided)
    before = [t.clone() for t in (q, k, v, lens)]
    with poisoned_outputs():  # unwritten output elements would be NaN
        out = triton_decode.decode_attention(q, k, v, lens, D ** -0.5)
    want = ref.decode_attention(q.double(), k.double(), v.double(), lens, D ** -0.5)
    assert out.shape == q.shape and out.dtype == dtype and out.is_contiguous()
    torch.testing.assert_close(out.double(), want, atol=OUT_TOL[dtype], rtol=0)
    empty = (lens == 0).repeat_interleave(Hq // Hkv, dim=1)
    assert torch.equal(out[empty], torch.zeros_like(out[empty]))
    assert all(torch.equal(a, b) for a, b in zip((q, k, v, lens), before))


def test_decode_attention_split_count_ignores_lengths():
    assert triton_decode.num_splits(40, 4, torch.device("cpu")) == 3  # ceil(40 / 16), shapes only
    assert triton_decode.num_splits(1, 4, torch.device("cpu")) == 1


def test_decode_attention_supports():
    q, k, v, lens = _inputs(1, 2, 1, 8, 64, torch.float16, [8], seed=0)
    assert triton_decode.supports(q, k, v, lens, 0.125) is None
    bf = [t.bfloat16() for t in (q, k, v)]
    assert "interpreter" in triton_decode.supports(*bf, lens, 0.125)


@pytest.mark.parametrize("one_split", [False, True])
def test_decode_attention_key_offsets_past_int32(one_split, monkeypatch):
    """Key 64's row starts at element 2^31 of the cache (row stride 2^25): the tile's row offsets must be
    int64 (an int32 start * stride wrapped to -2^31 and read far outside the cache), and so must the step
    from tile to tile (one split: both 64-key tiles in one program). One 4 GiB storage, allocated but
    untouched except for the 65 rows used; k and v are views of it."""
    if one_split:
        monkeypatch.setattr(triton_decode, "num_splits", lambda *args: 1)
    S, L, D = 1 << 25, 65, 16
    try:
        store = torch.empty((L - 1) * S + 2 * D, dtype=torch.float16)
    except RuntimeError as e:  # a host that refuses 4 GiB of address space
        pytest.skip(f"cannot reserve 4 GiB: {e}")
    k = store.as_strided((1, 1, L, D), (L * S, L * S, S, 1))
    v = store.as_strided((1, 1, L, D), (L * S, L * S, S, 1), D)
    g = torch.Generator().manual_seed(0)
    k.copy_(torch.randn(1, 1, L, D, generator=g).half())
    v.copy_(torch.randn(1, 1, L, D, generator=g).half())
    q = torch.randn(1, 1, 1, D, generator=g).half()
    lens = torch.tensor([[L]], dtype=torch.int32)
    out = triton_decode.decode_attention(q, k, v, lens, D ** -0.5)
    want = ref.decode_attention(q.double(), k.double(), v.double(), lens, D ** -0.5)
    torch.testing.assert_close(out.double(), want, atol=OUT_TOL[torch.float16], rtol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_out_of_range_lengths_act_clamped(dtype):
    """Past the public checks (torch.compile, graph capture) the kernels stay inside the cache: lengths act
    clamped to [0, L_cap]. Called as the registered op, which checks nothing; reading past the cache gives NaN."""
    args, clamped = bad_decode_inputs("cpu", dtype)
    with poisoned_outputs():
        out = run_forced("triton", torch.ops.vtattn.decode_attention, *args, 0.125)
    want = ref.decode_attention(*(t.double() if t.is_floating_point() else t for t in clamped), 0.125)
    torch.testing.assert_close(out.double(), want, atol=OUT_TOL[dtype], rtol=0)
