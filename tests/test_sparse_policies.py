"""vtattn.sparse policies (flexprefill, moa, hip, region_routing): the fast builders give exactly the
block lists of their references (vtattn.sparse.reference) on random and structured inputs, GQA and
batches; a policy that keeps every block gives dense attention; bad arguments raise naming them."""
import json

import pytest
import torch

import vtattn
from vtattn import sparse
from vtattn.sparse import reference
from helpers import rand_qkv

DTYPES = [torch.float64, torch.float32]


def dense(lists):
    return sparse.to_dense_blocks(*lists)


def structured(kind, B=2, Hq=4, Hkv=2, N=300, D=32, seed=0):
    """q, k with a known structure: "random", "diagonal" (q_i close to k_i: slash-like), "vertical"
    (a few keys every query likes), "ties" (repeated keys: equal scores everywhere)."""
    q, k, _ = rand_qkv(B, Hq, Hkv, N, N, D, torch.float32, seed=seed)
    if kind == "diagonal":
        q = 3 * k.repeat_interleave(Hq // Hkv, 1) + 0.1 * q
    elif kind == "vertical":
        k[:, :, [3, 77, 150]] = 4 * q.mean((1, 2))[:, None, None]
    elif kind == "ties":  # small integers: every dot product exact whatever the summation order
        q, k = (2 * q).round(), (2 * k[:, :, :10]).round().repeat(1, 1, N // 10 + 1, 1)[:, :, :N].contiguous()
    return q, k


def causal_all(B, H, nb):
    return torch.ones(B, H, nb, nb, dtype=torch.bool).tril()


# ---- flexprefill ------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kind", ["random", "diagonal", "vertical", "ties"])
@pytest.mark.parametrize("opts", [dict(gamma=0.9, tau=0.1), dict(gamma=0.5, tau=0.6),
                                  dict(gamma=0.95, tau=1.0, min_budget=64, max_budget=200)], ids=str)
def test_flexprefill_matches_reference(dtype, kind, opts):
    q, k = structured(kind)
    if kind == "ties":  # an exact scale keeps tied logits tied; softmax rounding may still untie the
        opts = dict(opts, scale=0.125, tau=0.0)  # pooled block attention (query-aware heads): none here
    got = dense(sparse.flexprefill(q, k, block_size=32, dtype=dtype, **opts))
    assert got.shape == (2, 4, 10, 10)
    assert torch.equal(got, reference.flexprefill(q, k, block_size=32, dtype=dtype, **opts))
    assert torch.equal(got & ~causal_all(2, 4, 10), torch.zeros_like(got))  # causal lists only
    assert got.diagonal(dim1=-2, dim2=-1).all() and got[..., 0].all()  # the diagonal and block 0 always


def test_flexprefill_pattern_choice():
    """tau = 0: every head vertical-slash; a diagonal-dominated head then lists few slash blocks."""
    q, k = structured("diagonal")
    blocks = dense(sparse.flexprefill(q, k, gamma=0.9, tau=0.0, block_size=32))
    assert blocks.float().mean() < 0.3 and blocks.diagonal(dim1=-2, dim2=-1).all()


def test_flexprefill_gamma_one_is_dense_attention():
    q, k, v = rand_qkv(1, 4, 2, 200, 200, 32, torch.float32, seed=3)
    num, idx = sparse.flexprefill(q, k, gamma=1.0, tau=0.5, block_size=32)
    assert torch.equal(dense((num, idx)), causal_all(1, 4, 7))
    got = vtattn.block_sparse_attention(q, k, v, num, idx, block_size=32, causal=True)
    torch.testing.assert_close(got, vtattn.attention(q, k, v, causal=True))
    short = sparse.flexprefill(q[:, :, :60], k[:, :, :60], gamma=0.1, block_size=32)  # N <= 2 blocks: dense
    assert torch.equal(dense(short), causal_all(1, 4, 2))


def test_flexprefill_gqa_reads_the_group_kv_head():
    q, k = structured("random", Hq=4, Hkv=2)
    got = dense(sparse.flexprefill(q, k, block_size=32, gamma=0.8, tau=0.3))
    want = dense(sparse.flexprefill(q, k.repeat_interleave(2, 1), block_size=32, gamma=0.8, tau=0.3))
    assert torch.equal(got, want)
    one = dense(sparse.flexprefill(q[1:], k[1:], block_size=32, gamma=0.8, tau=0.3))  # batched = one by one
    assert torch.equal(got[1:], one)


# ---- moa --------------------------------------------------------------------------------------------

CONFIG = {"alphas": [[0.0, 100.0, -50.0, 1000.0], [4096.0, 0.0, 0.0, 64.0]],
          "betas": [[0.1, 0.3, 0.05, 0.0], [0.0, 1.0, 0.5, 0.0]]}


@pytest.mark.parametrize("N,block_size", [(100, 64), (700, 64), (2000, 64), (700, 128), (333, 16)])
def test_moa_matches_reference(N, block_size):
    config = sparse.MoAConfig.from_dict(CONFIG)
    for layer in (0, 1):
        got = dense(sparse.moa(config, N, layer=layer, block_size=block_size))
        assert got.shape[:2] == (1, 4)
        assert torch.equal(got, reference.moa(config, N, layer=layer, block_size=block_size))


def test_moa_span_rule_and_json(tmp_path):
    """span = alpha + beta * N, at least 128, rounded up to 64 (the authors' cache sizes): beta 0.5 at
    N = 1000 -> 512 tokens = 1 sink block + 7 local blocks."""
    config = sparse.MoAConfig.uniform(1, 2, 0.0, 0.5)
    blocks = dense(sparse.moa(config, 1000))[0, 0]
    row = blocks[15]  # the last query block (16 blocks of 64)
    assert row.nonzero().flatten().tolist() == [0] + list(range(9, 16))
    path = tmp_path / "moa.json"
    path.write_text(json.dumps(CONFIG))
    assert sparse.MoAConfig.from_json(path).to_dict() == CONFIG
    full = sparse.MoAConfig.uniform(1, 2, 1e9, 0.0)  # every window longer than the prompt: dense
    assert torch.equal(dense(sparse.moa(full, 1000, block_size=128)), causal_all(1, 2, 8))


# ---- hip --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype,kind", [(torch.float32, "random"), (torch.float64, "diagonal"),
                                        (torch.float32, "ties")], ids=str)
@pytest.mark.parametrize("opts", [dict(k_blocks=2, rep_tokens=4), dict(k_blocks=3, rep_tokens=1, sink_blocks=0,
                                                                        window_blocks=0),
                                  dict(k_blocks=4, rep_tokens=8, sink_blocks=2, window_blocks=3)], ids=str)
def test_hip_matches_reference(dtype, kind, opts):
    q, k = structured(kind, B=1, Hq=2, Hkv=1, N=256)
    got = dense(sparse.hip(q, k, block_size=16, dtype=dtype, **opts))
    assert torch.equal(got, reference.hip(q, k, block_size=16, dtype=dtype, **opts))
    per_row = got.sum(-1)
    assert (per_row <= opts["k_blocks"] + opts.get("sink_blocks", 1) + opts.get("window_blocks", 1)).all()


def test_hip_keeps_every_block_when_k_covers_them():
    q, k, v = rand_qkv(2, 4, 2, 150, 150, 32, torch.float32, seed=5)
    num, idx = sparse.hip(q, k, k_blocks=10, block_size=16)
    assert torch.equal(dense((num, idx)), causal_all(2, 4, 10))
    torch.testing.assert_close(vtattn.block_sparse_attention(q, k, v, num, idx, block_size=16, causal=True),
                               vtattn.attention(q, k, v, causal=True))


def test_hip_finds_the_planted_key_block():
    """Every query of the last block likes key block 5: the tree search must keep it."""
    q, k = structured("random", B=1, Hq=1, Hkv=1, N=512)
    k[0, 0, 5 * 16:6 * 16] = 3 * q[0, 0, -16:].sum(0)
    blocks = dense(sparse.hip(q, k, k_blocks=2, block_size=16, rep_tokens=4))
    assert blocks[0, 0, -1, 5]
    assert sparse.hip_flops(1, 1, 512, 32, 2, 16, 4) < 0.25 * 2 * 512 * 512 * 32


# ---- region_routing ---------------------------------------------------------------------------------

GRIDS = [(5, 10, 12), (130, 8, 8), (300, 12, 20), (600, 5, 7)]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("per_head", [False, True])
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("opts", [dict(top_k=2, region_shape=(4, 4), block_size=32),
                                  dict(top_k=0, region_shape=(3, 5), block_size=16)], ids=str)
def test_region_routing_matches_reference(dtype, per_head, causal, opts):
    q, k = structured("random", N=700)
    got = dense(sparse.region_routing(q, k, GRIDS, causal=causal, per_head=per_head, dtype=dtype, **opts))
    assert got.shape[:2] == (2, 4 if per_head else 1)
    assert torch.equal(got, reference.region_routing(q, k, GRIDS, causal=causal, per_head=per_head, dtype=dtype,
                                                     **opts))


def test_region_routing_text_is_dense_and_all_regions_are_dense_attention():
    q, k, v = rand_qkv(2, 2, 1, 260, 260, 32, torch.float32, seed=2)
    grids = [[(20, 8, 10)], [(100, 10, 10), (200, 3, 20)]]  # one list per sample
    num, idx = sparse.region_routing(q, k, grids, top_k=100, region_shape=(2, 2), block_size=16)
    assert torch.equal(dense((num, idx)), causal_all(2, 1, 17))
    torch.testing.assert_close(vtattn.block_sparse_attention(q, k, v, num, idx, block_size=16, causal=True),
                               vtattn.attention(q, k, v, causal=True))
    blocks = dense(sparse.region_routing(q, k, grids, top_k=0, region_shape=(2, 2), block_size=16))
    assert blocks[0, 0, 0].sum() == 1 and blocks[0, 0, 16].all()  # text-only blocks: everything before
    assert torch.equal(dense(sparse.region_routing(q, k, [], block_size=16)), causal_all(2, 1, 17))


# ---- bad input --------------------------------------------------------------------------------------

BAD = [
    (lambda q, k: sparse.flexprefill(q, k, gamma=0.0), ValueError, "gamma must be a number in \\(0, 1\\]"),
    (lambda q, k: sparse.flexprefill(q, k, tau=1.5), ValueError, "tau must be"),
    (lambda q, k: sparse.flexprefill(q, k, block_size=0), ValueError, "block_size must be a positive int"),
    (lambda q, k: sparse.flexprefill(q, k, min_budget=0), ValueError, "min_budget must be an int >= 1"),
    (lambda q, k: sparse.flexprefill(q, k, min_budget=300, max_budget=200), ValueError, "must not exceed max_budget"),
    (lambda q, k: sparse.flexprefill(q[0], k), ValueError, "q must be a 4-D"),
    (lambda q, k: sparse.flexprefill(q, k[:, :, :10]), ValueError, "as many keys as queries"),
    (lambda q, k: sparse.flexprefill(q[:, :3], k), ValueError, "multiple of k's 2"),
    (lambda q, k: sparse.hip(q, k, k_blocks=0), ValueError, "k_blocks must be an int >= 1"),
    (lambda q, k: sparse.hip(q.long(), k), TypeError, "q must be a floating tensor"),
    (lambda q, k: sparse.moa(CONFIG, 100, layer=2), ValueError, "layer must be an int in \\[0, 2\\)"),
    (lambda q, k: sparse.moa({"alphas": [[1.0]]}, 100), ValueError, "'alphas' and 'betas'"),
    (lambda q, k: sparse.moa({"alphas": [[1.0]], "betas": [[1.0, 2.0]]}, 100), ValueError, "same \\[layers\\]"),
    (lambda q, k: sparse.region_routing(q, k, [(0, 10, 10), (50, 2, 2)]), ValueError, "overlap"),
    (lambda q, k: sparse.region_routing(q, k, [(250, 10, 10)]), ValueError, "within the 300 tokens"),
    (lambda q, k: sparse.region_routing(q, k, [[(0, 2, 2)]] * 3), ValueError, "the batch has 2"),
    (lambda q, k: sparse.region_routing(q, k, [], region_shape=(0, 2)), ValueError, "region_shape"),
]


@pytest.mark.parametrize("bad", range(len(BAD)))
def test_bad_arguments_raise_naming_them(bad):
    q, k = structured("random")
    call, exc, msg = BAD[bad]
    with pytest.raises(exc, match=msg):
        call(q, k)
