"""cmai_step (CMAI's pass 2 for a decode step's text rows, patch.cmai) against its reference, and the
reference against a per-row float64 loop: GQA (groups of 1, 3 and 4), odd head dims, one row and
several (rows between two images see part of them), entries that hold no token (in the middle of the
lists, and a row of them), keep / weight pairs, strided records (views of capacity buffers, as
`Growing` holds them) and queries, every dtype. The rows' P_ti are written, the earlier ones and
every other input left as they were."""
import math

import pytest
import torch

import vtattn
from vtattn._registry import CMAI_STEP
from helpers import DTYPES, backend_params, run_forced, skip_unless_supported

CASES = [  # (B, Hq, Hkv, R, T, I, D, keep, weight)
    (1, 2, 2, 1, 5, 7, 16, 0.5, 0.0),
    (2, 4, 1, 1, 9, 12, 64, 0.25, 0.0),
    (2, 6, 2, 3, 11, 9, 40, 0.5, 0.2),  # a group of 3; rows between the images
    (3, 8, 2, 2, 14, 20, 128, 0.7, 0.0),
    (1, 4, 4, 4, 6, 5, 80, 1.0, 0.0),  # keep 1: the plain attention
]
LAYOUTS = ["contiguous", "strided"]


def make_inputs(B, Hq, Hkv, R, T, I, D, keep, weight, dtype=torch.float32, device="cpu", layout="contiguous", seed=0):
    """Each sample: a sequence of text and image tokens; its text entries list the text positions
    ascending with not-ok slots among them (arbitrary positions), the last R entries are the rows
    (sample 1's last row holds no token), its image entries list the image positions likewise. The
    record's earlier P_ti rows: random probabilities. "strided": q a view of [B, R, Hq, D], the record
    narrowed views of wider buffers (as `Growing` keeps them)."""
    g = torch.Generator().manual_seed(seed)
    text = torch.zeros(B, T, dtype=torch.int64)
    text_ok = torch.ones(B, T, dtype=torch.bool)
    image = torch.zeros(B, I, dtype=torch.int64)
    image_ok = torch.ones(B, I, dtype=torch.bool)
    for b in range(B):
        nt, ni = T - 1 - b % 2, I - b % 3  # some not-ok slots
        kinds = torch.cat([torch.zeros(nt), torch.ones(ni)])[torch.randperm(nt + ni, generator=g)]
        kinds[-R:] = 0 if (kinds[-R:] == 0).all() else kinds[-R:]
        order = torch.cat([kinds[:-R][torch.randperm(nt + ni - R, generator=g)], kinds[-R:]])
        tpos, ipos = (order == 0).nonzero()[:, 0], (order == 1).nonzero()[:, 0]
        tpos, ipos = tpos[-nt:], ipos  # (a text row at the end: the rows are text tokens)
        slots = sorted(torch.randperm(T - R, generator=g)[:T - nt].tolist())  # not-ok slots before the rows
        j = 0
        for t in range(T):
            if t in slots:
                text[b, t], text_ok[b, t] = int(torch.randint(0, nt + ni, (), generator=g)), False
            else:
                text[b, t] = tpos[j]
                j += 1
        image[b, :len(ipos)] = ipos
        image_ok[b, len(ipos):] = False
        image[b, len(ipos):] = torch.randint(0, nt + ni, (I - len(ipos),), generator=g)
    if B > 1:
        text_ok[1, -1] = False  # a row without a token
    p_ti = torch.rand(B, Hq, T, I, generator=g, dtype=torch.float64 if dtype == torch.float64 else torch.float32)
    p_ti /= p_ti.sum(-1, keepdim=True)
    if layout == "strided":
        q = torch.randn(B, R, Hq, D, generator=g).to(dtype).transpose(1, 2)
        k_t, v_t = (torch.randn(B, Hkv, T + 5, D, generator=g).to(dtype).narrow(2, 0, T) for _ in range(2))
        k_i, v_i = (torch.randn(B, I, Hkv, D, generator=g).to(dtype).transpose(1, 2) for _ in range(2))
        text = torch.cat([text, torch.zeros(B, 3, dtype=torch.int64)], 1).narrow(1, 0, T)
        text_ok = torch.cat([text_ok, torch.zeros(B, 3, dtype=torch.bool)], 1).narrow(1, 0, T)
        p_ti = torch.cat([p_ti, p_ti.new_zeros(B, Hq, 4, I)], 2).narrow(2, 0, T)
    else:
        q = torch.randn(B, Hq, R, D, generator=g).to(dtype)
        k_t, v_t, k_i, v_i = (torch.randn(B, Hkv, n, D, generator=g).to(dtype) for n in (T, T, I, I))
    tensors = [t.to(device) for t in (q, k_t, v_t, text, text_ok, k_i, v_i, image, image_ok, p_ti)]
    return (*tensors, keep, weight, D ** -0.5)


def clone(args):
    return tuple(a.clone() if isinstance(a, torch.Tensor) else a for a in args)


def naive(args):
    """The semantics row by row and head by head, in float64: (out, p_ti)."""
    q, k_t, v_t, text, text_ok, k_i, v_i, image, image_ok, p_ti, keep, weight, scale = clone(args)
    B, Hq, R, D = q.shape
    rep, T, I = Hq // k_t.shape[1], text.shape[1], image.shape[1]
    p_ti, out = p_ti.double(), torch.zeros(B, Hq, R, D, dtype=torch.float64)
    for b in range(B):
        for r in range(R):
            e = T - R + r
            if not text_ok[b, e]:
                p_ti[b, :, e] = 0
                continue
            st = [t for t in range(T) if text_ok[b, t] and text[b, t] <= text[b, e]]
            si = [i for i in range(I) if image_ok[b, i] and image[b, i] <= text[b, e]]
            probs = []
            for h in range(Hq):
                x = q[b, h, r].double()
                s = torch.cat([k_t[b, h // rep, st].double() @ x, k_i[b, h // rep, si].double() @ x]) * scale
                p = s.softmax(0)
                p_ti[b, h, e] = 0
                p_ti[b, h, e, si] = p[len(st):]
                probs.append(p)
            focus = [sum(float(probs[h][a]) * float(p_ti[b, h, t, i]) for h in range(Hq) for a, t in enumerate(st))
                     / Hq for i in si]
            budget = max(1, round(keep * len(si))) if si else 0
            kept = sorted(range(len(si)), key=lambda j: (-focus[j], j))[:budget]
            for h in range(Hq):
                w = torch.tensor([1.0] * len(st) + [1.0 if j in kept else weight for j in range(len(si))],
                                 dtype=torch.float64)
                p = probs[h] * w
                vals = torch.cat([v_t[b, h // rep, st].double(), v_i[b, h // rep, si].double()])
                out[b, h, r] = (p / p.sum()) @ vals
    return out, p_ti


def check_step(got_args, out, args, want_out, want_p, tol):
    """out and the rows' P_ti as wanted, earlier P_ti rows and every other input untouched."""
    R, T = args[0].shape[2], args[3].shape[1]
    torch.testing.assert_close(out.cpu().double(), want_out.cpu().double(), rtol=tol, atol=tol)
    torch.testing.assert_close(got_args[9][:, :, T - R:].cpu().double(), want_p[:, :, T - R:].cpu().double(),
                               rtol=tol, atol=tol)
    assert torch.equal(got_args[9][:, :, :T - R], args[9][:, :, :T - R]), "earlier P_ti rows must stay"
    for i in range(9):
        assert torch.equal(got_args[i], args[i]), f"input {i} must not be modified"


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(map(str, c)))
def test_reference_matches_a_naive_loop(case):
    args = make_inputs(*case, dtype=torch.float64, seed=sum(case[:7]))
    got = clone(args)
    out = vtattn.reference.cmai_step(*got)
    want_out, want_p = naive(args)
    check_step(got, out, args, want_out, want_p, 1e-9)
    if case[-2] < 1.0:  # the rule inhibits some image key of some row
        plain = clone(args)
        assert not torch.allclose(vtattn.reference.cmai_step(*plain[:10], 1.0, 0.0, plain[12]), out)


@pytest.mark.parametrize("device,backend", backend_params(CMAI_STEP))
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(map(str, c)))
def test_cmai_step_matches_reference(device, backend, dtype, layout, case):
    args = make_inputs(*case, dtype=dtype, device=device, layout=layout, seed=sum(case[:7]))
    skip_unless_supported(CMAI_STEP, args, backend)
    got, want = clone(args), clone(args)
    out = run_forced(backend, torch.ops.vtattn.cmai_step, *got)
    want_out = vtattn.reference.cmai_step(*want)
    assert out.dtype == torch.float32 and out.shape == args[0].shape
    check_step(got, out, args, want_out, want[9], 2e-5)


@pytest.mark.parametrize("device,backend", backend_params(CMAI_STEP))
def test_steps_in_a_row_follow_the_reference(device, backend):
    """A decode: each step lists a new text entry (the next position), its key and value, and runs the
    op on the record the steps before wrote."""
    B, Hq, Hkv, T, I, D = 2, 4, 2, 6, 10, 32
    args = list(make_inputs(B, Hq, Hkv, 1, T, I, D, 0.5, 0.0, device=device, seed=1))
    skip_unless_supported(CMAI_STEP, args, backend)
    g = torch.Generator().manual_seed(2)
    got, want = list(args), list(clone(args))
    for step in range(5):
        new = [torch.randn(B, h, 1, D, generator=g).to(device) for h in (Hq, Hkv, Hkv)]
        at = torch.full((B, 1), 100 + step, dtype=torch.int64, device=device)
        for state in (got, want):
            state[0] = new[0]
            state[1], state[2] = (torch.cat([state[i], new[i]], 2) for i in (1, 2))
            state[3] = torch.cat([state[3], at], 1)
            state[4] = torch.cat([state[4], torch.ones_like(at, dtype=torch.bool)], 1)
            state[9] = torch.cat([state[9], torch.full((B, Hq, 1, I), float("nan"), device=device)], 2)
        out = run_forced(backend, torch.ops.vtattn.cmai_step, *got)
        want_out = vtattn.reference.cmai_step(*want)
        torch.testing.assert_close(out, want_out, rtol=2e-5, atol=2e-5)
        torch.testing.assert_close(got[9], want[9], rtol=2e-5, atol=2e-5)
    assert got[9].isfinite().all()


def test_cpp_kernel_refuses_bad_arguments_by_name():
    args = make_inputs(*CASES[2])
    skip_unless_supported(CMAI_STEP, args, "cpp")
    for i, value, match in ((2, args[2][:, :, :-1], r"v_t must be Float \[2, 2, 11, 40\]"),
                            (3, args[3].int(), r"text must be Long \[2, 11\]"),
                            (8, args[8][:1], r"image_ok must be Bool \[2, 9\]"),
                            (9, args[9].half(), r"p_ti must be float32 \[2, 6, 11, 9\]"),
                            (0, args[0].repeat(1, 1, 4, 1), "q's 12 rows must be the last of the 11"),
                            (10, 0.0, r"keep must be in \(0, 1\]"), (11, 1.5, r"weight must be in \[0, 1\]")):
        bad = list(clone(args))
        bad[i] = value
        with pytest.raises(RuntimeError, match=f"cmai_step: {match}"):
            torch.ops.vtattn_C.cmai_step(*bad)


def test_opcheck():
    torch.library.opcheck(torch.ops.vtattn.cmai_step.default, make_inputs(*CASES[2]))


def test_compiled_call_equals_eager():
    args = make_inputs(*CASES[1])
    got, want = clone(args), clone(args)
    out = torch.compile(torch.ops.vtattn.cmai_step, fullgraph=True)(*got)
    torch.testing.assert_close(out, torch.ops.vtattn.cmai_step(*want))
    torch.testing.assert_close(got[9], want[9])


@pytest.mark.parametrize("keep,kept", [(0.25, 2), (0.45, 4), (0.15, 2), (0.01, 1), (1.0, 10)])
def test_kept_count_rounds_half_to_even(keep, kept):
    """A row that sees 10 image keys keeps max(1, round(keep * 10)) (half to even), counted through
    one-hot values: each image key's value is its own unit vector, the text values 0."""
    args = list(make_inputs(1, 2, 2, 1, 3, 10, 16, keep, 0.0, seed=3))
    args[3], args[4] = torch.tensor([[20, 21, 22]]), torch.ones(1, 3, dtype=torch.bool)
    args[7], args[8] = torch.arange(10)[None], torch.ones(1, 10, dtype=torch.bool)
    args[2], args[6] = torch.zeros_like(args[2]), torch.eye(10, 16).expand(1, 2, 10, 16)
    for backend in [b for b in ("cpp", "torch") if CMAI_STEP[b].supports(*args) is None]:
        out = run_forced(backend, torch.ops.vtattn.cmai_step, *clone(args))
        assert ((out[0, :, 0, :10] > 0).sum(-1) == kept).all(), backend
