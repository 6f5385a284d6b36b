import pytest
import torch

import vtattn
from vtattn._registry import INDEX_ATTENTION
from helpers import DTYPES, OUT_TOL, backend_params, poisoned_outputs, rand_qkv, run_forced, skip_unless_supported

# (B, Hq, Hkv, Nq, Nk, L, D, causal, lists): lists "sorted" (ascending subsets), "shuffled" (any
# order, repeats), "pruned" (FastV-like: q and k/v both pruned, original positions given).
CASES = [
    (1, 2, 2, 1, 1, 1, 64, False, "sorted"),  # a single key
    (2, 4, 2, 17, 40, 23, 72, True, "sorted"),
    (1, 4, 1, 33, 70, 70, 80, False, "shuffled"),
    (2, 2, 2, 9, 30, 45, 128, True, "shuffled"),
    (2, 3, 3, 70, 100, 66, 64, True, "pruned"),
    (1, 4, 2, 130, 150, 77, 72, False, "sorted"),
]
LAYOUTS = ("contiguous", "strided", "sliced")


def make(case, dtype, device="cpu", seed=0, cases=CASES):
    """Inputs and the keyword arguments of one case; counts vary per (batch, head), some are 0."""
    B, Hq, Hkv, Nq, Nk, L, D, causal, lists = cases[case]
    q, k, v = rand_qkv(B, Hq, Hkv, Nq, Nk, D, dtype, device, LAYOUTS[case % 3], seed=seed)
    g = torch.Generator().manual_seed(seed)
    if lists == "shuffled":
        idx = torch.randint(0, Nk, (B, Hkv, L), generator=g)
    else:
        idx = torch.rand(B, Hkv, Nk, generator=g).argsort(-1)[..., :L].sort(-1).values
    counts = torch.randint(0, L + 1, (B, Hkv), generator=g, dtype=torch.int32)
    counts.view(-1)[0] = L
    if counts.numel() > 2:
        counts.view(-1)[1] = 0
    idx = torch.where(torch.arange(L) < counts[..., None], idx, -1)  # -1 padding past the counts
    kw = dict(kv_counts=counts.to(device), causal=causal)
    if lists == "pruned":  # kept tokens at their original positions, with gaps
        kw["kv_positions"] = torch.rand(B, Nk, generator=g).mul(3).cumsum(-1).long().to(device)
        kw["q_positions"] = torch.rand(B, Nq, generator=g).mul(4.5).cumsum(-1).long().to(device)
    return q, k, v, idx.to(device), kw


def naive(q, k, v, idx, kv_counts, causal, q_positions=None, kv_positions=None, scale=None):
    """float64 masked dense attention: key j's weight is exp(logit) times how often it is listed."""
    B, Hq, Nq, D = q.shape
    Hkv, Nk = k.shape[1], k.shape[2]
    scale = D ** -0.5 if scale is None else scale
    qp = torch.arange(Nq) + Nk - Nq if q_positions is None else q_positions.cpu()
    kp = torch.arange(Nk) if kv_positions is None else kv_positions.cpu()
    qp, kp = qp.expand(B, Nq), kp.expand(B, Nk)
    mult = torch.zeros(B, Hkv, Nk, dtype=torch.float64)
    for b in range(B):
        for h in range(Hkv):
            for j in idx[b, h, :int(kv_counts[b, h])].tolist():
                mult[b, h, j] += 1
    w = mult.repeat_interleave(Hq // Hkv, 1)[:, :, None, :].expand(B, Hq, Nq, Nk).clone()
    if causal:
        w = w * (kp[:, None, None, :] <= qp[:, None, :, None])
    s = q.cpu().double() @ k.cpu().double().repeat_interleave(Hq // Hkv, 1).transpose(-1, -2) * scale
    s = s.masked_fill(w == 0, float("-inf"))
    p = (torch.exp(s - s.amax(-1, keepdim=True)) * w).nan_to_num(0.0)
    p = p / p.sum(-1, keepdim=True).clamp_min(1e-300)
    return p @ v.cpu().double().repeat_interleave(Hq // Hkv, 1)


def op_args(q, k, v, idx, kw):
    """The canonical arguments of torch.ops.vtattn.index_attention for a case."""
    B, Nq, Nk = q.shape[0], q.shape[2], k.shape[2]
    qp = kw.get("q_positions", torch.arange(Nq, device=q.device) + Nk - Nq).expand(B, Nq).contiguous()
    kp = kw.get("kv_positions", torch.arange(Nk, device=q.device)).expand(B, Nk).contiguous()
    return q, k, v, idx.long().contiguous(), kw["kv_counts"], qp, kp, kw["causal"], q.shape[-1] ** -0.5


@pytest.mark.parametrize("device,backend", backend_params(INDEX_ATTENTION))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", range(len(CASES)))
def test_index_attention_matches_float64(device, backend, dtype, case):
    q, k, v, idx, kw = make(case, dtype, device, seed=case)
    skip_unless_supported(INDEX_ATTENTION, op_args(q, k, v, idx, kw), backend)
    before = [t.clone() for t in (q, k, v, idx)]
    with poisoned_outputs():
        out = run_forced(backend, vtattn.index_attention, q, k, v, idx, **kw)
    assert out.shape == q.shape and out.dtype == dtype
    assert out.transpose(1, 2).is_contiguous(), "out must be laid out as [B, Nq, Hq, D]"
    want = naive(q, k, v, idx, **kw)
    tol = OUT_TOL[dtype]
    torch.testing.assert_close(out.cpu().double(), want, atol=tol, rtol=tol)
    for t, b in zip((q, k, v, idx), before):
        assert torch.equal(t, b), "inputs must not be modified"


@pytest.mark.parametrize("device,backend", backend_params(INDEX_ATTENTION))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_zero_counts_give_zeros(device, backend, dtype):
    q, k, v = rand_qkv(2, 4, 2, 5, 9, 64, dtype, device)
    idx = torch.arange(9, device=device).expand(2, 2, 9)
    counts = torch.tensor([[9, 0], [0, 3]], dtype=torch.int32, device=device)
    args = op_args(q, k, v, idx, dict(kv_counts=counts, causal=False))
    skip_unless_supported(INDEX_ATTENTION, args, backend)
    out = run_forced(backend, vtattn.index_attention, q, k, v, idx, kv_counts=counts)
    assert torch.all(out[0, 2:] == 0) and torch.all(out[1, :2] == 0)
    assert torch.all(out[0, :2] != 0) and torch.all(out[1, 2:] != 0)


# One query row (a decode step; the C++ kernel's key-by-key path, not its tiles), as CASES: counts
# that are not multiples of the vector width and span several 64-key chunks, odd head dims, GQA,
# repeats, -1 padding past the counts; "pruned" puts the row halfway, so it sees about half its keys.
ONE_ROW_CASES = [
    (1, 2, 2, 1, 1, 1, 72, True, "sorted"),
    (2, 4, 2, 1, 3, 3, 40, True, "shuffled"),
    (1, 8, 2, 1, 24, 20, 128, True, "sorted"),
    (2, 4, 1, 1, 90, 130, 72, False, "shuffled"),
    (2, 3, 3, 1, 300, 200, 64, True, "pruned"),
    (3, 2, 1, 1, 40, 17, 40, False, "sorted"),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", range(len(ONE_ROW_CASES)))
def test_one_query_row_matches_float64(dtype, case):
    q, k, v, idx, kw = make(case, dtype, seed=case, cases=ONE_ROW_CASES)
    if "q_positions" in kw:
        kw["q_positions"] = kw["kv_positions"][:, k.shape[2] // 2, None]
    if case % 2:  # head dims of stride N: no unit-stride rows
        q, k, v = (t.transpose(-1, -2).contiguous().transpose(-1, -2) for t in (q, k, v))
    with poisoned_outputs():
        out = run_forced("cpp", vtattn.index_attention, q, k, v, idx, **kw)
    assert out.transpose(1, 2).is_contiguous() and out.dtype == dtype
    tol = OUT_TOL[dtype]
    torch.testing.assert_close(out.double(), naive(q, k, v, idx, **kw), atol=tol, rtol=tol)


def test_one_query_row_without_keys():
    """A row before every listed key (position -1, or positions past it) and a count of 0 give 0."""
    q, k, v = rand_qkv(2, 4, 2, 1, 9, 72, torch.float32, layout="sliced")
    idx = torch.tensor([4, 1, 7, 8, -1]).expand(2, 2, 5)
    counts = torch.tensor([[4, 0], [4, 4]], dtype=torch.int32)
    kw = dict(kv_counts=counts, causal=True, q_positions=torch.tensor([[-1], [3]]),
              kv_positions=torch.arange(9).expand(2, 9))
    with poisoned_outputs():
        out = run_forced("cpp", vtattn.index_attention, q, k, v, idx, **kw)
    assert torch.all(out[0] == 0) and torch.all(out[1] != 0)  # sample 1 sees key 1 only
    torch.testing.assert_close(out.double(), naive(q, k, v, idx, **kw), atol=1e-6, rtol=1e-5)


@pytest.mark.gpu
@pytest.mark.parametrize("D", (64, 72, 80, 128))
@pytest.mark.parametrize("dtype", (torch.float16, torch.bfloat16), ids=str)
@pytest.mark.parametrize("causal", (False, True))
def test_cuda_several_tiles(D, dtype, causal):
    """Several query and key tiles (128 x 64 in the CUDA kernel) with ragged tails, shuffled lists
    with repeats, counts 0 / partial / full, GQA, pruned positions, non-contiguous q/k/v."""
    B, Hq, Hkv, Nq, Nk, L = 2, 6, 2, 259, 400, 333
    q, k, v = rand_qkv(B, Hq, Hkv, Nq, Nk, D, dtype, "cuda", "strided", seed=D)
    g = torch.Generator().manual_seed(D)
    idx = torch.randint(0, Nk, (B, Hkv, L), generator=g)
    counts = torch.tensor([[L, 0], [130, 1]], dtype=torch.int32)
    kw = dict(kv_counts=counts.cuda(), causal=causal,
              kv_positions=torch.rand(B, Nk, generator=g).mul(2).cumsum(-1).long().cuda(),
              q_positions=torch.rand(B, Nq, generator=g).mul(3).cumsum(-1).long().cuda())
    with poisoned_outputs():
        out = run_forced("cuda", vtattn.index_attention, q, k, v, idx.cuda(), **kw)
    torch.testing.assert_close(out.cpu().double(), naive(q, k, v, idx, **kw), atol=OUT_TOL[dtype], rtol=OUT_TOL[dtype])
    assert torch.all(out[0, 3:] == 0)  # query heads 3..5 read kv head 1, whose count is 0 in sample 0


@pytest.mark.gpu
def test_cuda_refuses_fp32_and_dispatch_falls_back():
    q, k, v, idx, kw = make(3, torch.float32, "cuda")
    assert "fp32 goes to Triton" in INDEX_ATTENTION["cuda"].supports(*op_args(q, k, v, idx, kw))
    assert INDEX_ATTENTION["cuda"].supports(*op_args(q.half(), k.half(), v.half(), idx, kw)) is None
    torch.testing.assert_close(vtattn.index_attention(q, k, v, idx, **kw).cpu().double(), naive(q, k, v, idx, **kw),
                               atol=OUT_TOL[torch.float32], rtol=OUT_TOL[torch.float32])


def test_all_keys_equals_attention():
    q, k, v = rand_qkv(2, 4, 2, 17, 33, 72, torch.float32, layout="strided")
    idx = torch.arange(33).expand(2, 2, 33)
    for causal in (False, True):
        torch.testing.assert_close(vtattn.index_attention(q, k, v, idx, causal=causal),
                                   vtattn.attention(q, k, v, causal=causal))


def test_reference_matches_float64():
    for case in (3, 4):
        q, k, v, idx, kw = make(case, torch.float64, seed=7)
        args = op_args(q, k, v, idx, kw)
        torch.testing.assert_close(vtattn.reference.index_attention(*args), naive(q, k, v, idx, **kw))


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_opcheck(device):
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    for case in (1, 3, 4):
        q, k, v, idx, kw = make(case, dtype, device)
        torch.library.opcheck(torch.ops.vtattn.index_attention.default, op_args(q, k, v, idx, kw))


def test_meta_tensors_and_compile():
    q, k, v = rand_qkv(2, 4, 2, 17, 23, 72, torch.float16, device="meta")
    idx = torch.empty(2, 2, 9, dtype=torch.int64, device="meta")
    counts = torch.empty(2, 2, dtype=torch.int32, device="meta")
    qp, kp = (torch.empty(2, n, dtype=torch.int64, device="meta") for n in (17, 23))
    out = torch.ops.vtattn.index_attention(q, k, v, idx, counts, qp, kp, True, 0.1)
    assert out.shape == (2, 4, 17, 72) and out.device.type == "meta" and out.transpose(1, 2).is_contiguous()

    q, k, v, idx, kw = make(1, torch.float32)
    fn = torch.compile(lambda *a: vtattn.index_attention(*a, **kw), fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(fn(q, k, v, idx), vtattn.index_attention(q, k, v, idx, **kw))


def _bad(q, k, v, idx, c):
    return [
        ((q, k, v, idx.float()), {}, TypeError, "kv_indices must have dtype"),
        ((q, k, v, idx[0]), {}, ValueError, "kv_indices must be 3-D"),
        ((q, k, v, idx[:, :1]), {}, ValueError, "kv_indices must be \\[B, Hkv, L\\]"),
        ((q, k, v, idx + 1), {}, ValueError, "kv_indices must lie in \\[0, Nk=9\\)"),
        ((q, k, v, idx - 1), {}, ValueError, "kv_indices must lie in"),
        ((q, k, v, idx), {"kv_counts": c.long()}, TypeError, "kv_counts must have dtype"),
        ((q, k, v, idx), {"kv_counts": c + 1}, ValueError, "kv_counts must lie in \\[0, L=9\\]"),
        ((q, k, v, idx), {"kv_counts": c[:1]}, ValueError, "kv_counts must be \\[2, 2\\]"),
        ((q, k, v, idx), {"q_positions": torch.arange(4)}, ValueError, "q_positions must be \\[5\\] or \\[2, 5\\]"),
        ((q, k, v, idx), {"kv_positions": torch.ones(9)}, TypeError, "kv_positions must have dtype"),
        ((q[:, :3], k, v, idx), {}, ValueError, "multiple of k's"),
        ((q, k, v, idx.to("meta")), {}, ValueError, "kv_indices is on meta"),
    ]


@pytest.mark.parametrize("bad", range(12))
def test_bad_inputs_raise_naming_the_argument(bad):
    q, k, v = rand_qkv(2, 4, 2, 5, 9, 64, torch.float32)
    idx = torch.arange(9).expand(2, 2, 9)
    args, kw, exc, msg = _bad(q, k, v, idx, torch.full((2, 2), 9, dtype=torch.int32))[bad]
    with pytest.raises(exc, match=msg):
        vtattn.index_attention(*args, **kw)


def test_entries_past_counts_are_ignored():
    q, k, v = rand_qkv(1, 2, 1, 4, 9, 64, torch.float32)
    idx = torch.tensor([[[2, 5, 7, 100]]])
    out = vtattn.index_attention(q, k, v, idx, kv_counts=torch.tensor([[3]], dtype=torch.int32))
    torch.testing.assert_close(out, vtattn.index_attention(q, k, v, idx[..., :3]))
