"""Element offsets past 2^31 in every Triton kernel (TRITON_INTERPRET=1): inputs are views into one
storage of over 2^31 fp16 elements (4 GiB of address space, allocated but written only at the views'
elements, a few pages), so a row, a batch or a stride lies past 2^31. An int32 row * stride (or
stride * ALIGN) wraps there and the kernel reads far outside its inputs (a wrong result or a crash)."""
import pytest
import torch

import vtattn.reference as ref
from helpers import OUT_TOL, PROB_TOL
from vtattn.triton_kernels import attention as triton_attention
from vtattn.triton_kernels import block_sparse_attention as triton_block_sparse
from vtattn.triton_kernels import gather_tokens as triton_gather
from vtattn.triton_kernels import index_attention as triton_index
from vtattn.triton_kernels import key_importance as triton_key_importance
from vtattn.triton_kernels import merge_tokens as triton_merge
from vtattn.triton_kernels import select_tokens as triton_select
from vtattn.triton_kernels import varlen_attention as triton_varlen

D = 16
SCALE = D ** -0.5
TOL = OUT_TOL[torch.float16]
ROW = (1 << 25) + 1  # odd: the kernels' ALIGN is 1, so their row * stride is the whole offset
# [B, H, N, D] (shape, strides): row 64 starts past element 2^31; batch 1 starts at it (a stride that
# fits int32 only divided by the kernels' ALIGN, 8 for fp16).
LAYOUTS = {"row": ((1, 1, 65, D), (65 * ROW, 65 * ROW, ROW, 1)),
           "batch": ((2, 1, 33, D), (1 << 31, 1 << 31, 4 * D, 1))}


def far(shape, strides, copies=1, seed=0):
    """`copies` random fp16 tensors of one shape and strides, side by side along the last dim in one
    storage that is never written outside their elements. Skips a host refusing the address space."""
    width = shape[-1]
    span = sum((n - 1) * s for n, s in zip(shape, strides)) + copies * width
    try:
        store = torch.empty(span, dtype=torch.float16)
    except RuntimeError as e:
        pytest.skip(f"cannot reserve {span >> 29} GiB: {e}")
    g = torch.Generator().manual_seed(seed)
    views = [store.as_strided(shape, strides, i * width) for i in range(copies)]
    for t in views:
        t.copy_(torch.randn(shape, generator=g))
    return views


def doubles(*ts):
    return [t.double() for t in ts]


@pytest.mark.parametrize("layout", LAYOUTS)
def test_attention(layout):
    q, k, v = far(*LAYOUTS[layout], copies=3)
    out, lse = triton_attention.attention(q, k, v, True, SCALE)
    want, want_lse = ref.attention(*doubles(q, k, v), True, SCALE)
    torch.testing.assert_close(out.double(), want, atol=TOL, rtol=0)
    torch.testing.assert_close(lse.double(), want_lse.double(), atol=1e-3, rtol=0)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_block_sparse_attention(layout):
    q, k, v = far(*LAYOUTS[layout], copies=3)
    blocks = -(-q.shape[2] // 16)  # every key block listed: dense attention
    num = torch.full((1, 1, blocks), blocks, dtype=torch.int32)
    idx = torch.arange(blocks, dtype=torch.int32).expand(1, 1, blocks, blocks)
    out, _ = triton_block_sparse.block_sparse_attention(q, k, v, num, idx, 16, False, SCALE)
    torch.testing.assert_close(out.double(), ref.attention(*doubles(q, k, v), False, SCALE)[0], atol=TOL, rtol=0)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_index_attention(layout):
    q, k, v = far(*LAYOUTS[layout], copies=3)
    B, _, N, _ = q.shape
    idx = torch.arange(N - 1, -1, -1).expand(B, 1, N).contiguous()
    args = (idx, torch.full((B, 1), N, dtype=torch.int32), torch.arange(N).expand(B, N).contiguous(),
            torch.arange(N).expand(B, N).contiguous(), True, SCALE)
    out = triton_index.index_attention(q, k, v, *args)
    torch.testing.assert_close(out.double(), ref.index_attention(*doubles(q, k, v), *args), atol=TOL, rtol=0)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("path", ["all", "few", "lse"])
def test_key_importance(layout, path):
    q, k = far(*LAYOUTS[layout], copies=2)
    B, _, N, _ = q.shape
    rows = torch.tensor([[0, N - 1, N // 2]]).expand(B, 3) if path == "few" else None
    lse = ref.attention(q, k, k, True, SCALE)[1] if path == "lse" else None
    got = triton_key_importance.key_importance(q, k, lse, rows, True, SCALE)
    want = ref.key_importance(q, k, lse, rows, True, SCALE)
    torch.testing.assert_close(got, want, atol=PROB_TOL[torch.float16] * N ** 0.5, rtol=1e-4)


# [T, H, D] (shape, strides): token 64 starts past element 2^31; a token stride of 2^31.
@pytest.mark.parametrize("shape,strides", [((65, 1, D), (ROW, ROW, 1)), ((2, 1, D), (1 << 31, 4 * D, 1))],
                         ids=["row", "stride"])
def test_varlen_attention(shape, strides):
    q, k, v = far(shape, strides, copies=3)
    cu = torch.tensor([0, shape[0]], dtype=torch.int32)
    out, lse = triton_varlen.varlen_attention(q, k, v, cu, cu, shape[0], True, SCALE)
    want, want_lse = ref.varlen_attention(*doubles(q, k, v), cu, cu, shape[0], True, SCALE)
    torch.testing.assert_close(out.double(), want, atol=TOL, rtol=0)
    torch.testing.assert_close(lse.double(), want_lse.double(), atol=1e-3, rtol=0)


TOKENS = ((1, 65, D), (65 * ROW, ROW, 1))  # [B, N, C]: token 64 starts past element 2^31


def test_merge_tokens():
    x, keys = far(*TOKENS, copies=2)
    indices = torch.tensor([[0, 5, 30]])
    mask = torch.zeros(1, 65, dtype=torch.bool)
    mask[0, indices[0]] = True  # token 64 is pruned: merged into a kept one, read by its row offset
    for weighted in (False, True):
        got = triton_merge.merge_tokens(x, keys, indices, mask, weighted)
        want = ref.merge_tokens(x.double(), keys.double(), indices, mask, weighted)
        torch.testing.assert_close(got.double(), want, atol=TOL, rtol=0)


def test_gather_tokens():
    (x,) = far(*TOKENS)
    indices = torch.tensor([[64, 0, 63]])
    assert torch.equal(triton_gather.gather_tokens(x, indices, None, 0), ref.gather_tokens(x, indices, None, 0))


def test_select_tokens():
    (scores,) = far((1, 65), (65 * ROW, ROW))  # score 64 lies past element 2^31
    scores[0, 64] = 10.0  # the best: selected only if read from the right place
    budgets = torch.tensor([[3]])
    for sort in (True, False):
        got = triton_select.select_tokens(scores, budgets, [65], 3, sort)
        want = ref.select_tokens(scores, budgets, [65], 3, sort)
        assert all(torch.equal(a, b) for a, b in zip(got, want))
