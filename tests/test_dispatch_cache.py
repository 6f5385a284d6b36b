"""The cached backend choice of `_dispatch.run`: one supports() pass per (op, forced backend, shape
class), sizes that grow while decoding share an entry, and use_backend / VTATTN_BACKEND switch it."""
import pytest
import torch

import vtattn
from vtattn import _dispatch, _registry
from vtattn._dispatch import Backend


def _backends(asked):
    """Two backends that record every supports() call; "cpp" refuses fp16."""
    def cpp(x, n):
        asked.append("cpp")
        return "no fp16" if x.dtype == torch.float16 else None

    def torch_(x, n):
        asked.append("torch")
        return None

    return {"cpp": Backend(cpp, lambda x, n: "cpp"), "torch": Backend(torch_, lambda x, n: "torch")}


def test_choice_is_cached_per_shape_class():
    asked = []
    backends = _backends(asked)
    x = torch.zeros(2, 3)
    assert _dispatch.run("test_op_a", backends, x, 1) == "cpp"
    assert _dispatch.run("test_op_a", backends, x, 1) == "cpp"
    assert asked == ["cpp"]  # the second call asked nobody
    assert _dispatch.run("test_op_a", backends, x.half(), 1) == "torch"  # another dtype: another class
    assert _dispatch.run("test_op_a", backends, x, 2) == "cpp"  # another scalar argument
    assert _dispatch.run("test_op_a", backends, torch.zeros(2, 4), 1) == "cpp"  # another size
    assert asked == ["cpp", "cpp", "torch", "cpp", "cpp"]
    grow = lambda args: _dispatch.signature(args, {0: (1,)})  # noqa: E731  (dim 1 grows)
    for n in range(3, 9):
        assert _dispatch.run("test_op_b", backends, torch.zeros(2, n), 1, shape_class=grow) == "cpp"
    assert asked[5:] == ["cpp"]  # one pass for every length
    assert _dispatch.run("test_op_b", backends, torch.zeros(2, 0), 1, shape_class=grow) == "cpp"
    assert asked[6:] == ["cpp"]  # an empty length is its own class


def test_forced_backend_switches_the_cached_choice(monkeypatch):
    asked = []
    backends = _backends(asked)
    x = torch.zeros(2, 3)
    assert _dispatch.run("test_op_c", backends, x, 1) == "cpp"
    with vtattn.use_backend("torch"):
        assert _dispatch.run("test_op_c", backends, x, 1) == "torch"
    assert _dispatch.run("test_op_c", backends, x, 1) == "cpp"
    monkeypatch.setenv("VTATTN_BACKEND", "torch")
    previous = _dispatch._forced  # the conftest's use_backend(None) overrides the variable: lift it
    try:
        _dispatch._forced = None
        assert _dispatch.run("test_op_c", backends, x, 1) == "torch"
        monkeypatch.setenv("VTATTN_BACKEND", "cpp")
        assert _dispatch.run("test_op_c", backends, x, 1) == "cpp"
        with pytest.raises(vtattn.BackendUnavailable, match="no fp16"):
            _dispatch.run("test_op_c", backends, x.half(), 1)  # a forced backend that refuses still raises
    finally:
        _dispatch._forced = previous


def test_registered_ops_keep_their_answers_with_the_cache():
    """The decode ops reuse one entry while the cache grows, and `vtattn info` still explains."""
    q = torch.randn(1, 4, 1, 8)
    lengths = torch.full((1, 2), 3, dtype=torch.int32)
    _dispatch.clear_cache()
    for cap in (4, 9, 17):
        k = torch.randn(1, 2, cap, 8)
        out = torch.ops.vtattn.decode_attention(q, k, k, lengths, 0.5)
        torch.testing.assert_close(out, vtattn.reference.decode_attention(q, k, k, lengths, 0.5))
    assert list(_dispatch._chosen.values()) == ["cpp"]  # one entry for the three capacities
    info = vtattn.info()["backends"]
    assert info["decode_attention[cpu,float32]"]["chosen"] == "cpp"
    assert set(_registry.OPS) <= {name.split("[")[0] for name in info}


def test_direct_runs_the_chosen_kernel_and_follows_forced_backends(monkeypatch):
    """_dispatch.Direct (internal callers' entry): the backend the op would choose, chosen again when
    use_backend, the caller's stamp or clear_cache changes; the registered op under grad."""
    q = torch.randn(1, 4, 1, 8)
    k = torch.randn(1, 2, 5, 8)
    lengths = torch.full((1, 2), 3, dtype=torch.int32)
    expected = vtattn.reference.decode_attention(q, k, k, lengths, 0.5)
    direct = _dispatch.Direct("decode_attention")
    backends = _registry.OPS["decode_attention"]
    backend = backends[_dispatch.choose("decode_attention", backends, (q, k, k, lengths, 0.5))]
    # a kernel backend's vtattn._C op itself, else the backend's run
    chosen = getattr(torch.ops.vtattn_C, backend.kernel) if backend.kernel else backend.run
    torch.testing.assert_close(direct(q, k, k, lengths, 0.5, stamp=1), expected)
    assert direct._run is chosen
    with vtattn.use_backend("torch"):
        torch.testing.assert_close(direct(q, k, k, lengths, 0.5, stamp=1), expected)
        assert direct._run is backends["torch"].run
    direct(q, k, k, lengths, 0.5, stamp=1)
    assert direct._run is chosen
    run = direct._run
    direct._run = None  # a new stamp, or clear_cache(), chooses again
    direct(q, k, k, lengths, 0.5, stamp=2)
    assert direct._run is run
    direct._run = None
    _dispatch.clear_cache()
    direct(q, k, k, lengths, 0.5, stamp=2)
    assert direct._run is run
    calls = []
    real = _dispatch.choose
    monkeypatch.setattr(_dispatch, "choose", lambda *a: calls.append(a[2][0].dtype) or real(*a))
    direct(q, k, k, lengths, 0.5, stamp=2)
    assert calls == []  # the same arguments' class: the cached choice
    direct(q.bfloat16(), k.bfloat16(), k.bfloat16(), lengths, 0.5, stamp=2)  # another dtype (device, head dim) chooses
    q16 = torch.randn(1, 4, 1, 16)
    direct(q16, torch.randn(1, 2, 5, 16), torch.randn(1, 2, 5, 16), lengths, 0.5, stamp=2)
    assert calls == [torch.bfloat16, torch.float32]
    with pytest.raises(RuntimeError, match="grad"):  # the registered op's autograd refuses by name
        direct(q.requires_grad_(), k, k, lengths, 0.5, stamp=2)


def test_direct_keeps_its_choice_while_index_lists_grow(monkeypatch):
    """A pruned layer's decode steps: the index lists [B, Hkv, L] and positions [B, Nk] grow by one
    every step; the choice stays (choosing costs more than the kernel). Their head count still counts."""
    direct = _dispatch.Direct("index_attention")
    calls = []
    real = _dispatch.choose
    monkeypatch.setattr(_dispatch, "choose", lambda *a: calls.append(a[2][3].shape) or real(*a))
    q = torch.randn(1, 4, 1, 8)
    for n in (5, 6, 7):
        k = torch.randn(1, 2, n, 8)
        indices = torch.arange(n).expand(1, 2, n).contiguous()
        counts = torch.full((1, 2), n, dtype=torch.int32)
        positions = torch.arange(n)[None]
        out = direct(q, k, k, indices, counts, positions[:, -1:], positions, True, 0.5)
        torch.testing.assert_close(out, vtattn.reference.index_attention(q, k, k, indices, counts, positions[:, -1:],
                                                                          positions, True, 0.5))
    assert len(calls) == 1
    k = torch.randn(1, 4, 7, 8)  # another kv head count: chosen again
    direct(q, k, k, torch.arange(7).expand(1, 4, 7).contiguous(), torch.full((1, 4), 7, dtype=torch.int32),
           positions[:, -1:], positions, True, 0.5)
    assert len(calls) == 2


def test_a_direct_by_stamp_chooses_again_only_for_a_new_stamp(monkeypatch):
    """Direct(by_stamp=True): the caller's stamp alone keys the choice (a cache's own state: no key
    built from the arguments each call); a new stamp, use_backend or clear_cache chooses again."""
    direct = _dispatch.Direct("decode_attention", by_stamp=True)
    calls = []
    real = _dispatch.choose
    monkeypatch.setattr(_dispatch, "choose", lambda *a: calls.append(a[2][0].dtype) or real(*a))
    q, k = torch.randn(1, 4, 1, 8), torch.randn(1, 2, 5, 8)
    lengths = torch.full((1, 2), 3, dtype=torch.int32)
    expected = vtattn.reference.decode_attention(q, k, k, lengths, 0.5)
    for _ in range(3):
        torch.testing.assert_close(direct(q, k, k, lengths, 0.5, stamp="a"), expected)
    assert calls == [torch.float32]
    direct(q.bfloat16(), k.bfloat16(), k.bfloat16(), lengths, 0.5, stamp="b")  # the caller's new stamp
    assert calls == [torch.float32, torch.bfloat16]
    with vtattn.use_backend("torch"):
        direct(q, k, k, lengths, 0.5, stamp="b")
    assert direct._run is _registry.OPS["decode_attention"]["torch"].run


def test_direct_chooses_again_where_a_causal_call_stops_being_square():
    """Keys grow while decoding, but attention's aten backend (SDPA's top-left causal mask) is exact
    only for Nq == Nk or one row: a causal call of 2 rows over more keys must leave it (end-aligned,
    vtattn's rule), and a handle that chose aten on a square prefill must notice."""
    direct = _dispatch.Direct("attention")
    for nq, nk, backend in ((9, 9, "aten"), (1, 12, "aten"), (2, 12, "cpp"), (3, 3, "aten")):
        q, k, v = (torch.randn(1, 2, n, 8) for n in (nq, nk, nk))
        out, lse = direct(q, k, v, True, 0.4, 0.0, -1, None)
        ref_out, ref_lse = vtattn.reference.attention(q, k, v, True, 0.4, 0.0, -1, None)
        torch.testing.assert_close(out, ref_out)
        torch.testing.assert_close(lse, ref_lse)
        assert direct._run is _registry.OPS["attention"][backend].run, (nq, nk)
