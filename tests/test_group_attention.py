"""group_attention (VAR's fused pass): per-group partial outputs and masses of one softmax over all
keys. Reference vs a float64 naive loop; the op (every backend here) vs float64 on odd sizes, every
dtype, strided views, GQA, causal, hidden keys; the chunked torch backend never holds an [Nq, Nk]
tensor (a memory cap that the dense form trips); bad input; meta / compile."""
import sys

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import vtattn
from vtattn._registry import GROUP_ATTENTION
from helpers import DTYPES, OUT_TOL, backend_params, poisoned_outputs, rand_qkv, run_forced, skip_unless_supported

chunked = sys.modules["vtattn.reference.group_attention"]

# (B, Hq, Hkv, Nq, Nk, D, G, causal)
CASES = [
    (1, 1, 1, 1, 1, 64, 1, False),
    (2, 4, 2, 17, 40, 72, 3, True),
    (1, 4, 1, 33, 70, 80, 4, False),
    (2, 2, 2, 9, 30, 128, 4, True),  # Nq < Nk: decode-like end-aligned rows
    (2, 6, 3, 70, 50, 64, 2, True),  # Nq > Nk: the first rows see no key
    (1, 3, 3, 130, 130, 16, 5, True),
]
LAYOUTS = ("contiguous", "strided", "sliced")


def make(case, dtype, device="cpu", seed=0):
    B, Hq, Hkv, Nq, Nk, D, G, causal = CASES[case]
    q, k, v = rand_qkv(B, Hq, Hkv, Nq, Nk, D, dtype, device, LAYOUTS[case % 3], seed=seed)
    g = torch.Generator().manual_seed(seed)
    groups = torch.randint(-1, G, (B, Nk), generator=g)
    if Nk > 3:
        groups[:, :3] = -1  # left padding
    return q, k, v, groups.to(device), G, causal


def naive(q, k, v, groups, G, causal, scale=None):
    """float64, one (batch, head, row) at a time."""
    B, Hq, Nq, D = q.shape
    Hkv, Nk = k.shape[1], k.shape[2]
    scale = D ** -0.5 if scale is None else scale
    q, k, v, groups = q.cpu().double(), k.cpu().double(), v.cpu().double(), groups.cpu().expand(B, Nk)
    out = torch.zeros(B, Hq, Nq, G, D, dtype=torch.float64)
    mass = torch.zeros(B, Hq, Nq, G, dtype=torch.float64)
    for b in range(B):
        for h in range(Hq):
            kh = h // (Hq // Hkv)
            for i in range(Nq):
                seen = ((groups[b] >= 0) & ((torch.arange(Nk) <= i + Nk - Nq) | (not causal))).nonzero()[:, 0]
                if not len(seen):
                    continue
                p = torch.softmax(k[b, kh, seen] @ q[b, h, i] * scale, 0)
                for g in range(G):
                    pg = p * (groups[b, seen] == g)
                    out[b, h, i, g] = pg @ v[b, kh, seen]
                    mass[b, h, i, g] = pg.sum()
    return out, mass


def op_args(q, k, v, groups, G, causal):
    return q, k, v, groups.long().expand(k.shape[0], k.shape[2]).contiguous(), G, causal, q.shape[-1] ** -0.5


def test_reference_matches_float64():
    for case in (1, 4, 5):
        q, k, v, groups, G, causal = make(case, torch.float64, seed=3)
        args = op_args(q, k, v, groups, G, causal)
        want = naive(q, k, v, groups, G, causal)
        for fn in (vtattn.reference.group_attention, chunked.group_attention_chunked):
            out, mass = fn(*args)
            torch.testing.assert_close(out.double(), want[0], atol=1e-6, rtol=1e-6)
            torch.testing.assert_close(mass.double(), want[1], atol=1e-6, rtol=1e-6)


def test_chunked_form_matches_in_many_chunks(monkeypatch):
    monkeypatch.setattr(chunked, "CHUNK_LOGITS", 37)  # several query and key chunks, ragged
    for case in (1, 4, 5):
        args = op_args(*make(case, torch.float32, seed=5))
        for a, b in zip(chunked.group_attention_chunked(*args), vtattn.reference.group_attention(*args)):
            torch.testing.assert_close(a, b, atol=2e-6, rtol=1e-5)


@pytest.mark.parametrize("device,backend", backend_params(GROUP_ATTENTION))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", range(len(CASES)))
def test_group_attention_matches_float64(device, backend, dtype, case):
    q, k, v, groups, G, causal = make(case, dtype, device, seed=case)
    skip_unless_supported(GROUP_ATTENTION, op_args(q, k, v, groups, G, causal), backend)
    before = [t.clone() for t in (q, k, v, groups)]
    with poisoned_outputs():
        out, mass = run_forced(backend, vtattn.group_attention, q, k, v, groups, num_groups=G, causal=causal)
    B, Hq, Nq, D = q.shape
    assert out.shape == (B, Hq, Nq, G, D) and out.dtype == torch.float32
    assert out.transpose(1, 2).is_contiguous(), "out must be laid out as [B, Nq, Hq, G, D]"
    assert mass.shape == (B, Hq, Nq, G) and mass.dtype == torch.float32 and mass.is_contiguous()
    want_out, want_mass = naive(q, k, v, groups, G, causal)
    tol = OUT_TOL[dtype]
    torch.testing.assert_close(out.cpu().double(), want_out, atol=tol, rtol=tol)
    torch.testing.assert_close(mass.cpu().double(), want_mass, atol=1e-5, rtol=1e-5)
    for t, b in zip((q, k, v, groups), before):
        assert torch.equal(t, b), "inputs must not be modified"


def test_groups_sum_to_attention_and_one_dim_groups():
    q, k, v = rand_qkv(2, 4, 2, 17, 33, 72, torch.float32, layout="strided")
    for causal in (False, True):
        out, mass = vtattn.group_attention(q, k, v, torch.arange(33) % 3, num_groups=3, causal=causal)
        torch.testing.assert_close(out.sum(3), vtattn.attention(q, k, v, causal=causal).float())
        torch.testing.assert_close(mass.sum(-1), torch.ones_like(mass[..., 0]))


def test_hidden_keys_are_never_read():
    """NaN in a hidden key or value (padding) stays out; a row whose keys are all hidden gives 0."""
    q, k, v = rand_qkv(2, 2, 1, 5, 9, 64, torch.float32)
    groups = torch.tensor([[-1, -1, 0, 1, 0, 1, 0, 1, 0], [-1] * 9])
    k, v = k.clone(), v.clone()
    k[0, :, :2], v[0, :, :2] = float("nan"), float("nan")
    out, mass = vtattn.group_attention(q, k, v, groups, num_groups=2)
    assert out.isfinite().all() and mass.isfinite().all()
    assert torch.all(out[1] == 0) and torch.all(mass[1] == 0)
    torch.testing.assert_close(mass[0].sum(-1), torch.ones(2, 5))


class _Cap(TorchDispatchMode):
    """Raises MemoryError when an op creates a tensor of more than `cap` bytes."""

    def __init__(self, cap):
        super().__init__()
        self.cap, self.largest = cap, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                size = t.untyped_storage().nbytes()
                self.largest = max(self.largest, size)
                if size > self.cap:
                    raise MemoryError(f"{func} made a tensor of {size} bytes (cap {self.cap})")
        return out


def test_torch_backend_never_holds_nq_by_nk():
    """Nq = Nk = 8192, one head: an [Nq, Nk] fp32 tensor is 256 MiB. Under a 100 MiB cap on any one
    tensor the dense form fails and the torch backend (chunked) runs, matching the Triton-free path
    of the public op on the same inputs in chunks of rows."""
    N, D = 8192, 16
    q, k, v = (torch.randn(1, 1, N, D) for _ in range(3))
    groups = torch.randint(-1, 4, (1, N))
    args = (q, k, v, groups, 4, True, D ** -0.5)
    with pytest.raises(MemoryError), _Cap(100 << 20):
        vtattn.reference.group_attention(*args)
    with _Cap(100 << 20) as cap:
        out, mass = chunked.group_attention_chunked(*args)
    assert cap.largest <= 100 << 20
    rows = slice(N - 300, N)  # the last rows (whose keys are all of them) against the dense form
    want_out, want_mass = vtattn.reference.group_attention(q[:, :, rows], k, v, groups, 4, True, D ** -0.5)
    torch.testing.assert_close(out[:, :, rows], want_out, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(mass[:, :, rows], want_mass, atol=2e-5, rtol=1e-4)


def test_cuda_backend_refuses_with_a_reason():
    q, k, v, groups, G, causal = make(1, torch.float16)
    reason = GROUP_ATTENTION["cuda"].supports(*op_args(q, k, v, groups, G, causal))
    assert "no CUDA kernel" in reason


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", (torch.float16, torch.bfloat16, torch.float32), ids=str)
def test_triton_on_gpu_several_tiles(dtype):
    B, Hq, Hkv, Nq, Nk, D, G = 2, 6, 2, 259, 400, 128, 4
    q, k, v = rand_qkv(B, Hq, Hkv, Nq, Nk, D, dtype, "cuda", "strided", seed=1)
    groups = torch.randint(-1, G, (B, Nk), generator=torch.Generator().manual_seed(1)).cuda()
    for causal in (False, True):
        with poisoned_outputs():
            out, mass = vtattn.group_attention(q, k, v, groups, num_groups=G, causal=causal)
        want = vtattn.reference.group_attention(q, k, v, groups, G, causal, D ** -0.5)
        torch.testing.assert_close(out, want[0], atol=OUT_TOL[dtype], rtol=OUT_TOL[dtype])
        torch.testing.assert_close(mass, want[1], atol=1e-3, rtol=1e-3)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_opcheck(device):
    for case in (1, 3, 4):
        q, k, v, groups, G, causal = make(case, torch.float32, device)
        torch.library.opcheck(torch.ops.vtattn.group_attention.default, op_args(q, k, v, groups, G, causal))


def test_meta_tensors_and_compile():
    q, k, v = rand_qkv(2, 4, 2, 17, 23, 72, torch.float16, device="meta")
    groups = torch.empty(2, 23, dtype=torch.int64, device="meta")
    out, mass = torch.ops.vtattn.group_attention(q, k, v, groups, 3, True, 0.1)
    assert out.shape == (2, 4, 17, 3, 72) and out.dtype == torch.float32 and out.transpose(1, 2).is_contiguous()
    assert mass.shape == (2, 4, 17, 3) and mass.device.type == "meta"

    q, k, v, groups, G, causal = make(1, torch.float32)
    fn = torch.compile(lambda *a: vtattn.group_attention(*a, num_groups=G, causal=causal), fullgraph=True,
                       backend="aot_eager")
    for a, b in zip(fn(q, k, v, groups), vtattn.group_attention(q, k, v, groups, num_groups=G, causal=causal)):
        torch.testing.assert_close(a, b)


def test_grad_is_refused_by_name():
    q, k, v = rand_qkv(1, 2, 2, 5, 9, 64, torch.float32)
    q.requires_grad_(True)
    with pytest.raises(RuntimeError, match="group_attention"):
        vtattn.group_attention(q, k, v, torch.zeros(9, dtype=torch.long), num_groups=1)


def _bad(q, k, v, groups):
    return [
        ((q, k, v, groups.float()), {"num_groups": 3}, TypeError, "groups must have dtype"),
        ((q, k, v, groups[:, :4]), {"num_groups": 3}, ValueError, "groups must be \\[9\\] or \\[2, 9\\]"),
        ((q, k, v, groups[None]), {"num_groups": 3}, ValueError, "groups must be"),
        ((q, k, v, groups + 1), {"num_groups": 3}, ValueError, "groups must lie in \\[-1, num_groups=3\\)"),
        ((q, k, v, groups - 1), {"num_groups": 3}, ValueError, "groups must lie in"),
        ((q, k, v, groups), {"num_groups": 0}, ValueError, "num_groups must be an int >= 1"),
        ((q, k, v, groups), {"num_groups": True}, ValueError, "num_groups must be an int"),
        ((q[:, :3], k, v, groups), {"num_groups": 3}, ValueError, "multiple of k's"),
        ((q, k, v, groups.to("meta")), {"num_groups": 3}, ValueError, "groups is on meta"),
        ((q, k, v.half(), groups), {"num_groups": 3}, TypeError, "v has dtype"),
    ]


@pytest.mark.parametrize("bad", range(10))
def test_bad_inputs_raise_naming_the_argument(bad):
    q, k, v = rand_qkv(2, 4, 2, 5, 9, 64, torch.float32)
    groups = torch.tensor([-1, 0, 1, 2, 0, 1, 2, 0, 2]).expand(2, 9)
    args, kw, exc, msg = _bad(q, k, v, groups)[bad]
    with pytest.raises(exc, match=msg):
        vtattn.group_attention(*args, **kw)
