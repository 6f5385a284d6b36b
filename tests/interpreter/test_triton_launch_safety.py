"""Triton kernels on inputs only the public checks refuse (skipped under torch.compile and by
internal calls): they must stay inside their tensors. K/V and x are fenced with NaN (a read past
them shows), and where the kernel defines a result for such inputs it must be the reference's on
the cleaned-up inputs: index_attention clamps counts to [0, L] and skips indices outside [0, Nk);
block_sparse_attention clamps counts to the list and skips blocks outside the keys; varlen
clamps cu_seqlens into the packed tensors."""
import os

import pytest
import torch

from helpers import fenced
from vtattn import reference

pytestmark = [pytest.mark.interpreter,
              pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="needs TRITON_INTERPRET=1")]
TOL = dict(atol=2e-5, rtol=2e-5)


def _kv(B, H, N, D, seed):
    g = torch.Generator().manual_seed(seed)
    return [fenced(torch.randn(B, H, N, D, generator=g), 2, before=3, after=5) for _ in range(2)]


@pytest.mark.parametrize("causal", [False, True])
def test_index_attention_bad_counts_and_indices(causal):
    from vtattn.triton_kernels.index_attention import index_attention
    B, Hq, Hkv, Nq, Nk, L, D = 2, 4, 2, 9, 20, 8, 16
    q = torch.randn(B, Hq, Nq, D, generator=torch.Generator().manual_seed(0))
    k, v = _kv(B, Hkv, Nk, D, 1)
    idx = torch.tensor([[[3, -1, 7, 20, 2**40, 0, 19, -2**40]] * Hkv] * B)
    counts = torch.tensor([[L + 5, -3], [4, L]], dtype=torch.int32)
    q_pos = torch.arange(Nk - Nq, Nk).expand(B, Nq).contiguous()
    kv_pos = torch.arange(Nk).expand(B, Nk).contiguous()
    out = index_attention(q, k, v, idx, counts, q_pos, kv_pos, causal, 0.25)
    # the same lists cleaned up: counts clamped, the listed out-of-range entries dropped
    clean_idx, clean_counts = torch.zeros_like(idx), torch.zeros_like(counts)
    for b in range(B):
        for h in range(Hkv):
            keep = [i for i in idx[b, h, :max(0, min(int(counts[b, h]), L))].tolist() if 0 <= i < Nk]
            clean_idx[b, h, :len(keep)] = torch.tensor(keep, dtype=idx.dtype)
            clean_counts[b, h] = len(keep)
    want = reference.index_attention(q, k, v, clean_idx, clean_counts, q_pos, kv_pos, causal, 0.25)
    torch.testing.assert_close(out, want, **TOL)


def test_block_sparse_bad_counts_and_blocks():
    from vtattn.triton_kernels.block_sparse_attention import block_sparse_attention
    B, H, N, D, bs = 1, 2, 48, 16, 16
    q = torch.randn(B, H, N, D, generator=torch.Generator().manual_seed(2))
    k, v = _kv(B, H, N, D, 3)
    nb = N // bs
    idx = torch.tensor([[[[2, -1, 0], [nb, 1, 2**30], [0, 1, 2]]] * H], dtype=torch.int32)
    num = torch.tensor([[[9, 3, -2]] * H], dtype=torch.int32)
    out, lse = block_sparse_attention(q, k, v, num, idx, bs, False, 0.25)
    clean_idx = torch.tensor([[[[2, 0, 0], [1, 0, 0], [0, 1, 2]]] * H], dtype=torch.int32)
    clean_num = torch.tensor([[[2, 1, 0]] * H], dtype=torch.int32)
    want, want_lse = reference.block_sparse_attention(q, k, v, clean_num, clean_idx, bs, False, 0.25)
    torch.testing.assert_close(out, want, **TOL)
    torch.testing.assert_close(lse, want_lse, **TOL)


def test_varlen_cu_seqlens_outside_the_tensors():
    from vtattn.triton_kernels.varlen_attention import varlen_attention
    Tq, Tk, H, D = 10, 20, 2, 16
    g = torch.Generator().manual_seed(4)
    q = fenced(torch.randn(Tq, H, D, generator=g), 0, before=4, after=4)
    k, v = (fenced(torch.randn(Tk, H, D, generator=g), 0, before=4, after=4) for _ in range(2))
    cu_q = torch.tensor([0, 5, 3, 12], dtype=torch.int32)  # decreasing, then past Tq
    cu_k = torch.tensor([-4, 7, 100, 30], dtype=torch.int32)  # negative, past Tk
    out, lse = varlen_attention(q, k, v, cu_q, cu_k, 9, True, 0.25)
    assert not out.isnan().any() and not lse.isnan().any()  # nothing read past q, k, v
    # sequence 0 is rows 0..4 over keys 0..6: as a valid list gives
    want, _ = reference.varlen_attention(q[:5], k[:7], v[:7], torch.tensor([0, 5], dtype=torch.int32),
                                         torch.tensor([0, 7], dtype=torch.int32), 5, True, 0.25)
    torch.testing.assert_close(out[:3], want[:3], **TOL)  # rows 3, 4 also belong to the clamped sequence 2


def test_gather_packed_with_bad_cu_seqlens():
    from vtattn.triton_kernels.gather_tokens import gather_tokens
    x = fenced(torch.randn(2, 6, 4, generator=torch.Generator().manual_seed(5)), 1, before=2, after=2)
    idx = torch.tensor([[0, 5, 2], [1, -1, 9]])
    out = gather_tokens(x, idx, torch.tensor([0, 7, 3], dtype=torch.int32), 5)
    assert not out.isnan().any()
