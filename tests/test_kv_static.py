"""The static CompressedCache (max_new_tokens=): fixed capacity per (batch, kv head), device-side
lengths, appends and decode reads with no host sync, a decode step that torch.compile traces whole
(and a CUDA graph replays), bytes bounded by the kept tokens plus max_new_tokens plus a page per
head; the dynamic cache's decode steps (growth and DecodeH2O's evictions included) without host
syncs, and its bytes at small sizes."""
import pytest
import torch

from vtattn import kv
from vtattn.patch import core
from syncs import count_syncs

pytest.importorskip("transformers")
from vtattn.kv.cache import CompressedCache  # noqa: E402  (needs transformers)

B, HQ, HKV, L, D = 2, 4, 2, 37, 16
POLICIES = [None, kv.SnapKV(0.3, window=4), kv.AdaKV(kv.SnapKV(0.4, window=4)),
            kv.H2O(budget_tokens=7, recent_tokens=2)]
H2O_EVERY_3 = kv.DecodeH2O(kv.SnapKV(0.3, window=4), every=3, recent=2)


def _prompt(seed=0, device="cpu", dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, h, L, D, generator=g).to(device, dtype) for h in (HQ, HKV, HKV)]


def _prefilled(policy, device="cpu", dtype=torch.float32, mask=None, **options):
    q, k, v = _prompt(device=device, dtype=dtype)
    cache = CompressedCache(policy, **options)
    key, _ = cache.update(k, v, 0)
    core.claim(key)
    cache.layers[0].attend(q, k, v, mask, D ** -0.5)
    return cache


def _token(step, n=1, device="cpu", dtype=torch.float32):
    g = torch.Generator().manual_seed(100 + step)
    return [torch.randn(B, h, n, D, generator=g).to(device, dtype) for h in (HQ, HKV, HKV)]


def _step(cache, q, k, v):
    """One decode step of layer 0 as vtattn's attention runs it: update, claim, attend."""
    layer = cache.layers[0]
    key, _ = layer.update(k, v)
    assert core.claim(key) is layer
    return layer.attend(q, None, None, None, D ** -0.5)


def _padding_mask():
    valid = torch.ones(B, L, dtype=torch.bool)
    valid[1, :5] = False
    return (torch.ones(L, L, dtype=torch.bool).tril() & valid[:, None, :])[:, None]


@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.parametrize("policy", POLICIES)
def test_static_decodes_as_the_dynamic_cache_within_its_bound(policy, padded):
    mask = _padding_mask() if padded else None
    static = _prefilled(policy, mask=mask, page_size=8, max_new_tokens=9)
    dynamic = _prefilled(policy, mask=mask, page_size=8)
    kept = (static.kept_positions(0) >= 0).sum(-1)
    assert torch.equal(static.kept_positions(0), dynamic.kept_positions(0))
    for step in range(9):
        n = 2 if step == 4 else 1  # a two-token step reads by index with causality among the new tokens
        q, k, v = _token(step, n)
        torch.testing.assert_close(_step(static, q, k, v), _step(dynamic, q, k, v), atol=1e-6, rtol=1e-6)
        if step == 7:
            break  # 9 tokens appended: the static cache is full
    assert torch.equal(static.kept_positions(0), dynamic.kept_positions(0))
    assert int(static.get_seq_length()) == dynamic.get_seq_length() == L + 9
    # bytes: each head's kept tokens + max_new_tokens, rounded up to a page (< one page more)
    per_token = 2 * D * 4
    assert static.kv_bytes() == int(((kept + 9 + 7) // 8 * 8).sum()) * per_token
    assert static.kv_bytes() < int((kept + 9 + 8).sum()) * per_token
    for step in range(static.layers[0].pages.room):  # what the page rounding left
        _step(static, *_token(50 + step))
    with pytest.raises(RuntimeError, match="room for 0 more tokens"):
        _step(static, *_token(99))


@pytest.mark.parametrize("policy", POLICIES[:2] + [H2O_EVERY_3])
@pytest.mark.parametrize("static", [False, True])
def test_decode_steps_issue_no_host_sync(policy, static):
    """Every decode step after the prefill: the dynamic cache's growth (room 1 grows at once) and
    DecodeH2O's evictions included (a static one's: one token per step)."""
    cache = _prefilled(policy, page_size=4, **(dict(max_new_tokens=12) if static else dict(room=1)))
    for step in range(10):
        q, k, v = _token(step, 2 if step == 5 and not (static and policy is H2O_EVERY_3) else 1)
        with count_syncs() as syncs:
            _step(cache, q, k, v)
        assert not syncs, f"step {step}:\n{syncs.report()}"


@pytest.mark.parametrize("policy", [POLICIES[1], H2O_EVERY_3], ids=["snapkv", "decode-h2o"])
def test_static_decode_step_compiles_to_one_graph(policy):
    """torch.compile(fullgraph=True) of a decode step on CPU inductor: one graph for every step (no
    host state in it; DecodeH2O's evicting steps too), the same outputs as the eager dynamic cache."""
    import torch._dynamo.utils as dynamo_utils
    torch._dynamo.reset()
    static = _prefilled(policy, page_size=8, max_new_tokens=8)
    dynamic = _prefilled(policy, page_size=8)
    compiled = torch.compile(lambda q, k, v: _step(static, q, k, v), fullgraph=True)
    dynamo_utils.counters.clear()
    for step in range(7):  # (DecodeH2O: two evictions)
        q, k, v = _token(step)
        torch.testing.assert_close(compiled(q, k, v), _step(dynamic, q, k, v), atol=1e-5, rtol=1e-5)
    assert dynamo_utils.counters["stats"]["unique_graphs"] == 1
    assert int(static.get_seq_length()) == L + 7
    assert torch.equal(static.kept_positions(0), dynamic.kept_positions(0))


def test_compiled_static_decode_h2o_step_calls_the_kernels_prepared_at_the_prefill():
    """On the CPU a compiled step of a static DecodeH2O layer is two vtattn._C ops (the write and read,
    then the scoring and eviction: `Direct.prepare`), not the eviction's ~70 PyTorch ops; and as many
    host-side ops as a step without eviction."""
    from vtattn import _ext
    if _ext.load() is not None:
        pytest.skip("vtattn._C is not built")
    graphs = []

    def record(gm, inputs):
        graphs.append([n.target for n in gm.graph.nodes if n.op == "call_function"])
        return gm.forward

    torch._dynamo.reset()
    static = _prefilled(H2O_EVERY_3, page_size=8, max_new_tokens=8)
    compiled = torch.compile(lambda q, k, v: _step(static, q, k, v), fullgraph=True, backend=record)
    for step in range(4):  # (an eviction at the third)
        compiled(*_token(step))
    assert len(graphs) == 1
    ops = {str(t) for t in graphs[0]}
    assert {"vtattn_C.paged_decode_step", "vtattn_C.paged_evict_step"} <= ops, ops
    assert not any(name in op for op in ops for name in ("argsort", "topk", "softmax", "index_copy"))


@pytest.mark.parametrize("policy", [POLICIES[1], H2O_EVERY_3], ids=["snapkv", "decode-h2o"])
def test_static_step_writes_only_tensors_at_static_addresses(policy):
    """Every tensor a static layer's decode step writes in place (the step op's mutable arguments, by its
    schema, the layer's device count, DecodeH2O's eviction state) is marked a static address, as
    inductor's CUDA graphs (torch.compile(mode="reduce-overhead")) need: otherwise they skip the graph
    ("mutated inputs")."""
    static = _prefilled(policy, page_size=8, max_new_tokens=8)
    layer = static.layers[0]
    q, k, v = _token(0)
    args = (q, *layer.pages.write_args(k, v, layer.seen_t), layer.pages.table, D ** -0.5)
    schema = torch.ops.vtattn.paged_decode_step.default._schema
    written = [a for a, s in zip(args, schema.arguments) if s.alias_info is not None and s.alias_info.is_write]
    written = [t for t in written if t is not None] + [layer.seen_t]
    if policy is H2O_EVERY_3:  # (the eviction writes the pools, counts and scores above, and its step counter)
        assert layer.pages.score is not None and any(t is layer.pages.score for t in written)
        written += list(layer._evict.tensors())
    assert len(written) >= 5  # k, v, pos, next, lengths (score: None without DecodeH2O), seen_t
    # (mark_static_address's mark: the attribute dynamo reads)
    assert all(getattr(t, "_dynamo_static_input_type", None) for t in written)


def test_compiled_static_step_with_grad_refuses_by_name():
    """A compiled step whose query requires grad takes the public op, whose autograd refuses by name (the
    vtattn._C kernel op the prefill prepared has no autograd: it must not run silently without one)."""
    torch._dynamo.reset()
    static = _prefilled(kv.SnapKV(0.3, window=4), page_size=8, max_new_tokens=8)
    compiled = torch.compile(lambda q, k, v: _step(static, q, k, v), fullgraph=True)
    q, k, v = _token(0)
    with pytest.raises(Exception, match="paged_decode_step has no gradient"):
        compiled(q.requires_grad_(), k, v)


def test_static_refuses_bad_arguments():
    with pytest.raises(ValueError, match="max_new_tokens"):
        CompressedCache(None, max_new_tokens=-1)
    with pytest.raises(ValueError, match="room"):
        CompressedCache(None, max_new_tokens=4, room=8)


def test_static_beams_reorder_in_place():
    cache = _prefilled(None, page_size=8, max_new_tokens=4)
    pages = cache.layers[0].pages
    k_before = pages.k.data_ptr()
    cache.layers[0].reorder_cache(torch.tensor([1, 1]))
    assert pages.k.data_ptr() == k_before  # CUDA graphs replay on the same tensors
    q, k, v = _token(0)
    _step(cache, q, k, v)
    _, key, _ = _prompt()
    slots = pages.slots()
    stored = pages.k.view(-1, D)[slots.clamp(min=0)]
    assert torch.equal(stored[0, :, :L], key[1]) and torch.equal(stored[1, :, :L], key[1])


def test_dynamic_cache_bytes_follow_the_budget_at_small_sizes():
    """LOOK-M(0.1) on a short prompt holds fewer bytes than the dense cache of the same tokens,
    before and after decoding (a head starts with what its last page leaves; growth adds a quarter
    of its length, at least a page)."""
    modality = torch.zeros(B, L, dtype=torch.bool)
    modality[:, 3:30] = True
    q, k, v = _prompt()
    cache = CompressedCache(kv.LookM(0.1, 0.1))
    cache.modality = modality
    cache.update(k, v, 0)
    cache.layers[0].attend(q, k, v, None, D ** -0.5)
    dense = lambda n: B * HKV * n * 2 * D * 4  # noqa: E731
    assert cache.kv_bytes() <= 0.5 * dense(L)
    for step in range(8):
        _step(cache, *_token(step))
    assert cache.kv_bytes() < dense(L + 8)


@pytest.mark.gpu
@pytest.mark.parametrize("page_size", [1, 16])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_static_decode_step_replays_in_a_cuda_graph(dtype, page_size):
    """A compressed decode step captured once in a CUDA graph and replayed for new tokens gives what
    the eager dynamic cache gives (no host sync and no host state in the step); pages of one token
    (the default) and of 16."""
    policy = kv.SnapKV(0.3, window=4)
    static = _prefilled(policy, "cuda", dtype, page_size=page_size, max_new_tokens=8)
    dynamic = _prefilled(policy, "cuda", dtype, page_size=page_size)
    q, k, v = (torch.zeros_like(t) for t in _token(0, device="cuda", dtype=dtype))
    _step(static, q, k, v)  # warm-up (kernels loaded, the layer's backend chosen), then undo it
    layer = static.layers[0]
    layer.pages.lengths -= 1
    layer.pages.next -= 1
    layer.seen_t -= 1
    layer.pages.host_lengths -= 1
    layer.pages.room += 1
    layer.seen -= 1
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):  # records the step's kernels without running them
        out = _step(static, q, k, v)
    for step in range(6):
        new = _token(step, device="cuda", dtype=dtype)
        for buf, x in zip((q, k, v), new):
            buf.copy_(x)
        graph.replay()
        torch.testing.assert_close(out, _step(dynamic, *new), atol=2e-3, rtol=2e-3)
    assert torch.equal(static.kept_positions(0), dynamic.kept_positions(0))


@pytest.mark.gpu
def test_static_decode_h2o_step_replays_in_a_cuda_graph():
    """DecodeH2O's device-side eviction in a captured decode step: replays (evicting and not: every=3)
    give the eager dynamic cache's outputs and kept positions."""
    static = _prefilled(H2O_EVERY_3, "cuda", torch.bfloat16, max_new_tokens=8)
    dynamic = _prefilled(H2O_EVERY_3, "cuda", torch.bfloat16)
    q, k, v = (t.clone() for t in _token(0, device="cuda", dtype=torch.bfloat16))
    _step(static, q, k, v), _step(dynamic, q, k, v)  # warm-up: kernels loaded, backends chosen
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):  # records the step without running it
        out = _step(static, q, k, v)
    for step in range(1, 8):
        new = _token(step, device="cuda", dtype=torch.bfloat16)
        for buf, x in zip((q, k, v), new):
            buf.copy_(x)
        graph.replay()
        torch.testing.assert_close(out, _step(dynamic, *new), atol=2e-2, rtol=2e-2)
        assert torch.equal(static.kept_positions(0), dynamic.kept_positions(0)), step


def test_prefill_under_grad_compresses_detached_and_decode_refuses_grad():
    """The prefill's output keeps its gradient; scores and the stored rows are detached (the keep-set
    is a choice, the cache inference state), so compression runs; a decode step whose inputs require
    grad is refused by name (the paged kernel has no backward)."""
    q, k, v = (t.requires_grad_() for t in _prompt())
    cache = CompressedCache(kv.LookM(0.3, 0.1))
    cache.modality = torch.zeros(B, L, dtype=torch.bool)
    cache.modality[:, 3:30] = True
    cache.update(k, v, 0)
    out = cache.layers[0].attend(q, k, v, None, D ** -0.5)
    out.sum().backward()
    assert q.grad is not None and k.grad is not None
    assert not cache.layers[0].pages.k.requires_grad
    q1, k1, v1 = (t.requires_grad_() for t in _token(0))
    with pytest.raises(RuntimeError, match="grad"):
        _step(cache, q1, k1, v1)
    assert not cache.layers[0].pages.k.requires_grad  # the append stored the new rows detached
