"""What the compiled CUDA kernels (vtattn._C, csrc/cuda/) accept.

Each function returns None when the kernel runs the inputs, else a one-line reason. Pure Python:
the device capability is read at call time, never at import. Inputs may have any strides (the
launchers copy a tensor whose last dim is not unit-stride or whose rows are not 16-byte aligned).
"""
import torch

FEW_ROWS = 16  # key_importance: at most this many rows take the SIMT path that also runs fp32
MAX_GRID_YZ = 65535
_HALF = (torch.float16, torch.bfloat16)


def _device_reason(q: torch.Tensor) -> str | None:
    if not q.is_cuda:
        return "CUDA kernels need CUDA tensors"
    major, minor = torch.cuda.get_device_capability(q.device)
    if major < 8:
        return f"CUDA kernels need compute capability >= 8.0 (mma.sync, cp.async), device has {major}.{minor}"
    archs = _built_archs()
    if archs and not any(_runs_on(a, major, minor) for a in archs):
        return f"vtattn._C has no code for compute capability {major}.{minor} (built for {', '.join(archs)})"
    return None


def _built_archs() -> list[str]:
    from ._ext import build_info
    return list(build_info().get("cuda_archs") or [])


def _runs_on(arch: str, major: int, minor: int) -> bool:
    """Whether SASS built for `arch` ("80", "90a") runs on compute capability major.minor."""
    digits = arch.rstrip("af")
    if not digits.isdigit():
        return False
    a_major, a_minor = divmod(int(digits), 10)
    if arch != digits:  # arch-specific targets (90a) run on that exact capability only
        return (a_major, a_minor) == (major, minor)
    return a_major == major and a_minor <= minor


def _shape_reason(q: torch.Tensor, k: torch.Tensor) -> str | None:
    if q.dim() != 4 or k.dim() != 4:
        return "CUDA kernels take [B, H, N, D] tensors"
    d = q.shape[-1]
    if d % 8 or not 0 < d <= 128:
        return f"CUDA kernels need a head dim that is a multiple of 8 and at most 128, got {d}"
    if q.shape[0] > MAX_GRID_YZ or q.shape[1] > MAX_GRID_YZ:
        return f"CUDA kernels need batch and query heads <= {MAX_GRID_YZ}, got {tuple(q.shape[:2])}"
    if max(q.shape[2], k.shape[2]) >= 2**31 - 1:
        return "CUDA kernels need sequence lengths that fit in int32"
    return None


# The limits below mirror the launch plans of csrc/include/launch_plan.h, which the CUDA launchers
# enforce (they raise) and `python -m vtattn.check_launches` checks; tests/test_check_launches.py
# compares these functions with the plans on each architecture's limits.
#
# The flash kernel (csrc/include/flash_fwd.cuh) stages a BM x (DP + 8) Q tile and two K and two V
# stages of BN x (DP + 8) halves in shared memory (plus IndexTile's key positions). At DP = 128
# that is 104448 bytes, more than the 99 KiB a block may opt in to on sm_86 / sm_89 (A10, A40, L4,
# L40, RTX 30xx / 40xx): refuse there and let Triton run it.
FLASH_BM, FLASH_BN = 128, 64
INDEX_EXTRA_SMEM = 2 * FLASH_BN * 8  # IndexTile: int64 key positions, two stages


def flash_smem_bytes(d: int, extra: int = 0) -> int:
    """Dynamic shared memory of the flash kernel (out + lse) for head dim d."""
    dp = 64 if d <= 64 else 80 if d <= 80 else 128
    return (FLASH_BM + 4 * FLASH_BN) * (dp + 8) * 2 + extra


def _smem_optin(device: torch.device | str) -> int | None:
    """Bytes of shared memory a block may opt in to (None: a torch too old to say; the launch reports it)."""
    return getattr(torch.cuda.get_device_properties(device), "shared_memory_per_block_optin", None)


def _flash_smem_reason(device: torch.device | str, d: int, extra: int = 0) -> str | None:
    need = flash_smem_bytes(d, extra)
    have = _smem_optin(device)
    if have is not None and need > have:
        return (f"CUDA flash kernel needs {need} bytes of shared memory per block for head dim {d}, "
                f"the device allows {have}")
    return None


def _sinks_reason(q: torch.Tensor, sinks: torch.Tensor | None) -> str | None:
    """The kernels read sinks as fp32 [Hq] in place (the public functions convert them)."""
    if sinks is None:
        return None
    if sinks.device != q.device or sinks.dtype != torch.float32 or sinks.dim() != 1 or not sinks.is_contiguous():
        return "CUDA kernels need sinks as a contiguous float32 [Hq] tensor on q's device"
    return None


def attention_supports(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, scale: float,
                       softcap: float = 0.0, window: int = -1, sinks: torch.Tensor | None = None) -> str | None:
    """fp16/bf16 on tensor cores, head dims that are multiples of 8 up to 128 (64/72/80/128 ...),
    GQA, causal (end-aligned), softcap, left window, sinks, any strides, compute capability >= 8.0."""
    if q.dtype not in _HALF:
        return "CUDA kernel runs fp16/bf16 on tensor cores; fp32 goes to Triton"
    return (_device_reason(q) or _shape_reason(q, k) or _sinks_reason(q, sinks)
            or _flash_smem_reason(q.device, q.shape[-1]))


def key_importance_supports(q: torch.Tensor, k: torch.Tensor, lse: torch.Tensor | None, rows: torch.Tensor | None,
                            causal: bool, scale: float, softcap: float = 0.0, window: int = -1,
                            sinks: torch.Tensor | None = None) -> str | None:
    """At most 16 rows (rows [B, R] with R <= 16, or Nq <= 16 for all rows): fp16/bf16/fp32 (SIMT,
    one read of K, Nk up to 65535 chunks of 16..128 keys). More rows: fp16/bf16 on tensor cores.
    Head dims that are multiples of 8 up to 128; GQA; causal; softcap, left window, sinks; lse given
    or not; any strides."""
    if q.dtype not in _HALF + (torch.float32,):
        return f"CUDA kernels run fp16/bf16/fp32, got {q.dtype}"
    if (reason := _sinks_reason(q, sinks)) is not None:
        return reason
    n_rows = rows.shape[1] if rows is not None else q.shape[2]
    if q.dtype == torch.float32 and n_rows > FEW_ROWS:
        return (f"CUDA kernels run fp32 only for at most {FEW_ROWS} rows (got {n_rows}); "
                "more rows run fp16/bf16 on tensor cores, fp32 goes to Triton")
    reason = _device_reason(q) or _shape_reason(q, k)
    if reason is None and q.shape[0] * q.shape[1] >= _INT32:
        return "CUDA kernels need B * Hq that fits in int32 (a CTA per query head on grid x)"
    if reason is None and n_rows <= FEW_ROWS:
        # The few-rows kernel puts key chunks on grid y: 128 threads, 8 keys each, shared by
        # 8/16/32 threads per key (one 16-byte piece of the key row each).
        pieces = q.shape[-1] * q.element_size() // 16
        keys_per_chunk = 128 // (8 if pieces <= 8 else 16 if pieces <= 16 else 32) * 8
        if -(-k.shape[2] // keys_per_chunk) > MAX_GRID_YZ:
            return f"CUDA few-rows kernel takes at most {MAX_GRID_YZ * keys_per_chunk} keys, got {k.shape[2]}"
    return reason


# ---- token selection (csrc/cuda/select_tokens.cu, gather_tokens.cu, merge_tokens.cu) ----
_FLOATS = _HALF + (torch.float32, torch.float64)
MAX_SEGMENTS = 256  # select_tokens: one thread per segment sums the budgets (and a by-value table)
MAX_SEGMENT_LEN = 16384  # select_tokens: a segment's keys and kept list in shared memory (8 bytes/token)
SELECT_STATIC_SMEM = 4096  # a bound of the kernel's static shared memory (plan::kSelectStaticSmem)
_INT32 = 2**31 - 1


def select_max_segment(smem_optin: int) -> int:
    """The longest segment select_tokens' CUDA kernel holds with `smem_optin` bytes of shared memory
    per block (plan::select_max_segment): 16384 on sm_80 / sm_90, 12160 on sm_86 / sm_89."""
    return min(MAX_SEGMENT_LEN, max(0, (smem_optin - SELECT_STATIC_SMEM) // 8))


def select_tokens_supports(scores: torch.Tensor, budgets: torch.Tensor, segments: list[int], max_keep: int, sort: bool
                           ) -> str | None:
    """Any float scores; up to 256 segments of at most 16384 tokens each; B <= 65535; any strides.
    Radix select per (sample, segment): O(L) per segment of L tokens."""
    if scores.dtype not in _FLOATS:
        return f"CUDA kernel takes floating scores, got {scores.dtype}"
    if len(segments) > MAX_SEGMENTS:
        return f"CUDA kernel takes at most {MAX_SEGMENTS} segments, got {len(segments)}"
    if max(segments, default=0) > MAX_SEGMENT_LEN:
        return f"CUDA kernel takes segments of at most {MAX_SEGMENT_LEN} tokens (shared memory), got {max(segments)}"
    if scores.shape[0] > MAX_GRID_YZ:
        return f"CUDA kernel takes batch <= {MAX_GRID_YZ}, got {scores.shape[0]}"
    reason = _device_reason(scores)
    optin = _smem_optin(scores.device) if reason is None else None
    if optin is not None and max(segments, default=0) > select_max_segment(optin):
        return (f"CUDA kernel takes segments of at most {select_max_segment(optin)} tokens on this device "
                f"(shared memory), got {max(segments)}")
    return reason


def gather_tokens_supports(x: torch.Tensor, indices: torch.Tensor, cu_seqlens: torch.Tensor | None, total: int
                           ) -> str | None:
    """Any dtype and strides (16-byte copies when rows allow); N and K below 2^31."""
    if max(x.shape[1], indices.shape[1]) >= _INT32:
        return "CUDA kernel needs N and K that fit in int32"
    rows = (total if x.shape[0] else 0) if cu_seqlens is not None else x.shape[0] * indices.shape[1]
    if -(-rows // 4) > _INT32:  # a warp per row, 4 per block on grid x
        return f"CUDA kernel copies at most {4 * _INT32} rows, got {rows}"
    return _device_reason(x)


def merge_tokens_supports(x: torch.Tensor, keys: torch.Tensor, indices: torch.Tensor, mask: torch.Tensor, weighted: bool
                          ) -> str | None:
    """Any float x and keys (dtypes may differ), any strides; B <= 65535; sizes below 2^31."""
    if x.dtype not in _FLOATS or keys.dtype not in _FLOATS:
        return f"CUDA kernels take floating x and keys, got {x.dtype} and {keys.dtype}"
    if x.shape[0] > MAX_GRID_YZ:
        return f"CUDA kernels take batch <= {MAX_GRID_YZ}, got {x.shape[0]}"
    if max(x.shape[1], x.shape[2], keys.shape[2], indices.shape[1]) >= _INT32:
        return "CUDA kernels need sizes that fit in int32"
    return _device_reason(x)


# ---- decode attention (csrc/cuda/decode_attention.cu) ----
DECODE_MAX_GROUP = 8  # query heads per kv head held in one CTA's registers


def decode_attention_supports(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, lengths: torch.Tensor,
                              scale: float) -> str | None:
    """fp16/bf16/fp32 (SIMT, 16-byte loads), head dims that are multiples of 8 up to 128, at most 8
    query heads per kv head, any strides (a cache whose rows are not 16-byte aligned is copied)."""
    return _decode_reason(q, k_cache.shape[1], k_cache.shape[2])


def _decode_reason(q: torch.Tensor, hkv: int, cap: int) -> str | None:
    """What the split-KV decode kernel needs: B * Hkv programs over `cap` key slots, B * Hq merges."""
    if q.dtype not in _HALF + (torch.float32,):
        return f"CUDA kernel runs fp16/bf16/fp32, got {q.dtype}"
    group = q.shape[1] // max(hkv, 1)
    if group > DECODE_MAX_GROUP:
        return f"CUDA kernel takes at most {DECODE_MAX_GROUP} query heads per kv head, got {group} (Triton runs it)"
    d = q.shape[-1]
    if d % 8 or not 0 < d <= 128:
        return f"CUDA kernel needs a head dim that is a multiple of 8 and at most 128, got {d}"
    if max(q.shape[0] * q.shape[1], cap) >= _INT32:  # the merge kernel: a CTA per query head
        return "CUDA kernel needs B * Hq and the cache capacity to fit in int32"
    return _device_reason(q)


def paged_decode_attention_supports(q: torch.Tensor, k_pages: torch.Tensor, v_pages: torch.Tensor,
                                    block_table: torch.Tensor, lengths: torch.Tensor, scale: float) -> str | None:
    """decode_attention's kernel with a page-table address path: the same dtypes, head dims and
    groups; any page size and pool strides (a pool whose rows are not 16-byte aligned is copied)."""
    if k_pages.dim() != 3 or block_table.dim() != 3:
        return "CUDA kernel takes [num_pages, page_size, D] pools and a [B, Hkv, max_pages] table"
    _, hkv, max_pages = block_table.shape
    return _decode_reason(q, hkv, max_pages * k_pages.shape[1])


def paged_append_supports(k_pages: torch.Tensor, v_pages: torch.Tensor, pos: torch.Tensor, next_slot: torch.Tensor,
                          lengths: torch.Tensor, k: torch.Tensor, v: torch.Tensor, start: torch.Tensor,
                          last: torch.Tensor | None, score: torch.Tensor | None) -> str | None:
    """fp16/bf16/fp32 pools and rows of one dtype, any strides (16-byte copies when the rows allow); a
    CTA per (batch, head) on grid x (plan::paged_append); start on k's device, or the CPU (read at launch)."""
    if k.dtype not in _HALF + (torch.float32,) or {k_pages.dtype, v_pages.dtype, v.dtype} != {k.dtype}:
        return f"CUDA kernel copies fp16/bf16/fp32 of one dtype, got pools {k_pages.dtype} and rows {k.dtype}"
    if k.dim() != 4 or k.shape[0] * k.shape[1] > _INT32:
        return "CUDA kernel takes k [B, H, n, D] with B * H that fits in int32 (a CTA per head on grid x)"
    if start.device.type != "cpu" and start.device != k.device:
        return f"CUDA kernel reads start on k's device or the CPU, got {start.device}"
    return _device_reason(k)


# ---- varlen and index attention (csrc/cuda/varlen_attention.cu, index_attention.cu) ----
# The flash kernel of `attention` with other row/key addressing: the same dtypes and head dims.

def varlen_attention_supports(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens_q: torch.Tensor,
                              cu_seqlens_k: torch.Tensor, max_seqlen_q: int, causal: bool, scale: float,
                              softcap: float = 0.0, window: int = -1, sinks: torch.Tensor | None = None) -> str | None:
    """fp16/bf16 on tensor cores, packed [T, H, D] with head dims that are multiples of 8 up to 128,
    GQA, causal (end-aligned per sequence), softcap, left window, sinks, any strides; at most 65535
    sequences."""
    if q.dtype not in _HALF:
        return "CUDA kernel runs fp16/bf16 on tensor cores; fp32 goes to Triton"
    if q.dim() != 3 or k.dim() != 3:
        return "CUDA kernel takes packed [T, H, D] tensors"
    for name, cu in (("cu_seqlens_q", cu_seqlens_q), ("cu_seqlens_k", cu_seqlens_k)):
        if cu.device != q.device or cu.dtype != torch.int32:
            return f"CUDA kernel needs {name} as int32 on q's device"
    if cu_seqlens_q.numel() - 1 > MAX_GRID_YZ:
        return f"CUDA kernel takes at most {MAX_GRID_YZ} sequences, got {cu_seqlens_q.numel() - 1}"
    if max_seqlen_q >= _INT32:
        return "CUDA kernel needs max_seqlen_q that fits in int32"
    return (_device_reason(q) or _shape_reason(q.transpose(0, 1)[None], k.transpose(0, 1)[None])
            or _sinks_reason(q, sinks) or _flash_smem_reason(q.device, q.shape[-1]))


def index_attention_supports(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_indices: torch.Tensor,
                             kv_counts: torch.Tensor, q_positions: torch.Tensor, kv_positions: torch.Tensor,
                             causal: bool, scale: float) -> str | None:
    """fp16/bf16 on tensor cores, head dims that are multiples of 8 up to 128, GQA, causal by
    original positions, any strides; int64 indices / positions and int32 counts on q's device."""
    if q.dtype not in _HALF:
        return "CUDA kernel runs fp16/bf16 on tensor cores; fp32 goes to Triton"
    for name, t, dtype in (("kv_indices", kv_indices, torch.int64), ("kv_counts", kv_counts, torch.int32),
                           ("q_positions", q_positions, torch.int64), ("kv_positions", kv_positions, torch.int64)):
        if t.device != q.device or t.dtype != dtype:
            return f"CUDA kernel needs {name} as {dtype} on q's device"
    if kv_indices.dim() == 3 and kv_indices.shape[2] >= _INT32:
        return "CUDA kernel needs an index list length L that fits in int32"
    return _device_reason(q) or _shape_reason(q, k) or _flash_smem_reason(q.device, q.shape[-1], INDEX_EXTRA_SMEM)


# ---- block_sparse_attention (csrc/cuda/block_sparse_attention.cu): the flash kernel, BlockSparseTile ----

def block_sparse_attention_supports(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_num_blocks: torch.Tensor,
                                    kv_indices: torch.Tensor, block_size: int, causal: bool, scale: float
                                    ) -> str | None:
    """fp16/bf16 on tensor cores, head dims that are multiples of 8 up to 128, GQA, causal, any strides;
    block_size a multiple of 128 (the kernel's query tile: a tile's rows share one list), int32 lists on
    q's device (plan::block_sparse_attention)."""
    if q.dtype not in _HALF:
        return "CUDA kernel runs fp16/bf16 on tensor cores; fp32 goes to Triton"
    if block_size % FLASH_BM:
        return f"CUDA kernel needs a block_size that is a multiple of {FLASH_BM}, got {block_size} (Triton runs it)"
    for name, t in (("kv_num_blocks", kv_num_blocks), ("kv_indices", kv_indices)):
        if t.device != q.device or t.dtype != torch.int32:
            return f"CUDA kernel needs {name} as int32 on q's device"
    if -(-k.shape[2] // block_size) * block_size >= _INT32 - 2048:
        return "CUDA kernel needs K_blocks * block_size below 2^31 - 2048"
    return _device_reason(q) or _shape_reason(q, k) or _flash_smem_reason(q.device, q.shape[-1])
