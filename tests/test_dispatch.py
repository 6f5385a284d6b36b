import subprocess
import sys
import warnings

import pytest
import torch

import vtattn
from vtattn import _dispatch, _dispatch_emit, _dispatch_table, _ext, _registry
from vtattn._registry import ATTENTION, KEY_IMPORTANCE
from helpers import rand_qkv


def _qkv():
    return rand_qkv(1, 2, 2, 8, 8, 64, torch.float32)


def _args(op):
    """Small CPU arguments of a registered op, whatever its schema."""
    return _registry.SAMPLES[op]("cpu", torch.float32)


def test_use_backend_forces_and_restores():
    assert vtattn.forced_backend() is None
    with vtattn.use_backend("torch"):
        assert vtattn.forced_backend() == "torch"
        assert _dispatch.choose("attention", ATTENTION, _args("attention")) == "torch"
    assert vtattn.forced_backend() is None


def test_env_variable_forces_backend(monkeypatch):
    monkeypatch.setenv("VTATTN_BACKEND", "torch")
    with vtattn.use_backend(None):  # None overrides the env var
        assert vtattn.forced_backend() is None
    monkeypatch.setattr(_dispatch, "_forced", None)
    assert vtattn.forced_backend() == "torch"
    assert _dispatch.choose("attention", ATTENTION, _args("attention")) == "torch"
    monkeypatch.setenv("VTATTN_BACKEND", "fastest")
    with pytest.raises(ValueError, match="backend must be one of"):
        vtattn.forced_backend()


def test_forced_backend_that_cannot_run_says_why():
    q, k, v = _qkv()
    with vtattn.use_backend("aten"):
        with pytest.raises(vtattn.BackendUnavailable, match="aten.*SDPA aligns the mask to the top-left"):
            vtattn.attention(q, torch.cat([k, k], 2), torch.cat([v, v], 2), causal=True)
        with pytest.raises(vtattn.BackendUnavailable, match="no 'aten' backend"):
            vtattn.key_importance(q, k, rows=0)
    with vtattn.use_backend("cuda"):
        with pytest.raises(vtattn.BackendUnavailable, match="tensors are on cpu"):
            vtattn.attention(q, k, v)


def test_unknown_backend_name():
    with pytest.raises(ValueError, match="backend must be one of"):
        vtattn.use_backend("cudnn")


def test_cpu_default_prefers_aten_then_compiled_kernels_then_reference():
    args = _args("attention")
    assert _dispatch.choose("attention", ATTENTION, args) == "aten"  # PyTorch's CPU flash kernel
    want = "cpp" if _ext.has_kernel("attention", "cpu") is None else "torch"
    assert _dispatch.choose("attention", ATTENTION, (*args[:5], 2.0, *args[6:])) == want  # softcap: vtattn's own
    want = "cpp" if _ext.has_kernel("key_importance", "cpu") is None else "torch"
    assert _dispatch.choose("key_importance", KEY_IMPORTANCE, _args("key_importance")) == want


def test_mismatched_build_is_reported_not_raised(monkeypatch):
    info = dict(_ext.build_info() or {"with_cuda": False, "cuda_skip_reason": "", "cpu_sources": []})
    info["torch"] = "0.0.0"
    monkeypatch.setattr(_ext, "_read_facts", lambda: info)  # the facts compiled into _C, as read after loading
    _ext.load.cache_clear()
    try:
        reason = _ext.load()
        assert "built for torch 0.0.0" in reason
        q, k, v = _qkv()
        assert _dispatch.choose("key_importance", KEY_IMPORTANCE, _args("key_importance")) == "torch"
        with vtattn.use_backend("cpp"), pytest.raises(vtattn.BackendUnavailable, match="rebuild"):
            vtattn.attention(q, k, v)
    finally:
        _ext.load.cache_clear()


def test_import_loads_nothing_and_touches_no_gpu():
    code = ("import sys, torch, vtattn; "
            "assert 'vtattn._C' not in sys.modules, 'compiled kernels loaded at import'; "
            "assert not any(m.startswith('triton') for m in sys.modules), 'triton imported at import'; "
            "assert not torch.cuda.is_initialized(); "
            "q = torch.randn(1, 2, 8, 64); vtattn.attention(q, q, q); vtattn.key_importance(q, q, rows=0); "
            "assert not torch.cuda.is_initialized()")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_info_reports_build_and_backends():
    facts = vtattn.info()
    assert facts["torch"] == torch.__version__
    assert "attention[cpu,float32]" in facts["backends"]
    out = subprocess.run([sys.executable, "-m", "vtattn", "info"], check=True, capture_output=True,
                         text=True).stdout
    assert "key_importance[cpu,float32]" in out and "build:" in out


@pytest.mark.parametrize("optin,refused", [(101376, (88, 128)), (232448, ())])  # sm_86 / sm_89, sm_90
def test_cuda_flash_kernels_refuse_head_dims_beyond_the_shared_memory_opt_in(monkeypatch, optin, refused):
    """The flash kernel's DP = 128 config needs 104448 bytes of shared memory (+1 KiB for
    index_attention): more than sm_86 / sm_89 allow per block, where the launch would fail."""
    from types import SimpleNamespace

    from vtattn import _cuda_caps
    monkeypatch.setattr(torch.cuda, "get_device_properties",
                        lambda device: SimpleNamespace(shared_memory_per_block_optin=optin))
    assert _cuda_caps.flash_smem_bytes(128) == (128 + 4 * 64) * 136 * 2  # FlashCfg<128> in flash_fwd.cuh
    assert _cuda_caps.flash_smem_bytes(72) == (128 + 4 * 64) * 88 * 2
    for d in (64, 72, 80, 88, 128):
        for extra in (0, _cuda_caps.INDEX_EXTRA_SMEM):
            reason = _cuda_caps._flash_smem_reason("cuda:0", d, extra)
            assert (reason is not None) == (d in refused), (d, extra, reason)


# ---- the order as data, the reference fallback on CUDA ----

def _backends(**answers):
    """Backends answering `supports` as given (None: runs); run returns the backend's name."""
    return {n: _dispatch.Backend(lambda *a, r=r: r, lambda *a, n=n: n) for n, r in answers.items()}


@pytest.fixture
def on_sm90(monkeypatch):
    """choose() believes the tensors sit on an sm_90 device; fallback warnings start afresh."""
    monkeypatch.setattr(_dispatch, "_device_key", lambda args: "sm_90")
    monkeypatch.setattr(_dispatch, "_warned", set())
    monkeypatch.delenv("VTATTN_STRICT", raising=False)


def test_order_is_the_table_row_of_the_op_and_arch(on_sm90, monkeypatch):
    table = {"cpu": {"*": ("cpp", "torch")}, "cuda": {"*": ("aten", "cuda", "triton", "torch")},
             "sm_90": {"attention": ("triton", "aten", "cuda", "torch")}}
    monkeypatch.setattr(_dispatch_table, "ORDER", table)
    all_run = _backends(aten=None, cuda=None, triton=None, torch=None)
    assert _dispatch.choose("attention", all_run, (torch.zeros(1),)) == "triton"
    assert _dispatch.choose("key_importance", all_run, (torch.zeros(1),)) == "aten"  # the "cuda" default
    assert _dispatch.order("attention", "sm_86", table) == ("aten", "cuda", "triton", "torch")
    # a backend the row does not name still runs, before the reference
    monkeypatch.setattr(_dispatch_table, "ORDER", {**table, "sm_90": {"attention": ("cuda", "torch")}})
    some = _backends(cuda="no", triton=None, torch=None)
    assert list(_dispatch.explain(some, (torch.zeros(1),), "attention")) == ["cuda", "triton", "torch"]
    assert _dispatch.choose("attention", some, (torch.zeros(1),)) == "triton"


def test_reference_fallback_on_cuda_warns_once_per_reason(on_sm90):
    refusing = _backends(cuda="head dim 512", triton="fp64", torch=None)
    with pytest.warns(_dispatch.ReferenceFallbackWarning, match="cuda: head dim 512; triton: fp64.*VTATTN_STRICT"):
        assert _dispatch.choose("attention", refusing, (torch.zeros(1),)) == "torch"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert _dispatch.choose("attention", refusing, (torch.zeros(1),)) == "torch"  # once
    with pytest.warns(_dispatch.ReferenceFallbackWarning, match="head dim 1024"):
        _dispatch.choose("attention", _backends(cuda="head dim 1024", torch=None), (torch.zeros(1),))


def test_strict_mode_raises_instead_of_falling_back(on_sm90, monkeypatch):
    monkeypatch.setenv("VTATTN_STRICT", "1")
    with pytest.raises(vtattn.BackendUnavailable, match="reference.*cuda: no"):
        _dispatch.choose("attention", _backends(cuda="no", torch=None), (torch.zeros(1),))
    with vtattn.use_backend("torch"):  # a forced reference is what the user asked for
        assert _dispatch.choose("attention", _backends(cuda="no", torch=None), (torch.zeros(1),)) == "torch"


def test_cpu_reference_is_silent(monkeypatch):
    monkeypatch.setenv("VTATTN_STRICT", "1")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert _dispatch.choose("attention", _backends(cpp="no", torch=None), (torch.zeros(1),)) == "torch"


def test_emit_dispatch_rewrites_the_arch_row(tmp_path, monkeypatch):
    def row(op, case, backend, ms):
        return {"op": op, "case": case, "shape": {"N": 1}, "dtype": "bf16", "backend": backend, "role": "vtattn",
                "median_ms": ms}
    rows = [row("attention", "a", "cuda", 2.0), row("attention", "a", "triton", 1.0),
            row("attention", "a", "auto", 1.0), row("attention", "b", "cuda", 3.0),
            row("attention", "b", "triton", 2.0),
            row("decode_attention", "a", "cuda", 1.0), row("decode_attention", "a", "triton", 1.5),
            {**row("attention", "a", "sdpa-flash", 0.1), "role": "baseline"}]
    header = {"device_type": "cuda", "device": "NVIDIA H100 80GB HBM3", "git_commit": "abc", "date": "2026-12-06"}
    path = tmp_path / "_dispatch_table.py"
    assert "sm_90" in _dispatch_emit.emit(header, rows, path)
    table = {}
    exec(path.read_text(), table)
    assert table["ORDER"]["sm_90"] == {"attention": ("aten", "triton", "cuda", "torch"),
                                       "decode_attention": ("aten", "cuda", "triton", "torch")}
    assert table["ORDER"]["cuda"] == _dispatch_table.ORDER["cuda"]
    assert table["SOURCE"]["sm_90"]["commit"] == "abc"
    assert "unchanged" in _dispatch_emit.emit({"device_type": "cpu"}, rows, path)
    assert _dispatch_emit.arch_of({"device_type": "cuda", "capability": (8, 6)}) == "sm_86"


def test_bench_takes_emit_dispatch():
    from vtattn.bench.__main__ import _parse
    assert _parse(["--emit-dispatch"]).emit_dispatch


@pytest.mark.gpu
def test_cuda_inputs_no_kernel_takes_warn_then_strict_raises(monkeypatch):
    monkeypatch.setattr(_dispatch, "_warned", set())
    q = torch.randn(1, 2, 8, 16, device="cuda", dtype=torch.float64)  # no kernel runs fp64
    with pytest.warns(_dispatch.ReferenceFallbackWarning):
        vtattn.attention(q, q, q)
    monkeypatch.setenv("VTATTN_STRICT", "1")
    with pytest.raises(vtattn.BackendUnavailable, match="reference"):
        vtattn.attention(q, q, q)
