import subprocess
import sys

import pytest
import torch

import vtattn
from vtattn import _dispatch, _ext
from vtattn._registry import ATTENTION, KEY_IMPORTANCE
from helpers import rand_qkv


def _qkv():
    return rand_qkv(1, 2, 2, 8, 8, 64, torch.float32)


def test_use_backend_forces_and_restores():
    q, k, v = _qkv()
    assert vtattn.forced_backend() is None
    with vtattn.use_backend("torch"):
        assert vtattn.forced_backend() == "torch"
        assert _dispatch.choose("attention", ATTENTION, (q, k, v, False, 0.1)) == "torch"
    assert vtattn.forced_backend() is None


def test_env_variable_forces_backend(monkeypatch):
    q, k, v = _qkv()
    monkeypatch.setenv("VTATTN_BACKEND", "torch")
    with vtattn.use_backend(None):  # None overrides the env var
        assert vtattn.forced_backend() is None
    monkeypatch.setattr(_dispatch, "_forced", None)
    assert vtattn.forced_backend() == "torch"
    assert _dispatch.choose("attention", ATTENTION, (q, k, v, False, 0.1)) == "torch"
    monkeypatch.setenv("VTATTN_BACKEND", "fastest")
    with pytest.raises(ValueError, match="backend must be one of"):
        vtattn.forced_backend()


def test_forced_backend_that_cannot_run_says_why():
    q, k, v = _qkv()
    with vtattn.use_backend("aten"):
        with pytest.raises(vtattn.BackendUnavailable, match="aten.*need CUDA tensors"):
            vtattn.attention(q, k, v)
        with pytest.raises(vtattn.BackendUnavailable, match="no 'aten' backend"):
            vtattn.key_importance(q, k, rows=0)
    with vtattn.use_backend("cuda"):
        with pytest.raises(vtattn.BackendUnavailable, match="tensors are on cpu"):
            vtattn.attention(q, k, v)


def test_unknown_backend_name():
    with pytest.raises(ValueError, match="backend must be one of"):
        vtattn.use_backend("cudnn")


def test_cpu_default_prefers_compiled_kernels_then_reference():
    q, k, v = _qkv()
    want = "cpp" if _ext.has_kernel("attention", "cpu") is None else "torch"
    assert _dispatch.choose("attention", ATTENTION, (q, k, v, False, 0.1)) == want
    want = "cpp" if _ext.has_kernel("key_importance", "cpu") is None else "torch"
    assert _dispatch.choose("key_importance", KEY_IMPORTANCE, (q, k, None, None, False, 0.1)) == want


def test_mismatched_build_is_reported_not_raised(monkeypatch):
    info = dict(_ext.build_info() or {"with_cuda": False, "cuda_skip_reason": "", "cpu_kernels": []})
    info["torch"] = "0.0.0"
    monkeypatch.setattr(_ext, "build_info", lambda: info)
    _ext.load.cache_clear()
    try:
        reason = _ext.load()
        assert "built for torch 0.0.0" in reason
        q, k, v = _qkv()
        assert _dispatch.choose("attention", ATTENTION, (q, k, v, False, 0.1)) == "torch"
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
