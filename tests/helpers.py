"""Shared test helpers: float64 ground truth, random inputs, tolerances."""
import contextlib

import torch

import vtattn

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# Outputs of attention (P is rounded to the input dtype before P @ V in the GPU kernels).
OUT_TOL = {torch.float32: 2e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2, torch.float64: 1e-10}
# Probabilities: logits come from exact products accumulated in fp32.
PROB_TOL = {torch.float32: 1e-5, torch.float16: 5e-5, torch.bfloat16: 5e-5, torch.float64: 1e-10}


def naive_probs(q, k, causal, scale):
    """float64 softmax(q k^T * scale) [B, Hq, Nq, Nk], head by head; rows without keys are 0."""
    B, Hq, Nq, _ = q.shape
    Hkv, Nk = k.shape[1], k.shape[2]
    probs = torch.zeros(B, Hq, Nq, Nk, dtype=torch.float64, device=q.device)
    for h in range(Hq):
        s = q[:, h].double() @ k[:, h // (Hq // Hkv)].double().transpose(-1, -2) * scale
        if causal:  # row i sees key j iff j <= i + Nk - Nq
            hidden = torch.arange(Nk, device=q.device)[None, :] > torch.arange(Nq, device=q.device)[:, None] + Nk - Nq
            s = s.masked_fill(hidden, float("-inf"))
        probs[:, h] = torch.softmax(s, dim=-1).nan_to_num(0.0)
    return probs


def naive_attention(q, k, v, causal, scale):
    p = naive_probs(q, k, causal, scale)
    out = p @ v.double().repeat_interleave(q.shape[1] // k.shape[1], dim=1)
    return out


def rand_qkv(B, Hq, Hkv, Nq, Nk, D, dtype, device="cpu", layout="contiguous", seed=None):
    """Random q, k, v; layout "strided" gives views of [B, N, H, D] storage (as transformers),
    "sliced" gives views with padding in the head dim."""
    g = torch.Generator(device="cpu").manual_seed(seed if seed is not None else torch.seed() % 2**31)

    def make(H, N):
        if layout == "strided":
            return torch.randn(B, N, H, D, generator=g).to(device, dtype).transpose(1, 2)
        if layout == "sliced":
            return torch.randn(B, H, N, D + 8, generator=g).to(device, dtype)[..., 3:D + 3]
        return torch.randn(B, H, N, D, generator=g).to(device, dtype)

    return make(Hq, Nq), make(Hkv, Nk), make(Hkv, Nk)


def backend_params(op_backends):
    """(device, backend) pytest params: CPU backends always, GPU ones marked gpu; ids
    "cpu-cpp", "gpu-cuda", ... so `-k gpu-cuda` picks the CUDA kernels."""
    import pytest
    params = [pytest.param("cpu", b, id=f"cpu-{b}") for b in ("cpp", "torch") if b in op_backends]
    params += [pytest.param("cuda", b, id=f"gpu-{b}", marks=pytest.mark.gpu)
               for b in ("aten", "cuda", "triton", "torch") if b in op_backends]
    return params


def skip_unless_supported(table, args, backend):
    """Skip (with the backend's own reason) a combination the backend declares unsupported."""
    import pytest
    reason = table[backend].supports(*args)
    if reason is not None:
        pytest.skip(f"{backend}: {reason}")


def run_forced(backend, fn, *args, **kwargs):
    with vtattn.use_backend(backend):
        return fn(*args, **kwargs)


@contextlib.contextmanager
def poisoned_outputs():
    """While active, new tensors (torch.empty, and at::empty in the C++ kernels) come filled with
    NaN / the largest integer / True, so an output element a kernel forgets to write shows up."""
    enabled, warn_only = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(enabled, warn_only=warn_only)
