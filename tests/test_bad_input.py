"""Bad input, tried as a new user would (issue 20), on every public op and every CPU backend (cpp, torch;
Triton under the interpreter in interpreter/test_triton_bad_input.py, which reuses these tables; CUDA
gpu-marked). Each call raises a clear error naming the argument or returns what the reference returns on
contiguous copies, and never modifies the caller's tensors. The NaN rules of docs/internals.md per op and
backend; meta tensors, fake tensors and torch.compile(fullgraph=True) for every op."""
from types import SimpleNamespace

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode, is_fake

import vtattn
from vtattn import _registry
from vtattn._dispatch import BackendUnavailable
from vtattn.ops.select_tokens import _Uniform

NAN, INF = float("nan"), float("inf")
I32 = torch.int32


def inputs(dev="cpu"):
    """Small valid arguments of every op (fp32), fixed seed; a fresh set per call."""
    g = torch.Generator().manual_seed(0)
    r = lambda *s: torch.randn(*s, generator=g).to(dev)  # noqa: E731
    t = lambda x, dtype=torch.int64: torch.tensor(x, dtype=dtype).to(dev)  # noqa: E731
    n = SimpleNamespace(dev=dev, t=t)
    n.q, n.k, n.v = r(2, 4, 5, 16), r(2, 2, 9, 16), r(2, 2, 9, 16)  # GQA 4 / 2
    n.rows = t([[0, 4], [2, 2]])
    n.scores = r(2, 12)
    n.sel = vtattn.select_tokens(n.scores, keep_tokens=4)
    n.x, n.keys = r(2, 12, 8), r(2, 12, 6)
    n.tq, n.tk, n.tv = r(7, 4, 16), r(11, 2, 16), r(11, 2, 16)
    n.cu_q, n.cu_k = t([0, 3, 3, 7], I32), t([0, 4, 11, 11], I32)  # no queries in sequence 1, no keys in 2
    n.idx = t([[[8, 0, 3, 3], [5, 1, -1, 99]], [[2, 2, 2, 2], [7, 6, 4, -5]]])
    n.cnt = t([[4, 2], [0, 3]], I32)
    n.qd, n.kc, n.vc = r(2, 4, 1, 16), r(2, 2, 10, 16), r(2, 2, 10, 16)
    n.lens = t([[10, 3], [0, 7]], I32)
    n.pk, n.pv = r(8, 4, 16), r(8, 4, 16)  # pages of 4 tokens
    n.table = t([[[5, 0, -1], [7, 7, 2]], [[-1, -1, -1], [1, 3, 6]]], I32)
    n.plens = t([[6, 12], [0, 9]], I32)
    n.bq, n.bk, n.bv = r(2, 4, 20, 16), r(2, 2, 40, 16), r(2, 2, 40, 16)  # block 16: 2 query, 3 key blocks
    n.num = t([[[1, 2], [0, 3], [2, 1], [1, 1]]], I32)
    n.bidx = t([[[[2, 0, 0], [0, 1, 2]], [[9, 9, 9], [2, 0, 1]], [[1, 0, 7], [1, 1, 1]], [[0, 2, 2], [2, 0, 0]]]], I32)
    return n


A, KI, ST, G, M = (vtattn.attention, vtattn.key_importance, vtattn.select_tokens, vtattn.gather_tokens,
                   vtattn.merge_tokens)
STC = lambda scores, counts, **kw: ST(scores, keep_tokens=counts, **kw)  # noqa: E731  (a count: keep_tokens=)
VL, IX, DA, BS = vtattn.varlen_attention, vtattn.index_attention, vtattn.decode_attention, vtattn.block_sparse_attention
# The op a case name's prefix stands for (its backends are the ones tried).
OPS = {"attention": "attention", "ki": "key_importance", "st": "select_tokens", "gather": "gather_tokens",
       "merge": "merge_tokens", "varlen": "varlen_attention", "index": "index_attention", "decode": "decode_attention",
       "paged": "paged_decode_attention", "bs": "block_sparse_attention"}


def op_of(name):
    return OPS[name.split("-")[0]]


def c(fn, *args, **kwargs):
    """A call as (fn, args, kwargs): what the case builders return."""
    return fn, args, kwargs


def _select(scores, keep, **kwargs):
    """select_tokens with a ratio (float) as keep=, a count (int, tensor) as keep_tokens=."""
    budget = {"keep": keep} if isinstance(keep, float) else {"keep_tokens": keep}
    return c(lambda *a, **k: tuple(ST(*a, **k))[:3], scores, **budget, **kwargs)


# ---- valid calls of every op: meta, fake and compiled runs ------------------------------------

VALID = {
    "attention": lambda n: c(A, n.q, n.k, n.v, causal=True, return_lse=True),
    "ki": lambda n: c(KI, n.q, n.k, rows=n.rows, causal=True),
    "ki-lse": lambda n: c(KI, n.q, n.k, rows=n.q.new_ones(2, 5, dtype=torch.bool), lse=n.q.new_zeros(2, 4, 5),
                          reduce_heads="mean"),
    "st": lambda n: _select(n.scores, 2, segments=[5, 7]),
    "gather": lambda n: c(G, n.x, n.sel),
    "gather-packed": lambda n: c(G, n.x, n.sel, packed=True),
    "merge": lambda n: c(M, n.x, n.sel, keys=n.keys, mode="weighted"),
    "varlen": lambda n: c(VL, n.tq, n.tk, n.tv, n.cu_q, n.cu_k, max_seqlen_q=4, causal=True, return_lse=True),
    "index": lambda n: c(IX, n.q, n.k, n.v, n.idx, kv_counts=n.cnt, causal=True),
    "decode": lambda n: c(DA, n.qd, n.kc, n.vc, n.lens),
    "paged": lambda n: c(DA, n.qd, n.pk, n.pv, n.plens, block_table=n.table),
    "bs": lambda n: c(BS, n.bq, n.bk, n.bv, n.num, n.bidx, block_size=16, causal=True, return_lse=True),
}


def _flat(out):
    return list(out) if isinstance(out, (tuple, list)) else [out]


@pytest.mark.parametrize("name", VALID)
def test_meta_and_fake_tensors_run_every_valid_call(name):
    want = _flat(call(None, *VALID[name](inputs())))
    got = _flat(call(None, *VALID[name](inputs("meta"))))
    assert [(t.shape, t.dtype) for t in got] == [(t.shape, t.dtype) for t in want]
    assert all(t.device.type == "meta" for t in got)
    n = inputs()
    with FakeTensorMode(allow_non_fake_inputs=False) as mode:
        fake = SimpleNamespace(**{k: _to_fake(mode, v) for k, v in vars(n).items()})
        got = _flat(call(None, *VALID[name](fake)))
    assert [(t.shape, t.dtype) for t in got] == [(t.shape, t.dtype) for t in want]


def _to_fake(mode, v):
    if isinstance(v, torch.Tensor):
        return mode.from_tensor(v)
    if not isinstance(v, tuple):
        return v
    return type(v)(*(mode.from_tensor(t) for t in v))  # a Selection keeps its type (its static total)


@pytest.mark.parametrize("name", VALID)
def test_compiled_fullgraph_equals_eager(name):
    fn, args, kwargs = VALID[name](inputs())
    torch._dynamo.reset()
    got = torch.compile(lambda *a: fn(*a, **kwargs), fullgraph=True, backend="aot_eager")(*args)
    for g, w in zip(_flat(got), _flat(fn(*args, **kwargs))):
        torch.testing.assert_close(g, w, rtol=0, atol=0, equal_nan=True)


# ---- calling, with the inputs-unmodified check -------------------------------------------------

def _tensors(obj):
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, (tuple, list)):
        for o in obj:
            yield from _tensors(o)
    elif isinstance(obj, dict):
        for o in obj.values():
            yield from _tensors(o)


def call(backend, fn, args, kwargs):
    """fn(*args, **kwargs) with `backend` forced (None: automatic); asserts no input tensor changed."""
    tensors = [t for t in _tensors((args, kwargs)) if t.device.type != "meta" and not is_fake(t)]
    before = [t.clone() for t in tensors]
    try:
        with vtattn.use_backend(backend):
            return fn(*args, **kwargs)
    finally:
        for t, b in zip(tensors, before):
            torch.testing.assert_close(t, b, rtol=0, atol=0, equal_nan=True, msg="an input tensor was modified")


def backends(op):
    """(device, backend) pytest params: the CPU backends of op (cpp, torch), and its GPU ones marked gpu."""
    names = _registry.OPS[op]
    params = [pytest.param("cpu", b, id=f"cpu-{b}") for b in ("cpp", "torch") if b in names]
    return params + [pytest.param("cuda", b, id=f"gpu-{b}", marks=pytest.mark.gpu)
                     for b in ("aten", "cuda", "triton", "torch") if b in names]


def run(backend, fn, args, kwargs):
    try:
        return call(backend, fn, args, kwargs)
    except BackendUnavailable as e:
        pytest.skip(str(e))


def expect_reference(backend, fn, args, kwargs, atol=1e-5):
    """The result on `backend` equals the reference's on contiguous copies (NaN where it has NaN)."""
    got = run(backend, fn, args, kwargs)
    dense = lambda o: o.contiguous() if isinstance(o, torch.Tensor) else (  # noqa: E731
        type(o)(*map(dense, o)) if isinstance(o, tuple) and hasattr(o, "_fields") else o)
    want = call("torch", fn, tuple(map(dense, args)), {k: dense(v) for k, v in kwargs.items()})
    for g, w in zip(_flat(got), _flat(want)):
        torch.testing.assert_close(g, w, rtol=atol, atol=atol, equal_nan=True)
    return got


# ---- clear errors naming the argument -------------------------------------------------------------

def _set(t, index, value):
    t = t.clone()
    t[index] = value
    return t


def _sel(n, **fields):
    """n.sel with some fields replaced: a hand-made Selection (total unknown)."""
    return vtattn.Selection(*n.sel._replace(**fields))


def _meta(*ts):
    return tuple(t.to("meta") for t in ts)


VE, TE = ValueError, TypeError

# name (its prefix names the op) -> (call builder(n), exception, message regex)
ERRORS = {
    # attention: ranks, dtypes, devices, GQA, empty head dim, scale
    "attention-q-3d": (lambda n: c(A, n.q[0], n.k, n.v), VE, "q must be 4-D"),
    "attention-q-list": (lambda n: c(A, n.q.tolist(), n.k, n.v), TE, "q must be a torch.Tensor"),
    "attention-int": (lambda n: c(A, n.q.int(), n.k.int(), n.v.int()), TE, "q must have dtype"),
    "attention-mixed-dtype": (lambda n: c(A, n.q, n.k.half(), n.v), TE, "k has dtype"),
    "attention-k-meta": (lambda n: c(A, n.q, n.k.to("meta"), n.v), VE, "k is on meta"),
    "attention-gqa": (lambda n: c(A, n.q[:, :3], n.k, n.v), VE, "multiple of k's 2 heads"),
    "attention-no-kv-heads": (lambda n: c(A, n.q, n.k[:, :0], n.v[:, :0]), VE, "k's 0 heads"),
    "attention-batch": (lambda n: c(A, n.q, n.k[:1], n.v[:1]), VE, "k has batch 1"),
    "attention-head-dim": (lambda n: c(A, n.q, n.k[..., :8], n.v[..., :8]), VE, "k has head dim"),
    "attention-v-shape": (lambda n: c(A, n.q, n.k, n.v[:, :, :4]), VE, "v must have k's shape"),
    "attention-d0": (lambda n: c(A, n.q[..., :0], n.k[..., :0], n.v[..., :0]), VE, "head dim 0"),
    "attention-scale-str": (lambda n: c(A, n.q, n.k, n.v, scale="x"), TE, "scale must be a float"),
    "attention-scale-inf": (lambda n: c(A, n.q, n.k, n.v, scale=INF), VE, "scale must be finite"),
    "attention-scale-nan": (lambda n: c(A, n.q, n.k, n.v, scale=NAN), VE, "scale must be finite"),
    # key_importance: rows in every form, lse, reduce_heads
    "ki-k-3d": (lambda n: c(KI, n.q, n.k[0], rows=0), VE, "k must be 4-D"),
    "ki-rows-str": (lambda n: c(KI, n.q, n.k, rows="first"), VE, "rows must be 'all'"),
    "ki-rows-bool": (lambda n: c(KI, n.q, n.k, rows=True), TE, "rows must be an int"),
    "ki-rows-float": (lambda n: c(KI, n.q, n.k, rows=0.5), TE, "rows must be an int"),
    "ki-rows-range": (lambda n: c(KI, n.q, n.k, rows=5), IndexError, "rows=5 is out of range"),
    "ki-rows-neg-range": (lambda n: c(KI, n.q, n.k, rows=-6), IndexError, "rows=-6"),
    "ki-rows-float-tensor": (lambda n: c(KI, n.q, n.k, rows=n.q.new_zeros(2)), TE,
        "rows must be an integer or bool tensor"),
    "ki-rows-tensor-range": (lambda n: c(KI, n.q, n.k, rows=_set(n.rows, (1, 0), 5)), IndexError,
        "rows has indices out of range"),
    "ki-rows-tensor-huge": (lambda n: c(KI, n.q, n.k, rows=_set(n.rows, (0, 1), 2**32 + 1)), IndexError,
        "rows has indices out of range"),
    "ki-rows-shape": (lambda n: c(KI, n.q, n.k, rows=n.rows[None]), VE, "rows must be \\[R\\]"),
    "ki-rows-batch": (lambda n: c(KI, n.q, n.k, rows=n.rows[:1].expand(3, 2)), VE,
        "rows must be \\[R\\] or \\[B=2, R\\]"),
    "ki-rows-empty": (lambda n: c(KI, n.q, n.k, rows=n.rows[:, :0]), VE, "selects no query"),
    "ki-rows-mask-len": (lambda n: c(KI, n.q, n.k, rows=torch.ones(2, 4, dtype=torch.bool)), VE,
        "rows \\(bool mask\\) must have Nq=5"),
    "ki-rows-mask-none": (lambda n: c(KI, n.q, n.k, rows=torch.zeros(5, dtype=torch.bool)), VE, "selects no query row"),
    "ki-rows-empty-slice": (lambda n: c(KI, n.q, n.k, rows=slice(3, 3)), VE, "selects no query row"),
    "ki-rows-zero-step": (lambda n: c(KI, n.q, n.k, rows=slice(None, None, 0)), VE, "rows=slice\\(None, None, 0\\)"),
    "ki-rows-str-slice": (lambda n: c(KI, n.q, n.k, rows=slice("a", None)), TE, "rows=slice"),
    "ki-rows-meta": (lambda n: c(KI, n.q, n.k, rows=n.rows.to("meta")), VE, "rows is on meta"),
    "ki-lse-shape": (lambda n: c(KI, n.q, n.k, rows=0, lse=n.q.new_zeros(2, 4, 4)), VE, "lse must have shape"),
    "ki-lse-dtype": (lambda n: c(KI, n.q, n.k, rows=0, lse=n.q.new_zeros(2, 4, 5).half()), TE, "lse must have dtype"),
    "ki-lse-meta": (lambda n: c(KI, n.q, n.k, rows=0, lse=torch.zeros(2, 4, 5, device="meta")), VE, "lse is on meta"),
    "ki-lse-inf": (lambda n: c(KI, n.q, n.k, rows="all", lse=n.q.new_full((2, 4, 5), INF)), VE, "lse must be finite"),
    "ki-lse-nan-read": (lambda n: c(KI, n.q, n.k, rows=n.rows, lse=_set(n.q.new_zeros(2, 4, 5), (1, 3, 2), NAN)), VE,
        "lse must be finite .* at lse\\[1, 3, 2\\]"),
    "ki-reduce": (lambda n: c(KI, n.q, n.k, rows=0, reduce_heads="median"), VE, "reduce_heads must be"),
    "ki-scale": (lambda n: c(KI, n.q, n.k, rows=0, scale="x"), TE, "scale must be a float"),
    # select_tokens: scores, keep in every form, segments
    "st-scores-1d": (lambda n: c(STC, n.scores[0], 2), VE, "scores must be 2-D"),
    "st-scores-int": (lambda n: c(STC, n.scores.int(), 2), TE, "scores must have dtype"),
    "st-scores-nan": (lambda n: c(STC, _set(n.scores, (1, 3), NAN), 2), VE, "scores contains NaN"),
    "st-no-tokens": (lambda n: c(ST, n.scores[:, :0], 0.5), VE, "scores has no tokens"),
    "st-keep-0": (lambda n: c(STC, n.scores, 0), VE, "keep_tokens must be an int >= 1"),
    "st-keep-ratio": (lambda n: c(ST, n.scores, 1.5), VE, "keep must be a ratio in \\(0, 1\\]"),
    "st-keep-negative": (lambda n: c(ST, n.scores, -0.5), VE, "keep must be a ratio in \\(0, 1\\]"),
    "st-keep-nan": (lambda n: c(ST, n.scores, NAN), VE, "keep must be a ratio in \\(0, 1\\]"),
    "st-keep-big": (lambda n: c(STC, n.scores, 13), VE, "keep_tokens=13 is more than"),
    "st-keep-str": (lambda n: c(ST, n.scores, "4"), TE, "keep must be a float ratio"),
    "st-keep-bool": (lambda n: c(ST, n.scores, True), TE, "keep must be a float ratio"),
    "st-keep-float-tensor": (lambda n: c(STC, n.scores, n.scores[:, 0]), TE, "keep_tokens must be an integer tensor"),
    "st-keep-tensor-neg": (lambda n: c(STC, n.scores, torch.tensor([-1, 2])), VE, "keep_tokens has negative counts"),
    "st-keep-tensor-big": (lambda n: c(STC, n.scores, torch.tensor([13, 2])), VE, "keep_tokens asks for more tokens"),
    "st-keep-tensor-zero": (lambda n: c(STC, n.scores, torch.tensor([0, 2])), VE, "keep_tokens keeps no token of sample 0"),
    "st-keep-tensor-shape": (lambda n: c(STC, n.scores, torch.tensor([1, 2, 3])), VE, "keep_tokens must have shape"),
    "st-keep-tensor-segments": (lambda n: c(STC, n.scores, torch.tensor([1, 2]), segments=[5, 7]), VE,
        "with 2 segments give \\[B, S\\]"),
    "st-keep-tensor-meta": (lambda n: c(STC, n.scores, torch.tensor([1, 2], device="meta")), VE, "keep_tokens is on meta"),
    "st-keep-tensor-values-meta": (lambda n: c(STC, *_meta(n.scores, torch.tensor([1, 2]))), VE,
        "keep_tokens as a tensor sets the output width"),
    "st-segments-sum": (lambda n: c(STC, n.scores, 2, segments=[5, 5]), VE, "segments sum to 10"),
    "st-segments-empty": (lambda n: c(STC, n.scores, 2, segments=[0, 12]), VE, "segments must be positive"),
    "st-segments-float": (lambda n: c(STC, n.scores, 2, segments=[5.5, 6.5]), TE, "segments must be a list"),
    "st-segments-short": (lambda n: c(STC, n.scores, 6, segments=[5, 7]), VE, "keep_tokens=6 is more than the 5 tokens"),
    # gather_tokens / merge_tokens: x, and a Selection's types, shapes, devices and values
    "gather-x-2d": (lambda n: c(G, n.x[0], n.sel), VE, "x must be 3-D"),
    "gather-x-int": (lambda n: c(G, n.x.int(), n.sel), TE, "x must have dtype"),
    "gather-not-selection": (lambda n: c(G, n.x, n.sel.indices), TE, "selection must be a vtattn.Selection"),
    "gather-x-batch": (lambda n: c(G, n.x[:1], n.sel), VE,
        "selection.indices must be int64 \\[B=1, K\\] to fit x, got shape \\[2, 4\\]"),
    "gather-x-tokens": (lambda n: c(G, n.x[:, :10], n.sel), VE,
        "selection.mask is \\[2, 12\\] but must be \\[2, 10\\]"),
    "gather-indices-batch": (lambda n: c(G, n.x, _sel(n, indices=n.sel.indices[:1])), VE,
        "selection.indices must be int64 \\[B=2, K\\] to fit x, got shape \\[1, 4\\]"),
    "gather-indices-int32": (lambda n: c(G, n.x, _sel(n, indices=n.sel.indices.int())), TE,
        "selection.indices must be torch.int64, got torch.int32"),
    "gather-mask-dtype": (lambda n: c(G, n.x, _sel(n, mask=n.sel.mask.int())), TE, "selection.mask must be torch.bool"),
    "gather-index-99": (lambda n: c(G, n.x, _sel(n, indices=_set(n.sel.indices, (0, 1), 99))), VE,
        "selection.indices\\[0, 1\\] = 99 must be in \\[0, N=12\\)"),
    "gather-index-neg": (lambda n: c(G, n.x, _sel(n, indices=_set(n.sel.indices, (1, 0), -1))), VE,
        "selection.indices\\[1, 0\\] = -1 must be in \\[0, N=12\\)"),
    "gather-index-huge": (lambda n: c(G, n.x, _sel(n, indices=_set(n.sel.indices, (1, 3), 2**32 + 1))), VE,
        "selection.indices\\[1, 3\\] = 4294967297"),
    "gather-index-past-counts": (lambda n: c(G, n.x, _sel(n, counts=n.sel.counts - 1)), VE,
        "selection.indices\\[0, 3\\] = .* must be -1 \\(padding"),
    "gather-counts-big": (lambda n: c(G, n.x, _sel(n, counts=n.sel.counts + 1)), VE,
        "selection.counts must lie in \\[0, K=4\\]"),
    "gather-mask": (lambda n: c(G, n.x, _sel(n, mask=n.sel.mask.roll(1, 1))), VE, "selection.mask\\[0, .*listed"),
    "gather-duplicate": (lambda n: c(G, n.x, _sel(n, indices=_set(n.sel.indices, (0, 1), n.sel.indices[0, 0]))), VE,
        "selection.mask\\[0, "),
    "gather-cu": (lambda n: c(G, n.x, _sel(n, cu_seqlens=n.sel.cu_seqlens + 1), packed=True), VE,
        "selection.cu_seqlens must be \\[0, cumsum\\(counts\\)\\]"),
    "gather-cu-dtype": (lambda n: c(G, n.x, _sel(n, cu_seqlens=n.sel.cu_seqlens.long())), TE,
        "selection.cu_seqlens must be torch.int32"),
    "gather-total": (lambda n: c(G, n.x, _Uniform(*vtattn.select_tokens(n.scores, keep_tokens=torch.tensor([4, 2]))),
                                 packed=True), VE, "selection.total = 8 but the counts sum to 6"),
    "gather-selection-meta": (lambda n: c(G, n.x, vtattn.Selection(*_meta(*n.sel))), VE, "selection is on meta"),
    "gather-packed-meta": (lambda n: c(G, n.x.to("meta"), vtattn.Selection(*_meta(*n.sel)), packed=True), VE,
        "needs the packed length sum\\(counts\\)"),
    "merge-keys-shape": (lambda n: c(M, n.x, n.sel, keys=n.keys[:, :11]), VE, "keys must be \\[B, N, Ck\\]"),
    "merge-keys-int": (lambda n: c(M, n.x, n.sel, keys=n.keys.int()), TE, "keys must have dtype"),
    "merge-keys-meta": (lambda n: c(M, n.x, n.sel, keys=n.keys.to("meta")), VE, "keys is on meta"),
    "merge-mode": (lambda n: c(M, n.x, n.sel, keys=n.keys, mode="max"), VE, "mode must be"),
    "merge-index-99": (lambda n: c(M, n.x, _sel(n, indices=_set(n.sel.indices, (1, 2), 99)), keys=n.keys), VE,
        "selection.indices\\[1, 2\\] = 99"),
    "merge-mask": (lambda n: c(M, n.x, _sel(n, mask=~n.sel.mask), keys=n.keys), VE, "selection.mask\\[0, "),
    # varlen_attention: packed ranks, cu_seqlens values, max_seqlen, meta without max_seqlen_q
    "varlen-q-4d": (lambda n: c(VL, n.tq[None], n.tk, n.tv, n.cu_q, n.cu_k), VE, "q must be 3-D"),
    "varlen-gqa": (lambda n: c(VL, n.tq[:, :3], n.tk, n.tv, n.cu_q, n.cu_k), VE, "multiple of k's 2 heads"),
    "varlen-cu-dtype": (lambda n: c(VL, n.tq, n.tk, n.tv, n.cu_q.long(), n.cu_k), TE, "cu_seqlens_q must have dtype"),
    "varlen-cu-2d": (lambda n: c(VL, n.tq, n.tk, n.tv, n.cu_q[None], n.cu_k), VE, "cu_seqlens_q must be 1-D"),
    "varlen-cu-empty": (lambda n: c(VL, n.tq, n.tk, n.tv, n.cu_q[:0], n.cu_k), VE,
        "cu_seqlens_q must have B \\+ 1 >= 1 entries"),
    "varlen-cu-start": (lambda n: c(VL, n.tq, n.tk, n.tv, _set(n.cu_q, 0, 1), n.cu_k), VE,
        "cu_seqlens_q must start at 0"),
    "varlen-cu-decreasing": (lambda n: c(VL, n.tq, n.tk, n.tv, n.cu_q, _set(n.cu_k, 1, 12)), VE,
        "cu_seqlens_k must start at 0 and be non-decreasing"),
    "varlen-cu-end": (lambda n: c(VL, n.tq, n.tk, n.tv, _set(n.cu_q, 3, 6), n.cu_k), VE,
        "cu_seqlens_q must end at the packed length 7"),
    "varlen-cu-count": (lambda n: c(VL, n.tq, n.tk, n.tv, n.cu_q, n.cu_k[:3]), VE,
        "cu_seqlens_q has 4 entries but cu_seqlens_k has 3"),
    "varlen-cu-meta": (lambda n: c(VL, n.tq, n.tk, n.tv, n.cu_q.to("meta"), n.cu_k), VE, "cu_seqlens_q is on meta"),
    "varlen-max-small": (lambda n: c(VL, n.tq, n.tk, n.tv, n.cu_q, n.cu_k, max_seqlen_q=2), VE,
        "max_seqlen_q=2 is below the longest sequence \\(4\\)"),
    "varlen-maxk-small": (lambda n: c(VL, n.tq, n.tk, n.tv, n.cu_q, n.cu_k, max_seqlen_k=3), VE,
        "max_seqlen_k=3 is below the longest sequence \\(7\\)"),
    "varlen-meta-no-max": (lambda n: c(VL, *_meta(n.tq, n.tk, n.tv, n.cu_q, n.cu_k)), VE, "max_seqlen_q must be given"),
    "varlen-scale": (lambda n: c(VL, n.tq, n.tk, n.tv, n.cu_q, n.cu_k, scale="x"), TE, "scale must be a float"),
    # index_attention: lists, counts, positions
    "index-idx-float": (lambda n: c(IX, n.q, n.k, n.v, n.idx.float()), TE, "kv_indices must have dtype"),
    "index-idx-2d": (lambda n: c(IX, n.q, n.k, n.v, n.idx[0]), VE, "kv_indices must be 3-D"),
    "index-idx-shape": (lambda n: c(IX, n.q, n.k, n.v, n.idx[:, :1]), VE, "kv_indices must be \\[B, Hkv, L\\]"),
    "index-idx-range": (lambda n: c(IX, n.q, n.k, n.v, n.idx, kv_counts=n.cnt.fill_(4)), VE,
        "kv_indices must lie in \\[0, Nk=9\\) within kv_counts"),
    "index-idx-default-counts": (lambda n: c(IX, n.q, n.k, n.v, n.idx), VE, "kv_indices must lie in \\[0, Nk=9\\)"),
    "index-idx-huge": (lambda n: c(IX, n.q, n.k, n.v, _set(n.idx, (1, 1, 0), 2**32 + 1), kv_counts=n.cnt), VE,
        "got 4294967297 at \\(1, 1, 0\\)"),
    "index-cnt-dtype": (lambda n: c(IX, n.q, n.k, n.v, n.idx, kv_counts=n.cnt.long()), TE, "kv_counts must have dtype"),
    "index-cnt-range": (lambda n: c(IX, n.q, n.k, n.v, n.idx, kv_counts=n.cnt + 1), VE,
        "kv_counts must lie in \\[0, L=4\\]"),
    "index-cnt-neg": (lambda n: c(IX, n.q, n.k, n.v, n.idx, kv_counts=n.cnt - 1), VE,
        "kv_counts must lie in \\[0, L=4\\]"),
    "index-cnt-shape": (lambda n: c(IX, n.q, n.k, n.v, n.idx, kv_counts=n.cnt[:1]), VE, "kv_counts must be \\[2, 2\\]"),
    "index-cnt-list": (lambda n: c(IX, n.q, n.k, n.v, n.idx, kv_counts=n.cnt.tolist()), TE,
        "kv_counts must be a torch.Tensor"),
    "index-cnt-meta": (lambda n: c(IX, n.q, n.k, n.v, n.idx, kv_counts=n.cnt.to("meta")), VE, "kv_counts is on meta"),
    "index-qpos-shape": (lambda n: c(IX, n.q, n.k, n.v, n.idx, kv_counts=n.cnt, q_positions=torch.arange(4)), VE,
        "q_positions must be \\[5\\] or \\[2, 5\\]"),
    "index-kvpos-dtype": (lambda n: c(IX, n.q, n.k, n.v, n.idx, kv_counts=n.cnt, kv_positions=torch.ones(9)), TE,
        "kv_positions must have dtype"),
    "index-idx-meta": (lambda n: c(IX, n.q, n.k, n.v, n.idx.to("meta")), VE, "kv_indices is on meta"),
    "index-gqa": (lambda n: c(IX, n.q[:, :3], n.k, n.v, n.idx), VE, "multiple of k's"),
    "index-scale": (lambda n: c(IX, n.q, n.k, n.v, n.idx, kv_counts=n.cnt, scale=INF), VE, "scale must be finite"),
    # decode_attention: dense caches and paged pools
    "decode-q-2-tokens": (lambda n: c(DA, n.q[:, :, :2], n.kc, n.vc, n.lens), VE, "q must be \\[B, Hq, 1, D\\]"),
    "decode-cache-3d": (lambda n: c(DA, n.qd, n.kc[0], n.vc, n.lens), VE, "k_cache must be 4-D"),
    "decode-cache-dtype": (lambda n: c(DA, n.qd, n.kc.half(), n.vc, n.lens), TE, "k_cache has dtype"),
    "decode-v-shape": (lambda n: c(DA, n.qd, n.kc, n.vc[:, :, :5], n.lens), VE, "v_cache must have k_cache's shape"),
    "decode-cache-stride": (lambda n: c(DA, n.qd, n.kc.mT.contiguous().mT, n.vc, n.lens), VE,
        "k_cache needs a unit-stride last dim"),
    "decode-gqa": (lambda n: c(DA, n.qd[:, :3], n.kc, n.vc, n.lens), VE, "multiple of k_cache's 2 heads"),
    "decode-lens-dtype": (lambda n: c(DA, n.qd, n.kc, n.vc, n.lens.long()), TE, "lengths must have dtype"),
    "decode-lens-shape": (lambda n: c(DA, n.qd, n.kc, n.vc, n.lens[:1]), VE, "lengths must be \\[B, Hkv\\]"),
    "decode-lens-big": (lambda n: c(DA, n.qd, n.kc, n.vc, n.lens + 1), VE, "lengths must lie in \\[0, L_cap=10\\]"),
    "decode-lens-neg": (lambda n: c(DA, n.qd, n.kc, n.vc, n.lens - 1), VE, "lengths must lie in \\[0, L_cap=10\\]"),
    "decode-lens-meta": (lambda n: c(DA, n.qd, n.kc, n.vc, n.lens.to("meta")), VE, "lengths is on meta"),
    "paged-pool-4d": (lambda n: c(DA, n.qd, n.pk[None], n.pv, n.plens, block_table=n.table), VE, "k_cache must be 3-D"),
    "paged-page-0": (lambda n: c(DA, n.qd, n.pk[:, :0], n.pv[:, :0], n.plens, block_table=n.table), VE,
        "page_size > 0"),
    "paged-table-dtype": (lambda n: c(DA, n.qd, n.pk, n.pv, n.plens, block_table=n.table.long()), TE,
        "block_table must have dtype"),
    "paged-table-batch": (lambda n: c(DA, n.qd, n.pk, n.pv, n.plens, block_table=n.table[:1]), VE,
        "block_table must be \\[B=2"),
    "paged-table-range": (lambda n: c(DA, n.qd, n.pk, n.pv, n.plens, block_table=_set(n.table, (1, 1, 2), 8)), VE,
        "block_table\\[1, 1, 2\\] = 8 is a used page"),
    "paged-table-unused-used": (lambda n: c(DA, n.qd, n.pk, n.pv, _set(n.plens, (0, 0), 9), block_table=n.table), VE,
        "block_table\\[0, 0, 2\\] = -1 is a used page"),
    "paged-lens-big": (lambda n: c(DA, n.qd, n.pk, n.pv, n.plens + 1, block_table=n.table), VE,
        "lengths must lie in \\[0, max_pages \\* page_size = 12\\]"),
    "paged-table-meta": (lambda n: c(DA, n.qd, n.pk, n.pv, n.plens, block_table=n.table.to("meta")), VE,
        "block_table is on meta"),
    # block_sparse_attention: block lists and block_size
    "bs-num-dtype": (lambda n: c(BS, n.bq, n.bk, n.bv, n.num.long(), n.bidx, block_size=16), TE,
        "kv_num_blocks must have dtype"),
    "bs-idx-dtype": (lambda n: c(BS, n.bq, n.bk, n.bv, n.num, n.bidx.float(), block_size=16), TE,
        "kv_indices must have dtype"),
    "bs-num-heads": (lambda n: c(BS, n.bq, n.bk, n.bv, n.num[:, :3], n.bidx, block_size=16), VE,
        "kv_num_blocks must be \\[B=2 or 1, Hq=4 or 1"),
    "bs-query-blocks": (lambda n: c(BS, n.bq, n.bk, n.bv, n.num, n.bidx, block_size=32), VE,
        "Nq=20 with block_size=32 needs 1"),
    "bs-key-blocks": (lambda n: c(BS, n.bq, n.bk, n.bv, n.num, n.bidx[..., :2], block_size=16), VE, "K_blocks=3"),
    "bs-num-big": (lambda n: c(BS, n.bq, n.bk, n.bv, _set(n.num, (0, 1, 0), 4), n.bidx, block_size=16), VE,
        "kv_num_blocks must lie in \\[0, K_blocks=3\\]"),
    "bs-num-neg": (lambda n: c(BS, n.bq, n.bk, n.bv, _set(n.num, (0, 1, 0), -1), n.bidx, block_size=16), VE,
        "kv_num_blocks must lie in"),
    "bs-idx-range": (lambda n: c(BS, n.bq, n.bk, n.bv, n.num, _set(n.bidx, (0, 0, 1, 1), 3), block_size=16), VE,
        "kv_indices must lie in \\[0, K_blocks=3\\)"),
    "bs-idx-neg": (lambda n: c(BS, n.bq, n.bk, n.bv, n.num, _set(n.bidx, (0, 0, 0, 0), -1), block_size=16), VE,
        "kv_indices must lie in"),
    "bs-repeat": (lambda n: c(BS, n.bq, n.bk, n.bv, _set(n.num, (0, 2, 1), 2), n.bidx, block_size=16), VE,
        "lists a key block twice"),
    "bs-block-size-0": (lambda n: c(BS, n.bq, n.bk, n.bv, n.num, n.bidx, block_size=0), VE,
        "block_size must be a positive int"),
    "bs-block-size-str": (lambda n: c(BS, n.bq, n.bk, n.bv, n.num, n.bidx, block_size="16"), VE,
        "block_size must be a positive int"),
    "bs-block-size-bool": (lambda n: c(BS, n.bq, n.bk, n.bv, n.num, n.bidx, block_size=True), VE,
        "block_size must be a positive int"),
    "bs-num-meta": (lambda n: c(BS, n.bq, n.bk, n.bv, n.num.to("meta"), n.bidx, block_size=16), VE,
        "kv_num_blocks is on meta"),
    "bs-gqa": (lambda n: c(BS, n.bq[:, :3], n.bk, n.bv, n.num, n.bidx, block_size=16), VE, "multiple of k's 2 heads"),
    "bs-scale": (lambda n: c(BS, n.bq, n.bk, n.bv, n.num, n.bidx, block_size=16, scale="x"), TE,
        "scale must be a float"),
}


@pytest.mark.parametrize("backend", ["cpp", "torch"])
@pytest.mark.parametrize("name", ERRORS)
def test_bad_input_raises_naming_the_argument(name, backend):
    build, exc, msg = ERRORS[name]
    op = op_of(name)
    if backend not in _registry.OPS[op]:
        pytest.skip(f"{op} has no {backend} backend")
    with pytest.raises(exc, match=msg):
        call(backend, *build(inputs()))


# ---- odd but valid: equal to the reference on contiguous copies -----------------------------------

def _expand0(t, dim, size):
    """A stride-0 view: t's first slice along dim repeated size times."""
    return t.narrow(dim, 0, 1).expand(*[size if d == dim else -1 for d in range(t.dim())])


def _token_major(t):
    """The same values as a view of [B, N, H, D] storage (as transformers passes them)."""
    return t.transpose(1, 2).contiguous().transpose(1, 2)


# name (its prefix names the op) -> call builder(n)
RESULTS = {
    "attention-mqa": lambda n: c(A, n.q, n.k[:, :1], n.v[:, :1], return_lse=True),
    "attention-no-queries": lambda n: c(A, n.q[:, :, :0], n.k, n.v, return_lse=True),
    "attention-no-keys": lambda n: c(A, n.q, n.k[:, :, :0], n.v[:, :, :0], causal=True, return_lse=True),
    "attention-no-batch": lambda n: c(A, n.q[:0], n.k[:0], n.v[:0], return_lse=True),
    "attention-causal-rows-without-keys": lambda n: c(A, n.bq[:, :, :9], n.k[:, :, :5], n.v[:, :, :5], causal=True,
        return_lse=True),
    "attention-token-major": lambda n: c(A, *map(_token_major, (n.q, n.k, n.v)), causal=True),
    "attention-stride-0": lambda n: c(A, _expand0(n.q, 1, 4), _expand0(n.k, 0, 2), _expand0(n.v, 2, 9),
        return_lse=True),
    "attention-sliced-head-dim": lambda n: c(A, n.q[..., 3:11], n.k[..., 3:11], n.v[..., 3:11]),
    "ki-negative-step-slice": lambda n: c(KI, n.q, n.k, rows=slice(None, None, -2)),
    "ki-rows-duplicates": lambda n: c(KI, n.q, n.k, rows=n.rows, causal=True),
    "ki-rows-list": lambda n: c(KI, n.q, n.k, rows=[-1, 0, 0]),
    "ki-rows-mask": lambda n: c(KI, n.q, n.k, rows=torch.arange(5, device=n.dev) % 2 == 0),
    "ki-lse-no-keys": lambda n: c(KI, n.q, n.k, rows="all",
        lse=_set(A(n.q, n.k, n.v, return_lse=True)[1], (0, 1, 2), -INF)),
    "ki-lse-nan-not-read": lambda n: c(KI, n.q, n.k, rows=0,
        lse=_set(A(n.q, n.k, n.v, return_lse=True)[1], (0, 1, 2), NAN)),
    "ki-no-keys": lambda n: c(KI, n.q, n.k[:, :, :0], rows="all"),
    "ki-stride-0": lambda n: c(KI, n.q, _expand0(n.k, 2, 9), rows="all", reduce_heads="max"),
    "ki-causal-rows-without-keys": lambda n: c(KI, n.bq[:, :, :9], n.k[:, :, :5], rows="all", causal=True),
    "st-inf-scores": lambda n: _select(_set(_set(n.scores, (0, 3), INF), (1, 5), -INF), 3),
    "st-ties": lambda n: _select(n.scores.round(), 3, segments=[4, 8], sort=False),
    "st-signed-zero": lambda n: _select(n.t([[0.0, -0.0, 0.0, -0.0, 1.0]] * 2, torch.float32), 3),
    "st-stride-0": lambda n: _select(_expand0(n.scores, 1, 12), 4),
    "st-transposed": lambda n: _select(n.scores.T.contiguous().T, 0.5),
    "st-keep-all": lambda n: _select(n.scores, 1.0),
    "st-keep-n": lambda n: _select(n.scores, 12),
    "st-tensor-keep": lambda n: _select(n.scores, n.t([[1, 7], [5, 0]]), segments=[5, 7]),
    "st-float64": lambda n: _select(n.scores.double(), 2),
    "st-no-batch": lambda n: _select(n.scores[:0], 2),
    "gather-token-major": lambda n: c(G, n.x.transpose(0, 1).contiguous().transpose(0, 1), n.sel),
    "gather-stride-0": lambda n: c(G, _expand0(n.x, 1, 12), n.sel, packed=True),
    "gather-no-channels": lambda n: c(G, n.x[..., :0], n.sel),
    "gather-uneven-counts": lambda n: c(G, n.x, STC(n.scores, n.t([1, 6])), packed=True),
    "gather-no-batch": lambda n: c(G, n.x[:0], STC(n.scores[:0], 2), packed=True),
    "merge-equal-keys": lambda n: c(M, n.x, n.sel, keys=_expand0(n.keys, 1, 12)),
    "merge-zero-keys": lambda n: c(M, n.x, n.sel, keys=torch.zeros_like(n.keys), mode="weighted"),
    "merge-keep-all": lambda n: c(M, n.x, ST(n.scores, 1.0), keys=n.keys),
    "merge-uneven-counts": lambda n: c(M, n.x, STC(n.scores, n.t([1, 6])), keys=n.keys, mode="weighted"),
    "merge-no-batch": lambda n: c(M, n.x[:0], STC(n.scores[:0], 2), keys=n.keys[:0]),
    "merge-strided": lambda n: c(M, n.x[..., ::2], n.sel, keys=n.keys.mT.contiguous().mT),
    "varlen-empty-sequences": lambda n: c(VL, n.tq, n.tk, n.tv, n.cu_q, n.cu_k, causal=True, return_lse=True),
    "varlen-mqa-strided": lambda n: c(VL, n.tq.transpose(0, 1).contiguous().transpose(0, 1), n.tk[:, :1], n.tv[:, 1:],
        n.cu_q, n.cu_k),
    "varlen-stride-0": lambda n: c(VL, _expand0(n.tq, 0, 7), n.tk, _expand0(n.tv, 1, 2), n.cu_q, n.cu_k,
        max_seqlen_q=7, max_seqlen_k=11),
    "varlen-nothing": lambda n: c(VL, n.tq[:0], n.tk[:0], n.tv[:0], n.cu_q[:1] * 0, n.cu_k[:1] * 0, return_lse=True),
    "index-garbage-past-counts": lambda n: c(IX, n.q, n.k, n.v, n.idx, kv_counts=n.cnt),
    "index-int32-causal": lambda n: c(IX, n.q, n.k, n.v, n.idx.int(), kv_counts=n.cnt, causal=True,
        kv_positions=torch.arange(9, device=n.dev).flip(0), q_positions=n.t([[0, 3, 5, 8, 2]] * 2)),
    "index-no-queries": lambda n: c(IX, n.q[:, :, :0], n.k, n.v, n.idx, kv_counts=n.cnt),
    "index-empty-lists": lambda n: c(IX, n.q, n.k, n.v, n.idx[..., :0]),
    "index-stride-0": lambda n: c(IX, _expand0(n.q, 2, 5), _expand0(n.k, 2, 9), _token_major(n.v), n.idx,
        kv_counts=n.cnt),
    "decode-lengths-0-and-cap": lambda n: c(DA, n.qd, n.kc, n.vc, n.lens),
    "decode-token-major-mqa": lambda n: c(DA, n.qd, _token_major(n.kc)[:, :1], _token_major(n.vc)[:, 1:],
        n.lens[:, :1]),
    "decode-stride-0": lambda n: c(DA, _expand0(n.qd, 1, 4), _expand0(n.kc, 2, 10), n.vc, n.lens),
    "decode-no-batch": lambda n: c(DA, n.qd[:0], n.kc[:0], n.vc[:0], n.lens[:0]),
    "decode-no-capacity": lambda n: c(DA, n.qd, n.kc[:, :, :0], n.vc[:, :, :0], n.lens * 0),
    "paged-unused-entries": lambda n: c(DA, n.qd, n.pk, n.pv, n.plens, block_table=n.table),
    "paged-no-batch": lambda n: c(DA, n.qd[:0], n.pk, n.pv, n.plens[:0], block_table=n.table[:0]),
    "paged-strided-pools": lambda n: c(DA, n.qd, torch.cat([n.pk, n.pk], 1)[:, ::2],
        n.pv.transpose(0, 1).contiguous().transpose(0, 1), n.plens, block_table=n.table),
    "bs-shared-lists": lambda n: c(BS, n.bq, n.bk, n.bv, n.num, n.bidx, block_size=16, return_lse=True),
    "bs-per-batch-lists": lambda n: c(BS, n.bq, n.bk, n.bv, n.num.expand(2, 4, 2).contiguous(),
        n.bidx.expand(2, 4, 2, 3), block_size=16, causal=True, return_lse=True),
    "bs-causal-rows-without-keys": lambda n: c(BS, n.bq, n.bk[:, :, :17], n.bv[:, :, :17], n.num.clamp(max=2),
        n.bidx[..., :2].clamp(max=1), block_size=16, causal=True, return_lse=True),
    "bs-no-queries": lambda n: c(BS, n.bq[:, :, :0], n.bk, n.bv, n.num[..., :0], n.bidx[:, :, :0], block_size=16,
        return_lse=True),
    "bs-no-lists": lambda n: c(BS, n.bq, n.bk, n.bv, n.num[:, :1] * 0, n.bidx[:, :1], block_size=16, return_lse=True),
    "bs-stride-0": lambda n: c(BS, _token_major(n.bq), _expand0(n.bk, 2, 40), n.bv, n.num[:, :1], n.bidx[:, :1],
        block_size=16),
}


@pytest.mark.parametrize("name,device,backend", [
    pytest.param(name, *p.values, id=f"{name}-{p.id}", marks=p.marks) for name in RESULTS
    for p in backends(op_of(name))])
def test_odd_valid_input_equals_the_reference(name, device, backend):
    expect_reference(backend, *RESULTS[name](inputs(device)))


def test_rows_slices_of_any_step_select_those_rows():
    n = inputs()
    for sliced, listed in ((slice(None, None, -2), [0, 2, 4]), (slice(-1, 0, -3), [4, 1]), (slice(1, 99), [1, 2, 3, 4])):
        torch.testing.assert_close(KI(n.q, n.k, rows=sliced), KI(n.q, n.k, rows=listed), rtol=1e-6, atol=1e-6)


# ---- NaN (docs/internals.md): NaN in what a row reads -> NaN in that row; nothing unread leaks -----

def _rows_nan(out, row_dims):
    """Which rows of out hold NaN (any element past the first row_dims dims)."""
    return out.isnan().flatten(row_dims).any(-1) if out.dim() > row_dims else out.isnan()


def _mask(shape, *where):
    m = torch.zeros(shape, dtype=torch.bool)
    for w in where:
        m[w] = True
    return m


def _poke(t, index, value=NAN):
    t[index] = value
    return t


@pytest.mark.parametrize("device,backend", backends("attention"))
def test_attention_nan_reaches_only_the_rows_that_read_it(device, backend):
    n = inputs(device)
    out, lse = expect_reference(backend, A, (_poke(n.q.clone(), (0, 1, 2, 3)), n.k, n.v), dict(return_lse=True))
    assert torch.equal(_rows_nan(out, 3).cpu(), _mask((2, 4, 5), (0, 1, 2))) and torch.equal(
        lse.isnan().cpu(), _mask((2, 4, 5), (0, 1, 2)))
    out, lse = expect_reference(backend, A, (n.q, _poke(n.k.clone(), (1, 0, 4, 0)), n.v), dict(return_lse=True))
    assert torch.equal(_rows_nan(out, 3).cpu(), _mask((2, 4, 5), (1, slice(0, 2))))
    out = expect_reference(backend, A, (n.q, n.k, _poke(n.v.clone(), (1, 1, 7, 2))), {})
    assert torch.equal(out.isnan().cpu(), _mask((2, 4, 5, 16), (1, slice(2, 4), slice(None), 2)))
    # causal: key 8 is seen by the last row only (earlier rows: unspecified, they share its tile)
    out = run(backend, A, (n.q, _poke(n.k.clone(), (0, 0, 8, 5)), n.v), dict(causal=True))
    assert out[0, :2, 4].isnan().all() and out[1].isfinite().all() and out[0, 2:].isfinite().all()
    # rows that see no key: 0 and -inf whatever their query holds
    q = _poke(n.bq[:, :, :9].clone(), (0, 0, slice(0, 4), 0))
    out, lse = expect_reference(backend, A, (q, n.k[:, :, :5], n.v[:, :, :5]), dict(causal=True, return_lse=True))
    assert (out[:, :, :4] == 0).all() and (lse[:, :, :4] == -INF).all() and out.isfinite().all()
    # an inf logit: its row's output NaN, its LSE +inf or NaN; other rows untouched
    out, lse = run(backend, A, (_poke(n.q.clone(), (1, 3, 2, 1), INF), n.k, n.v), dict(return_lse=True))
    assert torch.equal(_rows_nan(out, 3).cpu(), _mask((2, 4, 5), (1, 3, 2))) and not lse[1, 3, 2].isfinite()
    assert lse.isfinite().sum() == lse.numel() - 1


@pytest.mark.parametrize("device,backend", backends("key_importance"))
def test_key_importance_nan_reaches_only_the_heads_of_selected_rows(device, backend):
    n = inputs(device)
    q = _poke(n.q.clone(), (0, 1, 2, 3))
    got = expect_reference(backend, KI, (q, n.k), dict(rows=0))
    assert got.isfinite().all()  # row 2 is not read
    got = expect_reference(backend, KI, (q, n.k), dict(rows="all", causal=True))  # row 2 sees keys 0..6
    assert torch.equal(got.isnan().cpu(), _mask((2, 4, 9), (0, 1, slice(0, 7))))
    got = expect_reference(backend, KI, (q, n.k), dict(rows=slice(2, 3), causal=True))
    assert torch.equal(got.isnan().cpu(), _mask((2, 4, 9), (0, 1, slice(0, 7))))
    got = expect_reference(backend, KI, (n.q, _poke(n.k.clone(), (1, 0, 4, 0))), dict(rows=[1, 3]))
    assert torch.equal(got.isnan().all(-1).cpu(), _mask((2, 4), (1, slice(0, 2)))) and got[0].isfinite().all()


@pytest.mark.parametrize("device,backend", backends("decode_attention"))
def test_decode_attention_reads_nothing_past_the_lengths(device, backend):
    n = inputs(device)  # lengths [[10, 3], [0, 7]] of 10
    k, v = n.kc.clone(), n.vc.clone()
    for t in (k, v):
        t[0, 1, 3:], t[1, 0] = NAN, NAN
    q = _poke(n.qd.clone(), (1, 1, 0, 0))  # a head of length 0
    out = expect_reference(backend, DA, (q, k, v, n.lens), {})
    assert out.isfinite().all() and (out[1, :2] == 0).all()
    out = expect_reference(backend, DA, (_poke(n.qd.clone(), (0, 3, 0, 9)), _poke(k, (1, 1, 6, 0)), v, n.lens), {})
    assert torch.equal(_rows_nan(out, 2).cpu(), _mask((2, 4), (0, 3), (1, slice(2, 4))))


@pytest.mark.parametrize("device,backend", backends("paged_decode_attention"))
def test_paged_decode_attention_reads_only_used_pages_up_to_the_lengths(device, backend):
    n = inputs(device)  # head (0, 0): pages 5, 0 (tokens 0-1); (0, 1): 7, 7, 2; (1, 0): none; (1, 1): 1, 3, 6 (token 0)
    k, v = n.pk.clone(), n.pv.clone()
    for t in (k, v):
        t[4], t[0, 2:], t[6, 1:] = NAN, NAN, NAN
    out = expect_reference(backend, DA, (n.qd, k, v, n.plens), dict(block_table=n.table))
    assert out.isfinite().all() and (out[1, :2] == 0).all()
    out = expect_reference(backend, DA, (n.qd, _poke(k, (7, 1, 3)), v, n.plens), dict(block_table=n.table))
    assert torch.equal(_rows_nan(out, 2).cpu(), _mask((2, 4), (0, slice(2, 4))))


@pytest.mark.parametrize("device,backend", backends("index_attention"))
def test_index_attention_reads_only_listed_keys(device, backend):
    n = inputs(device)  # listed: (0, 0) {8, 0, 3}; (0, 1) {5, 1}; (1, 0) none; (1, 1) {7, 6, 4}
    listed = _mask((2, 2, 9), (0, 0, [0, 3, 8]), (0, 1, [1, 5]), (1, 1, [4, 6, 7])).to(device)
    k, v = n.k.masked_fill(~listed[..., None], NAN), n.v.masked_fill(~listed[..., None], NAN)
    q = _poke(n.q.clone(), (1, 0, 3, 0))  # a head without keys
    out = expect_reference(backend, IX, (q, k, v, n.idx), dict(kv_counts=n.cnt, causal=True))
    assert out.isfinite().all() and (out[1, :2] == 0).all()
    out = expect_reference(backend, IX, (_poke(n.q.clone(), (1, 3, 2, 0)), _poke(k, (0, 1, 5, 0)), v, n.idx),
                           dict(kv_counts=n.cnt))
    assert torch.equal(_rows_nan(out, 3).cpu(), _mask((2, 4, 5), (0, slice(2, 4)), (1, 3, 2)))


@pytest.mark.parametrize("device,backend", backends("block_sparse_attention"))
def test_block_sparse_attention_reads_only_listed_blocks(device, backend):
    n = inputs(device)  # kv head 1: key block 2 is listed for (head 3, query block 1) only, block 0 for query block 0
    k, v = n.bk.clone(), n.bv.clone()
    k[:, 1, 32:], v[:, 1, :16] = NAN, NAN
    q = _poke(_poke(n.bq.clone(), (0, 1, 3, 0)), (1, 1, 17, 0))  # head 1, query block 0 lists nothing
    out, lse = expect_reference(backend, BS, (q, k, v, n.num, n.bidx), dict(block_size=16, return_lse=True))
    want = _mask((2, 4, 20), (slice(None), 3, slice(16, 20)), (slice(None), slice(2, 4), slice(0, 16)), (1, 1, 17))
    assert torch.equal(_rows_nan(out, 3).cpu(), want) and torch.equal(lse.isnan().cpu(), want & ~_mask(
        (2, 4, 20), (slice(None), slice(2, 4), slice(0, 16))))  # NaN values leave the LSE alone
    assert (out[0, 1, 3] == 0).all() and lse[0, 1, 3] == -INF


@pytest.mark.parametrize("device,backend", backends("varlen_attention"))
def test_varlen_attention_nan_stays_in_its_sequence(device, backend):
    n = inputs(device)  # sequences: q rows [0, 3) x keys [0, 4); no queries x [4, 11); q rows [3, 7) x no keys
    q = _poke(_poke(n.tq.clone(), (1, 2, 0)), (5, 0, 0))
    k = _poke(_poke(n.tk.clone(), slice(4, 11)), (2, 1, 0))
    out, lse = expect_reference(backend, VL, (q, k, n.tv, n.cu_q, n.cu_k), dict(return_lse=True))
    assert torch.equal(_rows_nan(out, 2).cpu(), _mask((7, 4), (slice(0, 3), slice(2, 4)), (1, 2)))
    assert (out[3:] == 0).all() and (lse[:, 3:] == -INF).all()


@pytest.mark.parametrize("device,backend", backends("gather_tokens"))
def test_gather_tokens_nan_travels_with_its_row(device, backend):
    n = inputs(device)
    kept, pruned = n.sel.indices[0, 2], (~n.sel.mask[0]).nonzero()[0, 0]
    x = _poke(_poke(n.x.clone(), (0, kept, 1)), (0, pruned))
    out = expect_reference(backend, G, (x, n.sel), {})
    assert torch.equal(_rows_nan(out, 2).cpu(), _mask((2, 4), (0, 2)))
    out, _ = expect_reference(backend, G, (x, n.sel), dict(packed=True))
    assert torch.equal(_rows_nan(out, 1).cpu(), _mask(8, 2))


@pytest.mark.parametrize("mode", ["mean", "weighted"])
@pytest.mark.parametrize("device,backend", backends("merge_tokens"))
def test_merge_tokens_nan_reaches_only_its_slot(device, backend, mode):
    n = inputs(device)
    sel, keys, x = n.sel, n.keys, n.x  # sorted indices: slot 0 holds the lowest kept index
    pruned = (~sel.mask).nonzero()
    # NaN in a pruned token's x: exactly the slot it joins
    out = expect_reference(backend, M, (_poke(x.clone(), tuple(pruned[3])), sel), dict(keys=keys, mode=mode))
    assert _rows_nan(out, 2).sum() == 1 and _rows_nan(out, 2)[pruned[3, 0]].any()
    # inf in a kept token's x: its own slot only
    x_inf = _poke(x.clone(), (1, sel.indices[1, 1], 0), INF)
    out = expect_reference(backend, M, (x_inf, sel), dict(keys=keys, mode=mode))
    assert torch.equal(out.isfinite().all(-1).cpu(), ~_mask((2, 4), (1, 1)))
    # a NaN / inf key on a kept token attracts nothing and moves nobody else
    for slot, value in ((0, NAN), (1, INF)):
        bad = _poke(keys.clone(), (0, sel.indices[0, slot], 2), value)
        out = expect_reference(backend, M, (x, sel), dict(keys=bad, mode=mode))
        assert out.isfinite().all() and torch.equal(out[0, slot], x[0, sel.indices[0, slot]])
    # a NaN key on a pruned token: it joins the lowest kept index, with weight NaN when weighted
    out = expect_reference(backend, M, (x, sel), dict(keys=_poke(keys.clone(), tuple(pruned[3])), mode=mode))
    want = _mask((2, 4), (pruned[3, 0], 0)) if mode == "weighted" else _mask((2, 4))
    assert torch.equal(_rows_nan(out, 2).cpu(), want)
