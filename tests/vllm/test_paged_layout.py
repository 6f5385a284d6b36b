"""vtattn.decode_attention on vLLM's paged KV layout as its attention backends hold it (the cache
[num_blocks, Hkv, block_size, 2 * D] split into K / V views, a [B, max_blocks] block table, seq_lens):
equal to attention over each sequence's gathered keys (float64), without copying the cache."""
import pytest
import torch

import vtattn


def _vllm_cache(blocks, heads, size, d, dtype, layout):
    """K / V views [num_blocks, block_size, Hkv, D] of one vLLM cache tensor: "cpu" (vLLM's CPU backend:
    a block's [block_size, 2D] rows read as K's block_size rows then V's) or "flash" (K | V halves of D)."""
    kv = torch.randn(blocks, heads, size, 2 * d, dtype=dtype)
    if layout == "cpu":
        k, v = kv.view(blocks, heads, 2 * size, d).chunk(2, dim=2)
        return kv, k.transpose(1, 2), v.transpose(1, 2)
    k, v = kv.transpose(1, 2).split(d, dim=-1)
    return kv, k, v


def _reference(q, k, v, table, lengths, size):
    out = torch.zeros(q.shape, dtype=torch.float64)
    G = q.shape[1] // k.shape[2]
    for b, n in enumerate(lengths.tolist()):
        slots = [(int(table[b, t // size]), t % size) for t in range(n)]
        if not slots:
            continue
        keys = torch.stack([k[blk, off] for blk, off in slots]).double()  # [n, Hkv, D]
        vals = torch.stack([v[blk, off] for blk, off in slots]).double()
        for h in range(q.shape[1]):
            p = torch.softmax(keys[:, h // G] @ q[b, h, 0].double() * q.shape[-1] ** -0.5, 0)
            out[b, h, 0] = p @ vals[:, h // G]
    return out


@pytest.mark.parametrize("layout", ["cpu", "flash"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("heads, hq", [(2, 6), (1, 3)])
def test_decode_attention_on_vllm_pages(layout, dtype, heads, hq, monkeypatch):
    g = torch.Generator().manual_seed(0)
    blocks, size, d, B, max_blocks = 17, 4, 32, 3, 5
    kv, k, v = _vllm_cache(blocks, heads, size, d, dtype, layout)
    table = torch.randperm(blocks, generator=g)[:B * max_blocks].view(B, max_blocks).int()
    table[0, 3:] = -1  # unused entries
    lengths = torch.tensor([9, 20, 0], dtype=torch.int32)
    q = torch.randn(B, hq, 1, d, dtype=dtype)
    pools = []
    op = torch.ops.vtattn.paged_decode_attention
    monkeypatch.setattr(torch.ops.vtattn, "paged_decode_attention",
                        lambda *a: pools.append(a[1:3]) or op(*a), raising=False)
    out = vtattn.decode_attention(q, k, v, lengths, block_table=table)
    assert all(p.untyped_storage().data_ptr() == kv.untyped_storage().data_ptr() for p in pools[0])  # no copy
    tol = dict(atol=2e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=1e-2, rtol=1e-2)
    torch.testing.assert_close(out.double(), _reference(q, k, v, table, lengths, size), **tol)


def test_vllm_layout_bad_input():
    kv, k, v = _vllm_cache(4, 2, 4, 8, torch.float32, "cpu")
    q, table = torch.randn(2, 2, 1, 8), torch.zeros(2, 2, dtype=torch.int32)
    with pytest.raises(ValueError, match="lengths must be \\[B\\]"):
        vtattn.decode_attention(q, k, v, torch.zeros(2, 2, dtype=torch.int32), block_table=table)
    with pytest.raises(ValueError, match="v_cache must be \\[num_blocks"):
        vtattn.decode_attention(q, k, v[0], torch.zeros(2, dtype=torch.int32), block_table=table)
    token_major = torch.randn(4, 4, 2, 16)[..., :8]  # [blocks, tokens, heads, D]: a block is not Hkv heads
    with pytest.raises(ValueError, match="head-major"):
        vtattn.decode_attention(q, token_major, token_major, torch.zeros(2, dtype=torch.int32), block_table=table)
