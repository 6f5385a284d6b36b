"""The Triton attention launcher under TRITON_INTERPRET=1 against vtattn.reference (tiny shapes;
the interpreter's tiles are 32 query rows x 16 keys, so these sizes span several tiles)."""
import os
import subprocess
import sys

import pytest
import torch

import vtattn.reference as ref
from helpers import OUT_TOL, poisoned_outputs, rand_qkv
from vtattn.triton_kernels import attention as triton_attention
from vtattn.triton_kernels import key_importance as triton_key_importance

# (B, Hq, Hkv, Nq, Nk, D, causal, dtype, layout)
CASES = [
    (1, 1, 1, 1, 1, 64, False, torch.float32, "contiguous"),
    (1, 1, 1, 1, 1, 64, True, torch.float16, "strided"),
    (2, 4, 2, 17, 17, 64, True, torch.float32, "strided"),
    (1, 4, 1, 33, 17, 72, True, torch.float32, "sliced"),  # Nq > Nk: the first rows see no key
    (1, 2, 1, 17, 50, 80, True, torch.float32, "contiguous"),  # Nq < Nk
    (2, 2, 2, 50, 33, 128, False, torch.float32, "strided"),
    (1, 2, 1, 20, 37, 8, True, torch.float32, "contiguous"),  # D < 16: padded to tl.dot's minimum
    (2, 4, 2, 65, 65, 64, True, torch.float16, "contiguous"),
    (1, 2, 1, 33, 100, 72, False, torch.float16, "strided"),
    (1, 2, 2, 100, 77, 80, True, torch.float16, "sliced"),
    (1, 2, 1, 40, 40, 128, False, torch.float16, "contiguous"),
    (1, 2, 1, 300, 300, 64, True, torch.float16, "strided"),
]
LSE_TOL = {torch.float32: 1e-5, torch.float16: 1e-4}


def _check(q, k, v, causal, softcap=0.0, window=-1, sinks=None):
    scale = q.shape[-1] ** -0.5
    before = [t.clone() for t in (q, k, v)]
    with poisoned_outputs():  # unwritten output elements would be NaN
        out, lse = triton_attention.attention(q, k, v, causal, scale, softcap, window, sinks)
    want_out, want_lse = ref.attention(q, k, v, causal, scale, softcap, window, sinks)
    assert out.shape == q.shape and out.dtype == q.dtype and out.transpose(1, 2).is_contiguous()  # token-major, as SDPA
    assert lse.shape == q.shape[:3] and lse.dtype == torch.float32 and lse.is_contiguous()
    assert not out.isnan().any() and not lse.isnan().any()
    torch.testing.assert_close(out.float(), want_out.float(), atol=OUT_TOL[q.dtype], rtol=0)
    torch.testing.assert_close(lse, want_lse, atol=LSE_TOL[q.dtype], rtol=0)  # -inf where the reference has it
    assert all(torch.equal(a, b) for a, b in zip((q, k, v), before))


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(map(str, c)).replace("torch.", ""))
def test_attention_matches_reference(case):
    B, Hq, Hkv, Nq, Nk, D, causal, dtype, layout = case
    _check(*rand_qkv(B, Hq, Hkv, Nq, Nk, D, dtype, layout=layout, seed=Nq * 1000 + Nk), causal)


# (B, Hq, Hkv, Nq, Nk, D, causal, dtype, softcap, window, sinks): windows narrower than a key tile (16
# here), across several tiles, 0 (the own key only) and covering every key; Nq != Nk both ways.
OPTION_CASES = [
    (1, 2, 1, 40, 70, 64, True, torch.float32, 4.0, None, False),
    (2, 2, 2, 33, 50, 72, False, torch.float32, None, 5, False),
    (1, 4, 2, 50, 33, 64, True, torch.float32, None, 20, True),  # the first 17 rows see no key
    (1, 2, 1, 65, 65, 80, True, torch.float16, 30.0, 0, True),
    (1, 2, 2, 20, 90, 64, False, torch.float32, 0.5, 37, True),
    (2, 2, 1, 17, 17, 64, False, torch.float16, None, 100, True),
]


@pytest.mark.parametrize("case", range(len(OPTION_CASES)))
def test_attention_options_match_reference(case):
    B, Hq, Hkv, Nq, Nk, D, causal, dtype, softcap, window, use_sinks = OPTION_CASES[case]
    q, k, v = rand_qkv(B, Hq, Hkv, Nq, Nk, D, dtype, layout=("strided", "contiguous")[case % 2], seed=case)
    sinks = torch.randn(Hq, generator=torch.Generator().manual_seed(case)) if use_sinks else None
    _check(q, k * 3, v, causal, softcap or 0.0, -1 if window is None else window, sinks)


def test_attention_sinks_without_keys():
    q, k, v = rand_qkv(1, 2, 1, 5, 0, 64, torch.float32, seed=0)
    sinks = torch.tensor([0.5, -1.0])
    out, lse = triton_attention.attention(q, k, v, False, 0.125, 0.0, -1, sinks)
    assert torch.equal(out, torch.zeros_like(out)) and torch.equal(lse[0], sinks[:, None].expand(2, 5))


@pytest.mark.parametrize("causal", [False, True])
def test_attention_without_keys(causal):
    q, k, v = rand_qkv(2, 2, 1, 5, 0, 64, torch.float32, seed=0)
    with poisoned_outputs():
        out, lse = triton_attention.attention(q, k, v, causal, 0.125)
    assert torch.equal(out, torch.zeros_like(out)) and bool((lse == float("-inf")).all())


def test_attention_mixed_views():
    """q, k, v each with its own strides: a head slice of a wider tensor, a transpose, a non-unit last dim."""
    g = torch.Generator().manual_seed(1)
    q = torch.randn(2, 6, 21, 64, generator=g)[:, 1:5]
    k = torch.randn(2, 29, 2, 64, generator=g).transpose(1, 2)
    v = torch.randn(2, 2, 64, 29, generator=g).transpose(2, 3)
    _check(q, k, v, True)


@pytest.mark.xfail(strict=True, reason="the Triton interpreter computes bf16 tl.dot wrongly (ENV.md)")
@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # its garbage overflows exp2
def test_attention_bf16_under_interpreter():
    _check(*rand_qkv(1, 2, 1, 33, 40, 64, torch.bfloat16, seed=2), True)


def test_supports_reasons(monkeypatch):
    q, k, v = rand_qkv(1, 2, 1, 4, 4, 64, torch.float16, seed=3)
    assert triton_attention.supports(q, k, v, True, 0.125) is None
    assert triton_attention.supports(q, k, v, True, 0.125, 5.0, 3, torch.zeros(2)) is None
    assert triton_key_importance.supports(q, k, None, None, True, 0.125) is None
    bf = [t.bfloat16() for t in (q, k, v)]
    assert "interpreter" in triton_attention.supports(*bf, True, 0.125)
    assert "interpreter" in triton_key_importance.supports(*bf[:2], None, None, True, 0.125)
    assert "dtype" in triton_attention.supports(*(t.double() for t in (q, k, v)), False, 0.125)
    wide = torch.zeros(1, 1, 2, 320)
    assert "head dim" in triton_attention.supports(wide, wide, wide, False, 0.125)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert triton_attention.supports(q, k, v, True, 0.125) == "Triton on CPU tensors needs TRITON_INTERPRET=1"


def test_imports_without_triton():
    code = ("import sys; sys.modules['triton'] = None\n"  # makes `import triton` raise ImportError
            "import torch\n"
            "from vtattn.triton_kernels import attention, key_importance\n"
            "q = torch.zeros(1, 1, 2, 64)\n"
            "print(attention.supports(q, q, q, False, 1.0)); print(key_importance.supports(q, q, None, None, False, 1.0))")
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert res.returncode == 0, res.stderr
    assert res.stdout.count("triton is not importable") == 2, res.stdout
