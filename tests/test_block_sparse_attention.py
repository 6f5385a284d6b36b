import pytest
import torch

import vtattn
from vtattn import sparse
from vtattn._registry import BLOCK_SPARSE_ATTENTION
from helpers import DTYPES, OUT_TOL, backend_params, poisoned_outputs, rand_qkv, run_forced, skip_unless_supported

# (B, Hq, Hkv, Nq, Nk, D, block_size, mask batch, mask heads, causal): partial last blocks, GQA, Nq != Nk
# both ways, lists shared over batch / heads, a single key.
CASES = [
    (1, 2, 2, 1, 1, 64, 16, 1, 1, False),
    (2, 4, 2, 37, 53, 72, 16, 2, 4, True),
    (1, 3, 1, 50, 20, 80, 32, 1, 3, True),  # Nq > Nk: early rows see no key
    (2, 2, 2, 64, 100, 64, 32, 1, 1, False),
    (1, 4, 4, 33, 33, 128, 16, 1, 4, False),
    (2, 2, 1, 17, 130, 64, 48, 2, 1, True),
    (1, 4, 2, 300, 300, 64, 128, 1, 4, True),  # blocks of the CUDA kernel's query tile
    (2, 2, 1, 600, 650, 128, 256, 2, 1, False),
    (1, 2, 2, 100, 90, 64, 8, 1, 2, True),  # blocks smaller than a C++ key tile
]
LAYOUTS = ("contiguous", "strided", "sliced")


def random_lists(Bm, Hm, Nq, Nk, bs, g):
    """Random block lists with empty query blocks, listed blocks in shuffled order and junk (-5 and
    out-of-range values) past each count, which the op must ignore."""
    qb, kb = -(-Nq // bs), -(-Nk // bs)
    blocks = torch.rand(Bm, Hm, qb, kb, generator=g) < 0.5
    blocks[..., 0, :] = False  # query block 0 lists nothing
    num, idx = sparse.from_dense_blocks(blocks)  # listed blocks first, ascending
    listed = torch.arange(kb) < num[..., None].long()
    shuffle = torch.argsort(torch.rand(idx.shape, generator=g) + (~listed) * 2.0, -1)  # within the listed prefix
    idx = torch.gather(idx, -1, shuffle)
    junk = torch.randint(-5, kb + 5, idx.shape, generator=g, dtype=torch.int32)
    return num, torch.where(listed, idx, junk)


def make(case, dtype, device="cpu", layout="contiguous", seed=0):
    B, Hq, Hkv, Nq, Nk, D, bs, Bm, Hm, causal = CASES[case]
    q, k, v = rand_qkv(B, Hq, Hkv, Nq, Nk, D, dtype, device, layout, seed=seed)
    num, idx = random_lists(Bm, Hm, Nq, Nk, bs, torch.Generator().manual_seed(seed))
    return q, k, v, num.to(device), idx.to(device), bs, causal


def naive(q, k, v, num, idx, bs, causal, scale):
    """float64 (out, lse), row block by row block from the lists."""
    B, Hq, Nq, _ = q.shape
    Nk = k.shape[2]
    num, idx = num.expand(B, Hq, -1).cpu(), idx.expand(B, Hq, -1, -1).cpu()
    kx, vx = (x.cpu().double().repeat_interleave(Hq // k.shape[1], 1) for x in (k, v))
    s = q.cpu().double() @ kx.transpose(-1, -2) * scale
    visible = torch.zeros(B, Hq, Nq, Nk, dtype=torch.bool)
    for b in range(B):
        for h in range(Hq):
            for m in range(num.shape[-1]):
                for j in idx[b, h, m, :num[b, h, m]].tolist():
                    visible[b, h, m * bs:(m + 1) * bs, j * bs:(j + 1) * bs] = True
    if causal:
        visible &= torch.arange(Nk) <= torch.arange(Nq)[:, None] + Nk - Nq
    s = s.masked_fill(~visible, float("-inf"))
    return torch.softmax(s, -1).nan_to_num(0.0) @ vx, torch.logsumexp(s, -1)


@pytest.mark.parametrize("device,backend", backend_params(BLOCK_SPARSE_ATTENTION))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", range(len(CASES)))
def test_matches_float64(device, backend, dtype, case):
    q, k, v, num, idx, bs, causal = make(case, dtype, device, LAYOUTS[case % 3], seed=case)
    scale = q.shape[-1] ** -0.5
    skip_unless_supported(BLOCK_SPARSE_ATTENTION, (q, k, v, num, idx, bs, causal, scale), backend)
    before = [t.clone() for t in (q, k, v, num, idx)]
    with poisoned_outputs():
        out, lse = run_forced(backend, vtattn.block_sparse_attention, q, k, v, num, idx, block_size=bs,
                              causal=causal, return_lse=True)
    assert out.shape == q.shape and out.dtype == dtype and out.transpose(1, 2).is_contiguous()
    assert lse.shape == q.shape[:3] and lse.dtype == torch.float32
    want, want_lse = naive(q, k, v, num, idx, bs, causal, scale)
    torch.testing.assert_close(out.cpu().double(), want, atol=OUT_TOL[dtype], rtol=OUT_TOL[dtype])
    torch.testing.assert_close(lse.cpu().double(), want_lse, atol=1e-4, rtol=1e-5)
    assert torch.all(out[:, :, :bs] == 0) and torch.all(lse[:, :, :bs] == float("-inf"))  # block 0 lists nothing
    for t, b in zip((q, k, v, num, idx), before):
        assert torch.equal(t, b), "inputs must not be modified"


def test_reference_matches_float64():
    for case in (1, 5):
        q, k, v, num, idx, bs, causal = make(case, torch.float64, layout="strided", seed=7)
        out, lse = vtattn.reference.block_sparse_attention(q, k, v, num, idx, bs, causal, 0.3)
        want, want_lse = naive(q, k, v, num, idx, bs, causal, 0.3)
        torch.testing.assert_close(out, want)
        torch.testing.assert_close(lse.double(), want_lse, atol=1e-5, rtol=1e-6)


def test_all_blocks_equal_dense_attention():
    q, k, v = rand_qkv(2, 4, 2, 45, 61, 64, torch.float32, seed=3)
    num, idx = sparse.from_dense_blocks(torch.ones(1, 1, 3, 4, dtype=torch.bool))
    for causal in (False, True):
        out, lse = vtattn.block_sparse_attention(q, k, v, num, idx, block_size=16, causal=causal, return_lse=True)
        want, want_lse = vtattn.attention(q, k, v, causal=causal, return_lse=True)
        torch.testing.assert_close(out, want)
        torch.testing.assert_close(lse, want_lse)


def test_no_keys():
    q = torch.randn(1, 2, 5, 64)
    k = torch.randn(1, 2, 0, 64)
    num, idx = torch.zeros(1, 1, 1, dtype=torch.int32), torch.zeros(1, 1, 1, 0, dtype=torch.int32)
    out, lse = vtattn.block_sparse_attention(q, k, k, num, idx, block_size=16, return_lse=True)
    assert torch.all(out == 0) and torch.all(lse == float("-inf"))


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_opcheck(device):
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    for case in (1, 2):
        q, k, v, num, idx, bs, _ = make(case, dtype, device, "strided")
        for causal in (False, True):
            torch.library.opcheck(torch.ops.vtattn.block_sparse_attention.default,
                                  (q, k, v, num, idx, bs, causal, 0.125))


def test_meta_tensors_and_compile():
    q = torch.empty(2, 4, 50, 72, device="meta", dtype=torch.float16)
    k = torch.empty(2, 2, 30, 72, device="meta", dtype=torch.float16)
    num = torch.empty(1, 1, 4, dtype=torch.int32, device="meta")
    idx = torch.empty(1, 1, 4, 2, dtype=torch.int32, device="meta")
    out, lse = torch.ops.vtattn.block_sparse_attention(q, k, k, num, idx, 16, False, 0.1)
    assert out.shape == q.shape and out.transpose(1, 2).is_contiguous() and lse.shape == (2, 4, 50)

    q, k, v, num, idx, bs, causal = make(1, torch.float32)
    fn = torch.compile(lambda *a: vtattn.block_sparse_attention(*a, block_size=bs, causal=causal), fullgraph=True,
                       backend="aot_eager")
    torch.testing.assert_close(fn(q, k, v, num, idx),
                               vtattn.block_sparse_attention(q, k, v, num, idx, block_size=bs, causal=causal))


def _set(t, index, value):
    t = t.clone()
    t[index] = value
    return t


BAD = [  # on case 1: Nq 37, Nk 53, block_size 16 -> 3 query blocks, 4 key blocks; lists [2, 4, ...]
    (lambda q, k, v, n, i: (q[0], k, v, n, i), {}, ValueError, "q must be 4-D"),
    (lambda q, k, v, n, i: (q, k.half(), v, n, i), {}, TypeError, "k has dtype"),
    (lambda q, k, v, n, i: (q, k, v, n.long(), i), {}, TypeError, "kv_num_blocks must have dtype"),
    (lambda q, k, v, n, i: (q, k, v, n, i.float()), {}, TypeError, "kv_indices must have dtype"),
    (lambda q, k, v, n, i: (q, k, v, n[:, :3], i), {}, ValueError, "kv_num_blocks must be \\[B=2 or 1, Hq=4"),
    (lambda q, k, v, n, i: (q, k, v, n, i), {"block_size": 32}, ValueError, "needs 2"),
    (lambda q, k, v, n, i: (q, k, v, n, i[..., :3]), {}, ValueError, "K_blocks=4"),
    (lambda q, k, v, n, i: (q, k, v, _set(n, (0, 0, 1), 5), i), {}, ValueError, "kv_num_blocks must lie in"),
    (lambda q, k, v, n, i: (q, k, v, n.fill_(1), _set(i, (0, 0, 1, 0), 4)), {}, ValueError,
     "kv_indices must lie in \\[0, K_blocks=4\\)"),
    (lambda q, k, v, n, i: (q, k, v, n.fill_(2), i.fill_(1)), {}, ValueError, "lists a key block twice"),
    (lambda q, k, v, n, i: (q, k, v, n, i), {"block_size": 0}, ValueError, "block_size must be a positive int"),
    (lambda q, k, v, n, i: (q, k, v, n.to("meta"), i), {}, ValueError, "kv_num_blocks is on meta"),
]


@pytest.mark.parametrize("bad", range(len(BAD)))
def test_bad_inputs_raise_naming_the_argument(bad):
    q, k, v, num, idx, _, _ = make(1, torch.float32)
    make_args, kwargs, exc, msg = BAD[bad]
    with pytest.raises(exc, match=msg):
        vtattn.block_sparse_attention(*make_args(q, k, v, num, idx), **{"block_size": 16, **kwargs})


# ---- vtattn.sparse ------------------------------------------------------------------------------

def test_flex_block_mask_round_trip():
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    Nq, Nk, bs = 100, 140, 16

    def mask_mod(b, h, q_idx, kv_idx):  # causal, end-aligned, plus a local window: partial and full blocks
        return (kv_idx <= q_idx + Nk - Nq) & (kv_idx > q_idx + Nk - Nq - 40)

    bm = create_block_mask(mask_mod, 2, 1, Nq, Nk, device="cpu", BLOCK_SIZE=bs)
    num, idx, block_size = sparse.from_flex_block_mask(bm)
    assert block_size == bs and num.dtype == idx.dtype == torch.int32 and idx.shape == (2, 1, 7, 9)
    dense = bm.to_dense()[..., :7, :9].bool()  # partial and full blocks of the BlockMask
    assert torch.equal(sparse.to_dense_blocks(num, idx), dense)
    back = sparse.to_flex_block_mask(num, idx, bs, Nq, Nk, causal=True)
    assert torch.equal(back.to_dense().bool()[..., :7, :9], dense) and back.seq_lengths == (Nq, Nk)
    # The converted lists lose the window edge inside partial blocks (only causal is kept), so flex with
    # the converted-back mask, not the original one, must equal block_sparse_attention(causal=True).
    q, k, v = rand_qkv(2, 2, 2, Nq, Nk, 64, torch.float32, seed=1)
    want = vtattn.block_sparse_attention(q, k, v, num, idx, block_size=bs, causal=True)
    got = flex_attention(q, k, v, block_mask=back)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_dense_blocks_round_trip():
    blocks = torch.rand(2, 3, 5, 7, generator=torch.Generator().manual_seed(0)) < 0.4
    num, idx = sparse.from_dense_blocks(blocks)
    assert torch.equal(sparse.to_dense_blocks(num, idx), blocks)
    listed = torch.arange(7) < num[..., None]
    assert torch.all(idx.diff(dim=-1)[listed[..., 1:]] > 0)  # listed blocks ascending


def test_dense_text_image_blocks():
    # 16-token blocks: block 0 text, blocks 1-4 image, block 5 mixed (image then text), block 6 text.
    image = torch.zeros(100, dtype=torch.bool)
    image[16:90] = True
    chosen = torch.zeros(7, dtype=torch.bool)
    chosen[2] = True
    num, idx = sparse.dense_text_image_blocks(image, chosen, block_size=16)
    blocks = sparse.to_dense_blocks(num, idx)[0, 0]
    text_rows = torch.tensor([0, 5, 6])
    assert blocks[text_rows].all()
    for m in (1, 3, 4):
        assert blocks[m].nonzero().flatten().tolist() == sorted({0, 2, 5, 6, m})


def test_topk_blocks_picks_highest_blocks():
    scores = torch.zeros(1, 2, 3, 50)
    scores[0, 0, :, 20] = 5.0  # key block 1 (block_size 16)
    scores[0, 0, :, 49] = 3.0  # key block 3 (partial)
    scores[0, 1, 1, 0] = 1.0
    num, idx = sparse.topk_blocks(scores, 2, block_size=16)
    assert torch.all(num == 2)
    assert idx[0, 0, :, :2].tolist() == [[1, 3]] * 3
    assert idx[0, 1, 1, :2].tolist() == [0, 1]  # block 0 then the lowest tied block
    assert torch.all(sparse.topk_blocks(scores, 10, block_size=16)[0] == 4)  # capped at K_blocks


def test_topk_from_pooled_scores_runs_the_op():
    q, k, v = rand_qkv(1, 4, 2, 40, 70, 64, torch.float32, seed=2)
    num, idx = sparse.topk_blocks(sparse.pooled_scores(q, k, 16), 2, block_size=16)
    assert num.shape == (1, 4, 3) and idx.shape == (1, 4, 3, 5)
    want = vtattn.reference.block_sparse_attention(q, k, v, num, idx, 16, False, 0.125)[0]
    torch.testing.assert_close(vtattn.block_sparse_attention(q, k, v, num, idx, block_size=16), want)


def test_sliding_window_blocks():
    Nq, Nk, window, sinks, bs = 40, 100, 20, 5, 16
    blocks = sparse.to_dense_blocks(*sparse.sliding_window_blocks(Nq, Nk, window, sinks, bs))[0, 0]
    i = torch.arange(Nq)[:, None] + Nk - Nq
    j = torch.arange(Nk)
    want = ((j <= i) & (j > i - window)) | (j < sinks)  # elementwise pattern the blocks must cover
    covered = blocks.repeat_interleave(bs, 0).repeat_interleave(bs, 1)[:Nq, :Nk]
    assert torch.all(covered[want])
    # and no block without a wanted key
    pad = torch.zeros(3 * bs, 7 * bs, dtype=torch.bool)
    pad[:Nq, :Nk] = want
    assert torch.equal(blocks, pad.view(3, bs, 7, bs).any(3).any(1))


# ---- kernels' own paths ---------------------------------------------------------------------------

def test_triton_split_lists_full_then_partial():
    """The Triton launcher's split (plain tensor ops): full blocks (every row sees every key), then partial
    ones (causal diagonal, ragged last block), bad and invisible entries dropped."""
    pytest.importorskip("triton")
    from vtattn.triton_kernels.block_sparse_attention import split_lists
    Nq, Nk, bs = 70, 100, 16  # off 30; 5 query blocks, 7 key blocks (the last ragged)
    num = torch.tensor([[[3, 7, 2, 0, 4]]], dtype=torch.int32)
    idx = torch.tensor([[[[6, 0, 2, -1, 9, 9, 9], [6, 5, 4, 3, 2, 1, 0], [1, 3, 0, 0, 0, 0, 0],
                          [0, 1, 2, 3, 4, 5, 6], [9, 6, 3, 0, 0, 0, 0]]]], dtype=torch.int32)
    for causal in (False, True):
        n_full, n_part, lists = split_lists(num, idx, bs, causal, Nq, Nk)
        for m in range(5):
            rows = range(m * bs, min((m + 1) * bs, Nq))
            listed = {j for j in idx[0, 0, m, :num[0, 0, m]].tolist() if 0 <= j < 7}
            def seen(j):
                keys = range(j * bs, min((j + 1) * bs, Nk))
                return [sum(1 for i in rows if key <= i + Nk - Nq or not causal) for key in keys]
            want_full = {j for j in listed if j * bs + bs <= Nk and min(seen(j)) == len(rows)}
            want_part = {j for j in listed - want_full if max(seen(j)) > 0}
            f, p = int(n_full[0, 0, m]), int(n_part[0, 0, m])
            assert set(lists[0, 0, m, :f].tolist()) == want_full and f == len(want_full), (causal, m)
            assert set(lists[0, 0, m, f:f + p].tolist()) == want_part and p == len(want_part), (causal, m)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("causal", [False, True])
def test_cuda_kernel_long_gqa(dtype, causal):
    """The CUDA kernel at a prefill size (GQA 7:1, D 128, ragged last blocks, lists per head, empty and
    wholly-above-diagonal listed blocks) against the reference."""
    q, k, v = rand_qkv(1, 7, 1, 1000, 1100, 128, dtype, "cuda", "strided", seed=4)
    num, idx = random_lists(1, 7, 1000, 1100, 256, torch.Generator().manual_seed(4))
    args = (q, k, v, num.cuda(), idx.cuda(), 256, causal, 128 ** -0.5)
    skip_unless_supported(BLOCK_SPARSE_ATTENTION, args, "cuda")
    with vtattn.use_backend("cuda"):
        out, lse = torch.ops.vtattn.block_sparse_attention(*args)
    want, want_lse = vtattn.reference.block_sparse_attention(*[a.cpu() if torch.is_tensor(a) else a for a in args])
    torch.testing.assert_close(out.cpu().float(), want.float(), atol=OUT_TOL[dtype], rtol=OUT_TOL[dtype])
    torch.testing.assert_close(lse.cpu(), want_lse, atol=2e-3, rtol=1e-4)


@pytest.mark.gpu
def test_cuda_kernel_stays_inside_bad_lists():
    """Unvalidated lists (counts past K_blocks or negative, blocks outside the keys): the CUDA kernel clamps
    and hides them, never reads out of bounds (NaN keys beyond Nk would show)."""
    Nq, Nk, bs = 256, 300, 128
    q = torch.randn(1, 2, Nq, 64, device="cuda", dtype=torch.float16)
    k, v = (torch.full((1, 2, Nk + 64, 64), float("nan"), device="cuda", dtype=torch.float16).narrow(2, 0, Nk)
            .normal_() for _ in range(2))
    num = torch.tensor([[[7, -2], [1, 3]]], dtype=torch.int32, device="cuda")
    idx = torch.tensor([[[[2, 0, 5], [1, 1, 1]], [[-4, 0, 0], [0, 2, 9]]]], dtype=torch.int32, device="cuda")
    with vtattn.use_backend("cuda"):
        out, lse = torch.ops.vtattn.block_sparse_attention(q, k, v, num, idx, bs, False, 0.125)
    assert torch.isfinite(out).all()
    clean_num = torch.tensor([[[2, 0], [0, 2]]], dtype=torch.int32)
    clean_idx = torch.tensor([[[[2, 0, 0], [0, 0, 0]], [[0, 0, 0], [0, 2, 0]]]], dtype=torch.int32)
    want, _ = vtattn.reference.block_sparse_attention(q.cpu(), k.cpu(), v.cpu(), clean_num, clean_idx, bs, False,
                                                      0.125)
    torch.testing.assert_close(out.cpu().float(), want.float(), atol=4e-3, rtol=4e-3)


@pytest.mark.parametrize("case", [1, 2, 5, 8])
@pytest.mark.parametrize("rows", ["all", -1, "mask"])
def test_sparse_key_importance_is_the_sparse_attention_probabilities(case, rows):
    """vtattn.sparse.key_importance sums the probabilities block_sparse_attention used (float64 naive
    softmax over the listed, causal keys), with the kernel's LSE or its own."""
    q, k, v, num, idx, bs, causal = make(case, torch.float32, layout="strided", seed=case)
    B, Hq, Nq, _ = q.shape
    if rows == "mask":
        rows = torch.rand(B, Nq, generator=torch.Generator().manual_seed(case)) < 0.3
    scale = 0.2
    _, lse = vtattn.block_sparse_attention(q, k, v, num, idx, block_size=bs, causal=causal, scale=scale,
                                           return_lse=True)
    # float64 naive: P of the sparse attention (out of naive() is P @ V; recover P with V = identity-like)
    Nk = k.shape[2]
    eye = torch.eye(Nk, dtype=torch.float64).expand(B, k.shape[1], Nk, Nk)
    P, _ = naive(q, k, eye, num, idx, bs, causal, scale)  # [B, Hq, Nq, Nk]
    sel = torch.zeros(B, Nq, dtype=torch.bool)
    if isinstance(rows, torch.Tensor):
        sel = rows
    elif rows == "all":
        sel[:] = True
    else:
        sel[:, rows] = True
    want = (P * sel[:, None, :, None]).sum(2)
    for given in (None, lse):
        got = sparse.key_importance(q, k, num, idx, block_size=bs, rows=rows, lse=given, causal=causal, scale=scale)
        assert got.shape == (B, Hq, Nk) and got.dtype == torch.float32
        torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-5)
    mean = sparse.key_importance(q, k, num, idx, block_size=bs, rows=rows, causal=causal, scale=scale,
                                 reduce_heads="mean")
    torch.testing.assert_close(mean.double(), want.mean(1), atol=1e-5, rtol=1e-5)


def test_sparse_key_importance_all_blocks_is_key_importance():
    q, k, _ = rand_qkv(2, 4, 2, 45, 61, 64, torch.float32, seed=3)
    num, idx = sparse.from_dense_blocks(torch.ones(1, 1, 3, 4, dtype=torch.bool))
    for causal in (False, True):
        got = sparse.key_importance(q, k, num, idx, block_size=16, rows="all", causal=causal)
        torch.testing.assert_close(got, vtattn.key_importance(q, k, rows="all", causal=causal), atol=1e-5, rtol=1e-5)
