"""Shared pieces of the Triton kernels: the triton import guard, backend checks, config choice
and the jit helpers of the flash-attention loop (reused by the attention variants)."""
import contextlib
import functools
import math
import os

import torch

from .. import _env

try:
    import triton
    import triton.language as tl

    TRITON_ERROR = None
except ImportError as exc:  # the kernel modules must still import; supports() reports this
    TRITON_ERROR = f"triton is not importable ({exc})"

    class _NoTriton:
        """Stand-in so kernels get defined (never launched) without triton."""
        @staticmethod
        def constexpr(value=None):
            return value

        @staticmethod
        def jit(fn=None, **_):
            return fn if fn is not None else (lambda f: f)

    triton = tl = _NoTriton

DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_HEAD_DIM = 256
MAX_GRID_YZ = 65535  # CUDA's limit of grid axes 1 and 2 (axis 0: 2^31 - 1)
LOG2E = 1.4426950408889634  # logits are prescaled to the log2 domain (exp2 is the fast path)
LOG2E_K = tl.constexpr(LOG2E)  # in kernels: globals read there must be constexpr
LN2 = tl.constexpr(0.6931471805599453)


def interpreting() -> bool:
    """TRITON_INTERPRET as triton reads it (it must be set before triton is imported)."""
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "on", "yes")


def check_tensors(*tensors) -> str | None:
    """Reason why the Triton backend cannot run on these tensors (device and dtype), or None."""
    if TRITON_ERROR is not None:
        return TRITON_ERROR
    for t in tensors:
        if t.dtype not in DTYPES:
            return f"unsupported dtype {t.dtype} (fp16, bf16, fp32 only)"
        if t.dtype != tensors[0].dtype:
            return f"mixed dtypes {tensors[0].dtype} and {t.dtype}"
        if t.device != tensors[0].device:
            return f"tensors on different devices ({tensors[0].device}, {t.device})"
    device = tensors[0].device
    if device.type == "cpu":
        if not interpreting():
            return "Triton on CPU tensors needs TRITON_INTERPRET=1"
    elif device.type != "cuda":
        return f"Triton backend runs on CUDA tensors, not {device.type}"
    if tensors[0].dtype == torch.bfloat16 and interpreting():
        return "the Triton interpreter computes bf16 tl.dot wrongly"
    if tensors[0].shape[-1] > MAX_HEAD_DIM:
        return f"head dim {tensors[0].shape[-1]} > {MAX_HEAD_DIM}"
    return None


def on_device(t: torch.Tensor):
    """Launch on t's GPU (triton launches on the current device); nothing to do for CPU tensors."""
    return torch.cuda.device(t.device) if t.device.type == "cuda" else contextlib.nullcontext()


def block_d(head_dim: int) -> int:
    """Head dim padded to a power of two (at least 16, the smallest tl.dot K)."""
    return max(16, triton.next_power_of_2(head_dim))


def stride_align(*tensors) -> int:
    """Largest power of two, up to 16 bytes of elements, dividing every stride but the last (of dims
    longer than 1). Kernels get strides divided by it and multiply back by it as a constexpr: triton
    only learns divisibility by 16 from int arguments, so rows of D = 72 (144 bytes, 16-byte aligned)
    would otherwise load element by element, unpipelined."""
    align = 16 // tensors[0].element_size()
    for t in tensors:
        for size, st in zip(t.shape[:-1], t.stride()[:-1]):
            while size > 1 and st % align:
                align //= 2
    return align


def strides(t: torch.Tensor, align: int):
    """t's strides for a kernel given ALIGN=align: all but the last divided by align (see stride_align)."""
    return (*(st // align for st in t.stride()[:-1]), t.stride(-1))


def dot_precision(dtype) -> str:
    """fp32 inputs need full-precision dots (tf32 misses 1e-5 tolerances); ignored for 16-bit inputs."""
    return "ieee" if dtype == torch.float32 else "tf32"


def tune_key(*sizes: int) -> int:
    """One int for autotune keys: the log2 bucket of each size, so a new length rarely re-tunes."""
    key = 0
    for n in sizes:
        key = key * 32 + max(0, math.ceil(math.log2(max(n, 1))))
    return key


def tiles(*rows):
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) rows -> Tuned configs."""
    return [({"BLOCK_M": m, "BLOCK_N": n}, w, s) for m, n, w, s in rows]


def fp32_tiles(bd: int):
    """fp32 "ieee" dots run on FMA units with operands in registers: only small tiles avoid spills."""
    if bd <= 64:
        return [(64, 32, 8, 2), (32, 32, 4, 2), (16, 16, 4, 2)]
    return [(32, 16, 4, 2), (16, 16, 4, 2)] if bd <= 128 else [(16, 16, 4, 2)]


@functools.cache
def _smem_limit(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).shared_memory_per_block_optin


Cfg = tuple[dict, int, int]  # (meta-parameters, num_warps, num_stages)
# Every (element size, padded head dim) a launch can have: BLOCK_D is 0 for kernels without one.
_ESIZES, _BLOCK_DS = (2, 4), (0, 16, 32, 64, 128, 256)


def _launch_facts(args, kwargs) -> tuple[int, int, int]:
    """(element size, BLOCK_D, shared-memory limit of the device) of a launch; the limit is 0 on CPU."""
    t = next(a for a in args if isinstance(a, torch.Tensor))
    limit = _smem_limit(torch.cuda.current_device()) if t.device.type == "cuda" else 0  # on_device(t)
    return t.element_size(), kwargs.get("BLOCK_D", 0), limit


class Tuned:
    """A jit kernel launched with the config(s) for its inputs; the one place configs are picked.

    space(esize, block_d) lists (meta, num_warps, num_stages) for an element size and padded head
    dim, the default first and the smallest last; smem(meta, num_stages) estimates the BLOCK_D-wide
    rows a config keeps in shared memory, to drop configs the device cannot hold (`configs`). On a
    GPU: triton.autotune over every config of the space, whose early_config_prune keeps what
    `configs` picks for the launch; with VTATTN_TRITON_AUTOTUNE=0 only the first config (fast test
    runs), with VTATTN_TRITON_CONFIG=i only config i (the last when there are fewer: the tests prove
    every config right, as autotuning may pick any). Under the interpreter: the single small `interp`
    config (tuning there would take forever; small tiles exercise the multi-tile paths on tiny
    inputs). A launch with one config to run skips the autotuner.
    Launch as kernel[grid](*args, BLOCK_D=..., **constexprs)."""

    def __init__(self, fn, key: list[str], space, smem, interp: Cfg):
        self.fn, self.key, self.space, self.smem, self.interp = fn, key, space, smem, interp
        self._fitting: dict[tuple[int, int, int], list[Cfg]] = {}  # space less what does not fit: pure, so kept
        self._made: dict[str, "triton.Config"] = {}

    def configs(self, esize: int, bd: int, smem_limit: int) -> list[Cfg]:
        """The configs a launch with these facts may run (one unless autotuning)."""
        if interpreting():
            return [self.interp]
        space = self._fitting.get((esize, bd, smem_limit))
        if space is None:
            space = self.space(esize, bd)
            if self.smem is not None:
                space = [c for c in space if esize * bd * self.smem(c[0], c[2]) <= smem_limit] or space[-1:]
            self._fitting[esize, bd, smem_limit] = space
        forced = _env.integer("VTATTN_TRITON_CONFIG")
        if forced is not None:
            return [space[min(forced, len(space) - 1)]]
        return space if _env.flag("VTATTN_TRITON_AUTOTUNE") else space[:1]

    def _config(self, cfg: Cfg) -> "triton.Config":
        meta, warps, stages = cfg
        name = repr((sorted(meta.items()), warps, stages))
        if name not in self._made:
            self._made[name] = triton.Config(dict(meta), num_warps=warps, num_stages=stages)
        return self._made[name]

    def _prune(self, configs, named_args, **kwargs):
        """early_config_prune: the configs `configs` picks for this launch."""
        return [self._config(c) for c in self.configs(*_launch_facts(list(named_args.values()), kwargs))]

    @functools.cached_property
    def _autotuner(self):
        # Its key holds the tensors' dtypes (triton adds them) and BLOCK_D: what the pruning reads, but
        # for the device's shared-memory limit (one kind of GPU per process is assumed).
        every = [self._config(c) for e in _ESIZES for bd in _BLOCK_DS for c in self.space(e, bd)]
        return triton.autotune(configs=list({id(c): c for c in every}.values()),
                               key=list(dict.fromkeys([*self.key, "BLOCK_D"])),
                               prune_configs_by={"early_config_prune": self._prune})(self.fn)

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            chosen = self.configs(*_launch_facts(args, kwargs))
            if len(chosen) == 1:
                return self.fn[grid](*args, **kwargs, **self._config(chosen[0]).all_kwargs())
            return self._autotuner[grid](*args, **kwargs)
        return launch


@triton.jit
def wide(stride, ALIGN: tl.constexpr):
    """A stride argument (divided by ALIGN, see stride_align; 1 for a last dim) back in elements as int64,
    so every offset built from it is int64: row * stride passes 2^31 on long sequences, and so may a
    stride * ALIGN. tl.cast, not .to: triton passes a stride of 1 as a constexpr int."""
    return tl.cast(stride, tl.int64) * ALIGN


@triton.jit
def wide4(stride_b, stride_h, stride_n, stride_d, ALIGN: tl.constexpr):
    """The four strides of a [B, H, N, D] tensor as `stride_align` passes them, back in elements as int64."""
    return wide(stride_b, ALIGN), wide(stride_h, ALIGN), wide(stride_n, ALIGN), wide(stride_d, 1)


def fill_empty_lse(lse: torch.Tensor, sinks) -> torch.Tensor:
    """lse ([B, Hq, N] or [Hq, T]) of rows that see no key: -inf, or their head's sink logit."""
    return lse.fill_(float("-inf")) if sinks is None else lse.copy_(sinks[:, None].expand_as(lse))


def window_arg(window: int, Nk: int) -> int:
    """The window as kernels take it: -1 (off) where it hides nothing (no row's position passes Nk - 1,
    so w >= Nk - 1 sees every key from 0), which also keeps w within int32."""
    return window if 0 <= window < Nk - 1 else -1


def logit_scales(scale: float, softcap: float) -> tuple[float, float]:
    """(qk_scale, cap) for kernels whose logits live in the log2 domain: q.k * qk_scale is the logit, or
    with a softcap c the tanh argument s / c, mapped back by cap_logits to c * tanh(s / c) * log2(e)."""
    if softcap > 0:
        return scale / softcap, softcap * LOG2E
    return scale * LOG2E, 1.0


@triton.jit
def cap_logits(qk, cap, SOFTCAP: tl.constexpr):
    """qk from logit_scales' qk_scale, as log2-domain logits: cap * tanh(qk) under a softcap, else qk.
    tanh(x) = 1 - 2 / (exp(2x) + 1) saturates to +-1 (exp2 overflows to inf, or goes to 0); NaN stays NaN."""
    if SOFTCAP:
        qk = (1.0 - 2.0 / (tl.math.exp2(qk * (2.0 * LOG2E_K)) + 1.0)) * cap
    return qk


@triton.jit
def key_range(row_lo, row_hi, Nk, causal_off, window, CAUSAL: tl.constexpr, WINDOW: tl.constexpr,
              BLOCK_N: tl.constexpr):
    """Key tiles a block of query rows [row_lo, row_hi] reads, as (lo, mid, full, end): [mid, full) is visible
    to every row (no mask); [lo, mid) (the window's left edge) and [max(mid, full), end) (the causal diagonal,
    the ragged last tile) need the mask. Tiles left of lo (outside every row's window) and from end on
    (right of every row's causal limit) are skipped. row_hi < row_lo means no rows: empty ranges."""
    if CAUSAL:
        end = tl.minimum(row_hi + causal_off + 1, Nk)
        full = tl.minimum(row_lo + causal_off + 1, Nk)
    else:
        end = Nk
        full = Nk
    end = tl.where(row_hi >= row_lo, tl.maximum(end, 0), 0)
    full = tl.minimum(tl.maximum(full, 0) // BLOCK_N * BLOCK_N, end)
    lo = 0
    mid = 0
    if WINDOW:  # row i sees keys from i + causal_off - window
        mid = tl.minimum(tl.cdiv(tl.maximum(row_hi + causal_off - window, 0), BLOCK_N) * BLOCK_N, end)
        lo = tl.minimum(tl.maximum(row_lo + causal_off - window, 0) // BLOCK_N * BLOCK_N, mid)
    return lo, mid, full, end


@triton.jit
def visible_keys(rows, cols, Nk, causal_off, window, CAUSAL: tl.constexpr, WINDOW: tl.constexpr):
    """[M, N] (or [1, N]) bool: key cols[n] exists and is visible to query row rows[m] (causal: up to the
    row's own position rows + causal_off; window: from window keys before it)."""
    visible = (cols < Nk)[None, :]
    if CAUSAL:
        visible = visible & (cols[None, :] <= rows[:, None] + causal_off)
    if WINDOW:
        visible = visible & (cols[None, :] >= rows[:, None] + (causal_off - window))
    return visible


@triton.jit
def online_softmax(m_i, l_i, qk, MASKED: tl.constexpr):
    """Fold a tile of log2-domain logits qk [M, N] (-inf = invisible) into the running row max m_i and
    sum l_i. Returns (m, l, p, alpha): p = exp2(qk - m); alpha rescales what was accumulated before."""
    m_new = tl.maximum(m_i, tl.max(qk, 1))
    m_sub = m_new
    if MASKED:  # a row with no visible key so far keeps m = -inf; subtract 0 (-inf - -inf is NaN)
        m_sub = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.math.exp2(qk - m_sub[:, None])
    alpha = tl.math.exp2(m_i - m_sub)
    return m_new, l_i * alpha + tl.sum(p, 1), p, alpha


@triton.jit
def add_sink(m_i, l_i, sink):
    """Fold a log2-domain sink logit (a key without value) into the running max and sum. Returns
    (m, l, alpha) with alpha rescaling what was accumulated before."""
    m_new = tl.maximum(m_i, sink)
    m_sub = tl.where(m_new == float("-inf"), 0.0, m_new)  # a -inf sink on a row without keys
    alpha = tl.math.exp2(m_i - m_sub)
    return m_new, l_i * alpha + tl.math.exp2(sink - m_sub), alpha


@triton.jit
def finish_lse(m_i, l_i):
    """Natural-log LSE from the log2-domain running max and sum; -inf for rows without visible keys."""
    return tl.where(l_i == 0.0, float("-inf"), (m_i + tl.math.log2(tl.where(l_i == 0.0, 1.0, l_i))) * LN2)
