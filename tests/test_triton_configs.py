"""Every autotuning config of every Triton attention kernel computes the reference result: the
autotuner may pick any of them on a user's GPU, while the other tests run only the first
(VTATTN_TRITON_AUTOTUNE=0, conftest.py). bf16 (the dots the interpreter cannot run) and fp32
(its own small tiles), causal, at sizes where the largest tiles still leave ragged edges."""
import pytest
import torch

import vtattn
from helpers import OUT_TOL, rand_qkv, run_forced
from test_block_sparse_attention import random_lists
from test_index_attention import make as make_index

def _attention(dtype):
    q, k, v = rand_qkv(1, 4, 2, 300, 333, 80, dtype, "cuda", "strided")
    return vtattn.attention, (q, k, v), dict(causal=True)


def _varlen(dtype):
    cu = torch.tensor([0, 77, 290, 301], dtype=torch.int32, device="cuda")
    q, k, v = (t[0].transpose(0, 1) for t in rand_qkv(1, 4, 2, 301, 301, 72, dtype, "cuda", "strided"))
    return vtattn.varlen_attention, (q, k, v, cu, cu), dict(causal=True, max_seqlen_q=213, max_seqlen_k=213)


def _index(dtype):
    q, k, v, idx, kw = make_index(5, dtype, "cuda")
    return vtattn.index_attention, (q, k, v, idx), {**kw, "causal": True}


def _key_importance(rows):
    def make(dtype):
        q, k, _ = rand_qkv(2, 4, 2, 290, 290, 64, dtype, "cuda", "sliced")
        r = torch.arange(0, 290, 3, device="cuda") if rows == "many" else rows
        return vtattn.key_importance, (q, k), dict(rows=r, causal=True)
    return make


def _block_sparse(dtype):
    q, k, v = rand_qkv(1, 2, 2, 300, 300, 64, dtype, "cuda", "contiguous")
    num, idx = random_lists(1, 2, 300, 300, 128, torch.Generator().manual_seed(0))
    return vtattn.block_sparse_attention, (q, k, v, num.cuda(), idx.cuda()), dict(block_size=128, causal=True)


def _group(dtype):
    q, k, v = rand_qkv(1, 4, 2, 300, 333, 80, dtype, "cuda", "strided")
    groups = torch.arange(333, device="cuda") % 5 - 1  # 4 groups and hidden keys
    return vtattn.group_attention, (q, k, v, groups), dict(num_groups=4, causal=True)


OPS = {"attention": _attention, "varlen_attention": _varlen, "index_attention": _index,
       "key_importance-row0": _key_importance(0), "key_importance-many-rows": _key_importance("many"),
       "key_importance-all": _key_importance("all"), "block_sparse_attention": _block_sparse,
       "group_attention": _group}
# (dtype, config): the largest spaces are 13 configs in 16 bits (attention's _space), 3 in fp32;
# a kernel with fewer runs its last for the rest.
CONFIGS = [(torch.bfloat16, i) for i in range(13)] + [(torch.float32, i) for i in range(3)]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype,config", CONFIGS, ids=[f"{str(d)[6:]}-{i}" for d, i in CONFIGS])
@pytest.mark.parametrize("op", OPS)
def test_every_triton_config_matches_the_reference(monkeypatch, op, dtype, config):
    monkeypatch.setenv("VTATTN_TRITON_CONFIG", str(config))
    fn, args, kw = OPS[op](dtype)
    got = run_forced("triton", fn, *args, **kw)
    want = run_forced("torch", fn, *args, **kw)
    atol, rtol = (1e-4, 1e-3) if op.startswith("key_importance") else (OUT_TOL[dtype],) * 2
    for g, w in zip(got, want) if isinstance(got, tuple) else [(got, want)]:  # group_attention: out and mass
        torch.testing.assert_close(g.float(), w.float(), atol=atol, rtol=rtol)


# ---- how a config is picked (CPU: no launch; the autotuner's pruning and the launch path) ----------

def _tuned():
    pytest.importorskip("triton")
    from vtattn.triton_kernels import _common, attention
    return _common, attention._attention_fwd


def _cfg(c):
    return (c.kwargs, c.num_warps, c.num_stages)


def test_the_autotuner_holds_every_config_and_prunes_to_what_fits(monkeypatch):
    import triton
    _common, tuned = _tuned()
    monkeypatch.setenv("VTATTN_TRITON_AUTOTUNE", "1")
    monkeypatch.delenv("VTATTN_TRITON_CONFIG", raising=False)
    tuner = tuned._autotuner
    assert isinstance(tuner, triton.runtime.autotuner.Autotuner) and tuner.early_config_prune is not None
    every = [_cfg(c) for c in tuner.configs]
    assert all(c in every for e in (2, 4) for bd in (64, 128, 256) for c in tuned.space(e, bd))
    assert "BLOCK_D" in tuner.keys
    limit = 100 * 1024  # an sm_86-sized block: the largest bf16 tiles do not fit at head dim 128
    monkeypatch.setattr(_common, "_launch_facts", lambda args, kwargs: (2, kwargs["BLOCK_D"], limit))
    pruned = [_cfg(c) for c in tuner.early_config_prune(tuner.configs, {"Q": None}, BLOCK_D=128)]
    fits = [c for c in tuned.space(2, 128) if 2 * 128 * tuned.smem(c[0], c[2]) <= limit]
    assert pruned == fits and 1 < len(fits) < len(tuned.space(2, 128))


@pytest.mark.parametrize("env,expect", [({"VTATTN_TRITON_AUTOTUNE": "0"}, "first"),
                                        ({"VTATTN_TRITON_CONFIG": "99"}, "last"),
                                        ({"VTATTN_TRITON_AUTOTUNE": "1"}, "autotune")])
def test_one_config_launches_directly_and_several_autotune(monkeypatch, env, expect):
    _common, tuned = _tuned()
    monkeypatch.delenv("VTATTN_TRITON_CONFIG", raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    calls = []

    class Recorder:
        def __init__(self, name):
            self.name = name

        def __getitem__(self, grid):
            return lambda *args, **kwargs: calls.append((self.name, kwargs))

    monkeypatch.setattr(tuned, "fn", Recorder("direct"))
    monkeypatch.setitem(tuned.__dict__, "_autotuner", Recorder("autotuner"))
    monkeypatch.setattr(_common, "_launch_facts", lambda args, kwargs: (2, 128, 227 * 1024))
    tuned[(1,)](torch.empty(1), BLOCK_D=128)
    space = tuned.space(2, 128)
    if expect == "autotune":
        assert calls == [("autotuner", {"BLOCK_D": 128})]
    else:
        meta, warps, stages = space[0] if expect == "first" else space[-1]
        assert calls == [("direct", {"BLOCK_D": 128, **meta, "num_warps": warps, "num_stages": stages,
                                     "num_ctas": 1})]
