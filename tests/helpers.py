"""Shared test helpers: float64 ground truth, random inputs, tolerances."""
import contextlib
import inspect

import torch
from torch.utils._python_dispatch import TorchDispatchMode

import vtattn

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# Outputs of attention (P is rounded to the input dtype before P @ V in the GPU kernels).
OUT_TOL = {torch.float32: 2e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2, torch.float64: 1e-10}
# Probabilities: logits come from exact products accumulated in fp32.
PROB_TOL = {torch.float32: 1e-5, torch.float16: 5e-5, torch.bfloat16: 5e-5, torch.float64: 1e-10}


def naive_logits(q, k, causal, scale, softcap=0.0, window=-1):
    """float64 logits [B, Hq, Nq, Nk], head by head: c * tanh(s / c) when softcap c > 0; keys a row
    does not see (causal: j > i + Nk - Nq; window w >= 0: j < i + Nk - Nq - w) at -inf."""
    B, Hq, Nq, _ = q.shape
    Hkv, Nk = k.shape[1], k.shape[2]
    s = torch.stack([q[:, h].double() @ k[:, h // (Hq // Hkv)].double().transpose(-1, -2) * scale
                     for h in range(Hq)], 1)
    if softcap:
        s = softcap * torch.tanh(s / softcap)
    pos = torch.arange(Nq, device=q.device)[:, None] + Nk - Nq  # row i's own position among the keys
    j = torch.arange(Nk, device=q.device)[None, :]
    if causal:
        s = s.masked_fill(j > pos, float("-inf"))
    if window >= 0:
        s = s.masked_fill(j < pos - window, float("-inf"))
    return s


def _with_sinks(s, sinks):
    """s [B, Hq, Nq, Nk] with each head's sink logit as an extra column Nk (None: s)."""
    if sinks is None:
        return s
    return torch.cat([s, sinks.double().to(s.device)[:, None, None].expand(*s.shape[:-1], 1)], -1)


def naive_probs(q, k, causal, scale, softcap=0.0, window=-1, sinks=None):
    """float64 softmax [B, Hq, Nq, Nk] of naive_logits, the sinks [Hq] joining each row's softmax
    (their column dropped after); rows without keys (nor sink) are 0."""
    s = _with_sinks(naive_logits(q, k, causal, scale, softcap, window), sinks)
    return torch.softmax(s, dim=-1).nan_to_num(0.0)[..., :k.shape[2]]


def naive_lse(q, k, causal, scale, softcap=0.0, window=-1, sinks=None):
    """float64 log-sum-exp [B, Hq, Nq] of each row's logits and sink."""
    return torch.logsumexp(_with_sinks(naive_logits(q, k, causal, scale, softcap, window), sinks), -1)


def naive_attention(q, k, v, causal, scale, softcap=0.0, window=-1, sinks=None):
    p = naive_probs(q, k, causal, scale, softcap, window, sinks)
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
    params = [pytest.param("cpu", b, id=f"cpu-{b}") for b in ("aten", "cpp", "torch") if b in op_backends]
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


def fenced(t, dim, before=0, after=0, fill=float("nan")):
    """A copy of t inside a larger buffer with `before` / `after` extra slices along dim holding `fill`
    (NaN for floats): a kernel reading outside t gets those values, not another tensor's (or a crash)."""
    shape = list(t.shape)
    shape[dim] += before + after
    view = torch.full(shape, fill, dtype=t.dtype, device=t.device).narrow(dim, before, t.shape[dim])
    return view.copy_(t)


def bad_decode_inputs(device, dtype, paged=False):
    """(args, clamped): arguments of torch.ops.vtattn.(paged_)decode_attention (scale aside) whose lengths lie
    past the capacity, below 0 and at the int32 limits, and (paged) whose used block-table ids lie outside
    the pool: inputs only the public checks refuse (skipped under torch.compile and graph capture). A
    memory-safe kernel returns the reference on `clamped`: lengths clamped to [0, capacity], ids to the
    pool. Caches, pools and table are fenced: reading past them gives NaN (ids: a NaN page)."""
    g = torch.Generator().manual_seed(0)
    B, Hq, Hkv, D, page, max_pages = 2, 6, 3, 64, 8, 3
    cap = page * max_pages
    q = torch.randn(B, Hq, 1, D, generator=g).to(device, dtype)
    lens = torch.tensor([[cap + 5, -3, 17], [2**31 - 1, -2**31, cap]], dtype=torch.int32, device=device)
    if not paged:  # the fence covers any split of the GPU kernels (at most 256 keys)
        k, v = (fenced(torch.randn(B, Hkv, cap, D, generator=g).to(device, dtype), 2, after=256) for _ in range(2))
        return (q, k, v, lens), (q, k, v, lens.clamp(0, cap))
    P = B * Hkv * max_pages
    k, v = (fenced(torch.randn(P, page, D, generator=g).to(device, dtype), 0, before=1, after=P) for _ in range(2))
    table = torch.randperm(P, generator=g).to(device, torch.int32).reshape(B, Hkv, max_pages)
    table[0, 0, 1], table[1, 0, 2] = -1, 2 * P - 1  # used: both heads' lengths clamp to the capacity
    table = fenced(table, 2, after=32, fill=P + 1)
    return (q, k, v, table, lens), (q, k, v, table.clamp(0, P - 1), lens.clamp(0, cap))


def cache_name(model):
    """The name forward takes its cache by (transformers 5.25 renamed past_key_values to cache)."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


class Largest(TorchDispatchMode):
    """Records the largest tensor (elements) any aten op returns."""
    largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out
