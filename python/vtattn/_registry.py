"""The torch.ops.vtattn ops: one definition each, a fake impl (meta tensors, torch.compile),
and one CPU/CUDA impl that dispatches to the first backend supporting the inputs."""
import importlib
from collections.abc import Callable, Hashable
from types import ModuleType
from typing import Any

import torch

from . import _aten, _autograd, _ext, reference
from ._dispatch import Backend, run, signature

_lib = torch.library.Library("vtattn", "DEF")  # type: ignore[no-untyped-call]  # unannotated in torch
OPS: dict[str, dict[str, Backend]] = {}  # op name -> its backends, filled by _define
# op name -> what its backends' supports() read of growing lengths besides zero and the int32 limit
# (`_dispatch.Direct` keys its choice by it; the op's own key, shape_class, includes it)
RELATIONS: dict[str, Callable[[tuple[Any, ...]], Hashable]] = {}
# op name -> (device, dtype) -> small args, for `vtattn info`
SAMPLES: dict[str, Callable[[torch.device | str, torch.dtype], tuple[Any, ...]]] = {}
# op name -> its fake impl, which the vtattn._C op of the same schema takes too (`kernel_ops`)
FAKES: dict[str, Callable[..., Any]] = {}
_KERNELS: list[tuple[torch.library.Library, frozenset[str]]] = []  # made once: (their library, the ops)


def kernel_ops() -> frozenset[str]:
    """The vtattn._C ops a compiled graph may call in place of their public op (`_dispatch.Direct`):
    those a `Backend.kernel` names whose schema is the public op's, each given the public op's fake
    impl here (once; eagerly: `Direct.prepare`). Empty when vtattn._C is not loaded."""
    if not _KERNELS:
        if _ext.load() is not None:
            return frozenset()
        lib = torch.library.Library("vtattn_C", "FRAGMENT")  # type: ignore[no-untyped-call]
        ops = set()
        for op in sorted({b.kernel for backends in OPS.values() for b in backends.values() if b.kernel}):
            kernel, public = (str(getattr(getattr(torch.ops, ns), op).default._schema).split("::", 1)[1]
                              for ns in ("vtattn_C", "vtattn"))
            if kernel == public:  # (an int where the public op takes a SymInt would not trace the same)
                torch.library.register_fake(f"vtattn_C::{op}", FAKES[op], lib=lib)
                ops.add(op)
        _KERNELS.append((lib, frozenset(ops)))  # (a Library's registrations last as long as it does)
    return _KERNELS[0][1]


def _triton(op: str) -> ModuleType:
    """The launcher module of a Triton op, imported on first use (triton is optional)."""
    return importlib.import_module(f"vtattn.triton_kernels.{op}")


def _compiled(op: str, device_type: str) -> Backend:
    """Backend for the vtattn._C kernel of `op` on one device type; what the CUDA kernels
    accept is declared in vtattn._cuda_caps."""

    def supports(*args: Any) -> str | None:
        t = args[0]
        if t.device.type != device_type:
            return f"tensors are on {t.device.type}, this backend runs {device_type} tensors"
        reason = _ext.has_kernel(op, device_type)
        if reason is None and device_type == "cuda":
            reason = getattr(importlib.import_module("vtattn._cuda_caps"), f"{op}_supports")(*args)
        return reason

    def run_(*args: Any) -> Any:
        return getattr(torch.ops.vtattn_C, op)(*args)

    return Backend(supports, run_, op)


def _reference(fn: Callable[..., Any]) -> Backend:
    """The pure-PyTorch specification as a backend: it runs every input."""
    return Backend(lambda *args: None, fn)


def _triton_backend(op: str) -> Backend:
    def supports(*args: Any) -> str | None:
        try:
            mod = _triton(op)
        except ImportError as e:
            return f"Triton kernels unavailable: {e}"
        reason: str | None = mod.supports(*args)
        return reason

    return Backend(supports, lambda *args: getattr(_triton(op), op)(*args))


def _define(op: str, schema: str, backends: dict[str, Backend], fake: Callable[..., Any],
            sample: Callable[[torch.device | str, torch.dtype], tuple[Any, ...]], grad: bool = True,
            shape_class: Callable[[tuple[Any, ...]], Hashable] | None = None,
            relation: Callable[[tuple[Any, ...]], Hashable] | None = None) -> dict[str, Backend]:
    """Define torch.ops.vtattn.<op>: schema, fake impl, and a CPU/CUDA impl that dispatches.
    `sample(device, dtype)` builds small arguments on which `vtattn info` asks each backend.
    grad: register the op's autograd (its backward, or the refusal of grad-requiring inputs; see
    _autograd); False for ops whose outputs carry no gradient by nature (indices, masks).
    shape_class: args -> the key the backend choice is cached under (default: `_dispatch.signature`);
    relation: args -> what supports() reads of the growing lengths (see RELATIONS), in that key."""
    _lib.define(schema)  # type: ignore[no-untyped-call]
    name = f"vtattn::{op}"
    torch.library.register_fake(name, fake, lib=_lib)
    FAKES[op] = fake
    if grad:
        _autograd.register(op, _lib)

    def impl(*args: Any) -> Any:
        return run(op, backends, *args, shape_class=shape_class)

    for key in ("CPU", "CUDA"):
        _lib.impl(op, impl, key)  # type: ignore[no-untyped-call]
    OPS[op] = backends
    SAMPLES[op] = sample
    if relation is not None:
        RELATIONS[op] = relation
    return backends


def token_major(out: torch.Tensor) -> torch.Tensor:
    """`out` in the layout every attention op returns: [B, H, N, D] viewed over [B, N, H, D]
    memory (SDPA's kernels write it; transformers' next step then needs no copy)."""
    if out.transpose(1, 2).is_contiguous():
        return out
    B, H, N, D = out.shape
    return out.new_empty(B, N, H, D).transpose(1, 2).copy_(out)


def _token_major_out(fn: Callable[..., tuple[torch.Tensor, torch.Tensor]]
                     ) -> Callable[..., tuple[torch.Tensor, torch.Tensor]]:
    def run_(*args: Any) -> Any:
        out, lse = fn(*args)
        return token_major(out), lse
    return run_


def _sample_qkv(device: torch.device | str, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    q = torch.zeros(1, 2, 16, 64, device=device, dtype=dtype)
    k = torch.zeros(1, 2, 32, 64, device=device, dtype=dtype)
    return q, k, k


# ---- attention -----------------------------------------------------------------------------

def _attention_fake(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, scale: float, softcap: float,
                    window: int, sinks: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    B, H, N, D = q.shape
    return q.new_empty(B, N, H, D).transpose(1, 2), q.new_empty(B, H, N, dtype=torch.float32)


def _same_rows(args: tuple[Any, ...]) -> tuple[bool, bool]:
    """Nq == Nk, Nq == 1: where a causal mask's top-left and end alignments agree."""
    nq = args[0].shape[2]
    return nq == args[1].shape[2], nq == 1


def _with_layout(backend: Backend) -> Backend:
    return Backend(backend.supports, _token_major_out(backend.run))  # (not the kernel's own result)


ATTENTION = _define(
    "attention",
    "attention(Tensor q, Tensor k, Tensor v, bool causal, float scale, float softcap, int window, Tensor? sinks) "
    "-> (Tensor, Tensor)",
    {
        "aten": _with_layout(Backend(_aten.attention_supports, _aten.attention)),
        "cuda": _with_layout(_compiled("attention", "cuda")),
        "cpp": _with_layout(_compiled("attention", "cpu")),
        "triton": _with_layout(_triton_backend("attention")),
        "torch": _with_layout(_reference(reference.attention)),
    },
    _attention_fake,
    lambda device, dtype: (*_sample_qkv(device, dtype), False, 0.125, 0.0, -1, None),
    # Keys grow while decoding; supports() reads them only as Nk == 0, the int32 limit and (aten: a causal
    # call's top-left alignment) Nq == Nk or Nq == 1.
    shape_class=lambda args: (signature(args, {1: (2,), 2: (2,)}), _same_rows(args)),
    relation=_same_rows,
)


# ---- key_importance ------------------------------------------------------------------------

def _key_importance_fake(q: torch.Tensor, k: torch.Tensor, lse: torch.Tensor | None, rows: torch.Tensor | None,
                         causal: bool, scale: float, softcap: float, window: int, sinks: torch.Tensor | None
                         ) -> torch.Tensor:
    return q.new_empty(q.shape[0], q.shape[1], k.shape[2], dtype=torch.float32)


KEY_IMPORTANCE = _define(
    "key_importance",
    "key_importance(Tensor q, Tensor k, Tensor? lse, Tensor? rows, bool causal, float scale, float softcap, "
    "int window, Tensor? sinks) -> Tensor",
    {
        "cuda": _compiled("key_importance", "cuda"),
        "cpp": _compiled("key_importance", "cpu"),
        "triton": _triton_backend("key_importance"),
        "torch": _reference(reference.key_importance),
    },
    _key_importance_fake,
    lambda device, dtype: (*_sample_qkv(device, dtype)[:2], None, None, False, 0.125, 0.0, -1, None),
)


# ---- select_tokens -------------------------------------------------------------------------

def _select_tokens_fake(scores: torch.Tensor, budgets: torch.Tensor, segments: list[int], max_keep: int, sort: bool
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    B, N = scores.shape
    return (scores.new_empty(B, max_keep, dtype=torch.int64), scores.new_empty(B, N, dtype=torch.bool),
            scores.new_empty(B, dtype=torch.int64))


SELECT_TOKENS = _define(
    "select_tokens",
    "select_tokens(Tensor scores, Tensor budgets, int[] segments, SymInt max_keep, bool sort) "
    "-> (Tensor, Tensor, Tensor)",
    {
        "cuda": _compiled("select_tokens", "cuda"),
        "cpp": _compiled("select_tokens", "cpu"),
        "triton": _triton_backend("select_tokens"),
        "torch": _reference(reference.select_tokens),
    },
    _select_tokens_fake,
    lambda device, dtype: (torch.zeros(2, 64, device=device, dtype=dtype),
                           torch.full((2, 2), 4, dtype=torch.int64, device=device), [32, 32], 8, True),
    grad=False,  # indices, a mask and counts
)


# ---- gather_tokens ------------------------------------------------------------------------

def _gather_tokens_fake(x: torch.Tensor, indices: torch.Tensor, cu_seqlens: torch.Tensor | None, total: int
                        ) -> torch.Tensor:
    if cu_seqlens is None:
        return x.new_empty(x.shape[0], indices.shape[1], x.shape[2])
    return x.new_empty(total, x.shape[2])


GATHER_TOKENS = _define(
    "gather_tokens",
    "gather_tokens(Tensor x, Tensor indices, Tensor? cu_seqlens, SymInt total) -> Tensor",
    {
        "cuda": _compiled("gather_tokens", "cuda"),
        "cpp": _compiled("gather_tokens", "cpu"),
        "triton": _triton_backend("gather_tokens"),
        "torch": _reference(reference.gather_tokens),
    },
    _gather_tokens_fake,
    lambda device, dtype: (torch.zeros(2, 64, 32, device=device, dtype=dtype),
                           torch.arange(8, device=device).expand(2, 8), None, 0),
)


# ---- merge_tokens -------------------------------------------------------------------------

def _merge_tokens_fake(x: torch.Tensor, keys: torch.Tensor, indices: torch.Tensor, mask: torch.Tensor, weighted: bool
                       ) -> torch.Tensor:
    return x.new_empty(x.shape[0], indices.shape[1], x.shape[2])


MERGE_TOKENS = _define(
    "merge_tokens",
    "merge_tokens(Tensor x, Tensor keys, Tensor indices, Tensor mask, bool weighted) -> Tensor",
    {
        "cuda": _compiled("merge_tokens", "cuda"),
        "cpp": _compiled("merge_tokens", "cpu"),
        "triton": _triton_backend("merge_tokens"),
        "torch": _reference(reference.merge_tokens),
    },
    _merge_tokens_fake,
    lambda device, dtype: (torch.zeros(2, 64, 32, device=device, dtype=dtype),
                           torch.zeros(2, 64, 16, device=device, dtype=dtype),
                           torch.arange(8, device=device).expand(2, 8),
                           (torch.arange(64, device=device) < 8).expand(2, 64), False),
)


# ---- varlen_attention ----------------------------------------------------------------------

def _varlen_attention_fake(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens_q: torch.Tensor,
                           cu_seqlens_k: torch.Tensor, max_seqlen_q: int, causal: bool, scale: float, softcap: float,
                           window: int, sinks: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    return q.new_empty(q.shape), q.new_empty(q.shape[1], q.shape[0], dtype=torch.float32)


def _sample_varlen(device: torch.device | str, dtype: torch.dtype) -> tuple[Any, ...]:
    q = torch.zeros(24, 2, 64, device=device, dtype=dtype)
    cu = torch.tensor([0, 8, 24], dtype=torch.int32, device=device)
    return q, q, q, cu, cu, 16, False, 0.125, 0.0, -1, None


VARLEN_ATTENTION = _define(
    "varlen_attention",
    "varlen_attention(Tensor q, Tensor k, Tensor v, Tensor cu_seqlens_q, Tensor cu_seqlens_k, SymInt max_seqlen_q, "
    "bool causal, float scale, float softcap, int window, Tensor? sinks) -> (Tensor, Tensor)",
    {
        "cuda": _compiled("varlen_attention", "cuda"),
        "cpp": _compiled("varlen_attention", "cpu"),
        "triton": _triton_backend("varlen_attention"),
        "torch": _reference(reference.varlen_attention),
    },
    _varlen_attention_fake,
    _sample_varlen,
)


# ---- index_attention -----------------------------------------------------------------------

def _index_attention_fake(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_indices: torch.Tensor,
                          kv_counts: torch.Tensor, q_positions: torch.Tensor, kv_positions: torch.Tensor, causal: bool,
                          scale: float) -> torch.Tensor:
    B, H, N, D = q.shape
    return q.new_empty(B, N, H, D).transpose(1, 2)


def _sample_index(device: torch.device | str, dtype: torch.dtype) -> tuple[Any, ...]:
    q, k, v = _sample_qkv(device, dtype)
    idx = torch.arange(0, 32, 2, device=device).expand(1, 2, 16).contiguous()
    counts = torch.full((1, 2), 16, dtype=torch.int32, device=device)
    return (q, k, v, idx, counts, torch.arange(16, 32, device=device)[None], torch.arange(32, device=device)[None],
            False, 0.125)


INDEX_ATTENTION = _define(
    "index_attention",
    "index_attention(Tensor q, Tensor k, Tensor v, Tensor kv_indices, Tensor kv_counts, Tensor q_positions, "
    "Tensor kv_positions, bool causal, float scale) -> Tensor",
    {
        "cuda": _compiled("index_attention", "cuda"),
        "cpp": Backend(_compiled("index_attention", "cpu").supports,
                       lambda *a: token_major(torch.ops.vtattn_C.index_attention(*a))),
        "triton": _triton_backend("index_attention"),
        "torch": Backend(lambda *a: None, lambda *a: token_major(reference.index_attention(*a))),
    },
    _index_attention_fake,
    _sample_index,
    shape_class=lambda args: signature(args, {1: (2,), 2: (2,), 3: (2,), 6: (1,)}),  # keys and their lists grow
)


# ---- decode_attention ---------------------------------------------------------------------

def _decode_attention_fake(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, lengths: torch.Tensor,
                           scale: float) -> torch.Tensor:
    return torch.empty_like(q, memory_format=torch.contiguous_format)


DECODE_ATTENTION = _define(
    "decode_attention",
    "decode_attention(Tensor q, Tensor k_cache, Tensor v_cache, Tensor lengths, float scale) -> Tensor",
    {
        "cuda": _compiled("decode_attention", "cuda"),
        "cpp": _compiled("decode_attention", "cpu"),
        "triton": _triton_backend("decode_attention"),
        "torch": _reference(reference.decode_attention),
    },
    _decode_attention_fake,
    lambda device, dtype: (torch.zeros(2, 4, 1, 64, device=device, dtype=dtype),
                           *[torch.zeros(2, 2, 32, 64, device=device, dtype=dtype)] * 2,
                           torch.full((2, 2), 17, dtype=torch.int32, device=device), 0.125),
    shape_class=lambda args: signature(args, {1: (2,), 2: (2,)}),  # the capacity, read only for the int32 limit
)


# ---- block_sparse_attention ----------------------------------------------------------------

def _block_sparse_attention_fake(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_num_blocks: torch.Tensor,
                                 kv_indices: torch.Tensor, block_size: int, causal: bool, scale: float
                                 ) -> tuple[torch.Tensor, torch.Tensor]:
    return _attention_fake(q, k, v, causal, scale, 0.0, -1, None)


def _sample_block_sparse(device: torch.device | str, dtype: torch.dtype) -> tuple[Any, ...]:
    q, k, v = _sample_qkv(device, dtype)  # Nq 16, Nk 32: one query block of 16 over key block 1 of 2
    num = torch.ones(1, 1, 1, dtype=torch.int32, device=device)
    return q, k, v, num, torch.tensor([[[[1, 0]]]], dtype=torch.int32, device=device), 16, False, 0.125


BLOCK_SPARSE_ATTENTION = _define(
    "block_sparse_attention",
    "block_sparse_attention(Tensor q, Tensor k, Tensor v, Tensor kv_num_blocks, Tensor kv_indices, int block_size, "
    "bool causal, float scale) -> (Tensor, Tensor)",
    {
        "cuda": _compiled("block_sparse_attention", "cuda"),
        "cpp": _compiled("block_sparse_attention", "cpu"),
        "triton": _triton_backend("block_sparse_attention"),
        "torch": _with_layout(_reference(reference.block_sparse_attention)),
    },
    _block_sparse_attention_fake,
    _sample_block_sparse,
)


# ---- paged_decode_attention ----------------------------------------------------------------

def _paged_decode_attention_fake(q: torch.Tensor, k_pages: torch.Tensor, v_pages: torch.Tensor,
                                 block_table: torch.Tensor, lengths: torch.Tensor, scale: float) -> torch.Tensor:
    return torch.empty_like(q, memory_format=torch.contiguous_format)


def _sample_paged_decode(device: torch.device | str, dtype: torch.dtype) -> tuple[Any, ...]:
    pages = torch.zeros(8, 16, 64, device=device, dtype=dtype)
    table = torch.arange(8, dtype=torch.int32, device=device).reshape(2, 2, 2)
    return (torch.zeros(2, 4, 1, 64, device=device, dtype=dtype), pages, pages, table,
            torch.full((2, 2), 17, dtype=torch.int32, device=device), 0.125)


PAGED_DECODE_ATTENTION = _define(
    "paged_decode_attention",
    "paged_decode_attention(Tensor q, Tensor k_pages, Tensor v_pages, Tensor block_table, Tensor lengths, "
    "float scale) -> Tensor",
    {
        "cuda": _compiled("paged_decode_attention", "cuda"),
        "cpp": _compiled("paged_decode_attention", "cpu"),
        "triton": _triton_backend("paged_decode_attention"),
        "torch": _reference(reference.paged_decode_attention),
    },
    _paged_decode_attention_fake,
    _sample_paged_decode,
    # The pools and the table grow; supports() reads the capacity only for the int32 limit.
    shape_class=lambda args: signature(args, {1: (0,), 2: (0,), 3: (2,)}),
)


# ---- paged_append ------------------------------------------------------------------------------

def _paged_append_fake(k_pages: torch.Tensor, v_pages: torch.Tensor, pos: torch.Tensor, next_slot: torch.Tensor,
                       lengths: torch.Tensor, k: torch.Tensor, v: torch.Tensor, start: torch.Tensor,
                       last: torch.Tensor | None, score: torch.Tensor | None) -> None:
    return None  # it writes its arguments in place


def _sample_paged_append(device: torch.device | str, dtype: torch.dtype) -> tuple[Any, ...]:
    pages = torch.zeros(8, 16, 64, device=device, dtype=dtype)
    next_slot = torch.arange(0, 128, 32, device=device).view(2, 2)
    return (pages, pages.clone(), torch.full((8, 16), -1, device=device), next_slot,
            torch.zeros(2, 2, dtype=torch.int32, device=device), torch.zeros(2, 2, 1, 64, device=device, dtype=dtype),
            torch.zeros(2, 2, 1, 64, device=device, dtype=dtype), torch.tensor(5, device=device), next_slot + 31,
            torch.zeros(8, 16, device=device))


PAGED_APPEND = _define(
    "paged_append",
    "paged_append(Tensor(a!) k_pages, Tensor(b!) v_pages, Tensor(c!) pos, Tensor(d!) next_slot, Tensor(e!) lengths, "
    "Tensor k, Tensor v, Tensor start, Tensor? last, Tensor(f!)? score) -> ()",
    {
        "cuda": _compiled("paged_append", "cuda"),
        "cpp": _compiled("paged_append", "cpu"),
        "triton": _triton_backend("paged_append"),
        "torch": _reference(reference.paged_append),
    },
    _paged_append_fake,
    _sample_paged_append,
    grad=False,  # a cache write: its inputs are detached (kv.pages.Pages.append)
    shape_class=lambda args: signature(args, {0: (0,), 1: (0,), 2: (0,), 9: (0,)}),  # the pools grow
)


def _mutating_autograd(op: str) -> None:
    """A mutating op takes no register_autograd: its Autograd kernel refuses grad-requiring inputs by
    name (as every op without a gradient does), else runs the op below autograd."""
    overload = getattr(torch.ops.vtattn, op).default

    def run_(*args: Any) -> Any:
        if torch.is_grad_enabled() and any(isinstance(a, torch.Tensor) and a.requires_grad for a in args):
            _autograd._refusal(op)(None, args, None)
        with torch._C._AutoDispatchBelowAutograd():
            return overload(*args)

    _lib.impl(op, run_, "Autograd")  # type: ignore[no-untyped-call]


_mutating_autograd("paged_append")


# ---- paged_decode_step -------------------------------------------------------------------------
# paged_append, then paged_decode_attention: a compressed layer's decode step in one op call (in a
# model's step on CPU each call from Python costs ~12 us, more than either kernel). Its backends are
# the two ops' own kernels: vtattn._C's composite (csrc/ops.cpp) calls them from C++, the Triton
# launcher runs both launchers, the reference composes the references.

def _compiled_step(device_type: str) -> Backend:
    """vtattn._C's composite on one device type: both ops' kernels there, and the composite (an older
    build lacks it)."""
    name = "cpp" if device_type == "cpu" else device_type
    append, decode = PAGED_APPEND[name], PAGED_DECODE_ATTENTION[name]

    def supports(*args: Any) -> str | None:
        q, k_pages, v_pages, pos, next_slot, lengths, k, v, start, last, score, table, scale = args
        return (append.supports(k_pages, v_pages, pos, next_slot, lengths, k, v, start, last, score)
                or decode.supports(q, k_pages, v_pages, table, lengths, scale)
                or _ext.has_kernel("paged_decode_step", "any"))

    return Backend(supports, lambda *args: torch.ops.vtattn_C.paged_decode_step(*args), "paged_decode_step")


def _paged_decode_step_fake(q: torch.Tensor, *args: Any) -> torch.Tensor:
    return torch.empty_like(q, memory_format=torch.contiguous_format)  # (it also writes the cache in place)


def _sample_paged_decode_step(device: torch.device | str, dtype: torch.dtype) -> tuple[Any, ...]:
    append = _sample_paged_append(device, dtype)
    table = torch.arange(8, dtype=torch.int32, device=device).reshape(2, 2, 2)
    return (torch.zeros(2, 4, 1, 64, device=device, dtype=dtype), *append, table, 0.125)


PAGED_DECODE_STEP = _define(
    "paged_decode_step",
    "paged_decode_step(Tensor q, Tensor(a!) k_pages, Tensor(b!) v_pages, Tensor(c!) pos, Tensor(d!) next_slot, "
    "Tensor(e!) lengths, Tensor k, Tensor v, Tensor start, Tensor? last, Tensor(f!)? score, Tensor block_table, "
    "float scale) -> Tensor",
    {
        "cuda": _compiled_step("cuda"),
        "cpp": _compiled_step("cpu"),
        "triton": _triton_backend("paged_decode_step"),
        "torch": _reference(reference.paged_decode_step),
    },
    _paged_decode_step_fake,
    _sample_paged_decode_step,
    grad=False,  # a cache write and its read (kv.pages.Pages.write_args detaches k, v)
    shape_class=lambda args: signature(args, {1: (0,), 2: (0,), 3: (0,), 10: (0,), 11: (2,)}),  # the pools grow
)


_mutating_autograd("paged_decode_step")


# ---- paged_evict -------------------------------------------------------------------------------
# Decode-time H2O eviction (kv.decode.evict) in one op call: the C++ kernel on the CPU, the Triton kernel
# on a GPU (its counts are the host's: copied to the device, never waited for).

def _paged_evict_fake(*args: Any) -> None:
    return None  # it writes its arguments in place


def _sample_paged_evict(device: torch.device | str, dtype: torch.dtype) -> tuple[Any, ...]:
    pages = torch.zeros(8, 16, 64, device=device, dtype=dtype)
    pos = torch.arange(128, device=device).view(8, 16) % 32
    counts = [torch.tensor(c) for c in ([[0, 32], [64, 96]], [[20, 17], [32, 5]], [[18, 17], [30, 5]])]
    return (pages, pages.clone(), pos, torch.zeros(8, 16, device=device),
            torch.zeros(2, 4, 1, 64, device=device, dtype=dtype), *counts, 40, 2, 0.125,
            torch.zeros(2, 2, device=device, dtype=torch.int32), torch.zeros(2, 2, device=device, dtype=torch.int64))


PAGED_EVICT = _define(
    "paged_evict",
    "paged_evict(Tensor(a!) k_pages, Tensor(b!) v_pages, Tensor(c!) pos, Tensor(d!) score, Tensor queries, "
    "Tensor head_start, Tensor lengths, Tensor keep, int start, int recent, float scale, "
    "Tensor(e!)? counts=None, Tensor(f!)? next_slot=None) -> ()",
    {
        "triton": _triton_backend("paged_evict"),
        "cpp": _compiled("paged_evict", "cpu"),
        "torch": _reference(reference.paged_evict),
    },
    _paged_evict_fake,
    _sample_paged_evict,
    grad=False,  # a cache update: its queries are detached (kv.cache.CompressedLayer._decoded)
    shape_class=lambda args: signature(args, {0: (0,), 1: (0,), 2: (0,), 3: (0,)}),  # the pools grow
)


_mutating_autograd("paged_evict")


# ---- paged_evict_step --------------------------------------------------------------------------
# DecodeH2O's decode step on a static cache (kv.decode.StaticEviction) in one op call: the C++ kernel on
# the CPU, the Triton kernel on a GPU (no CUDA kernel of its own).

def _sample_paged_evict_step(device: torch.device | str, dtype: torch.dtype) -> tuple[Any, ...]:
    pages = torch.zeros(4, 4, 64, device=device, dtype=dtype)
    pos = torch.arange(16, device=device).view(4, 4)
    counts = [torch.tensor(c, device=device) for c in ([[0, 4], [8, 12]], [[4, 4], [4, 4]], [[2, 2], [2, 2]])]
    return (pages, pages.clone(), pos, torch.zeros(4, 4, device=device), torch.zeros(2, 4, 1, 64, device=device,
            dtype=dtype), *counts, torch.full((2, 2), 3, dtype=torch.int32, device=device), counts[0] + 3,
            torch.zeros((), dtype=torch.int64, device=device), 2, 1, 4, 0.125)


PAGED_EVICT_STEP = _define(
    "paged_evict_step",
    "paged_evict_step(Tensor(a!) k_pages, Tensor(b!) v_pages, Tensor(c!) pos, Tensor(d!) score, Tensor q, "
    "Tensor head_start, Tensor capacity, Tensor floor, Tensor(e!) lengths, Tensor(f!) next_slot, "
    "Tensor(g!) since, int every, int recent, int width, float scale) -> ()",
    {
        "triton": _triton_backend("paged_evict_step"),
        "cpp": _compiled("paged_evict_step", "cpu"),
        "torch": _reference(reference.paged_evict_step),
    },
    _paged_evict_fake,
    _sample_paged_evict_step,
    grad=False,  # a cache update (kv.cache.CompressedLayer.attend detaches its query)
)


_mutating_autograd("paged_evict_step")


# ---- cmai_step -----------------------------------------------------------------------------
# CMAI's pass 2 for a decode step's text rows (patch.cmai) in one op call: the C++ kernel on the CPU, the
# Triton kernels on a GPU (no CUDA kernel of its own); the prefill runs the reference's chunked matmuls.

def _cmai_step_fake(q: torch.Tensor, *args: Any) -> torch.Tensor:
    return q.new_empty(q.shape, dtype=torch.float32)


def _sample_cmai_step(device: torch.device | str, dtype: torch.dtype) -> tuple[Any, ...]:
    kv = torch.zeros(1, 2, 6, 64, device=device, dtype=dtype)
    at = torch.arange(6, device=device)[None]
    ok = torch.ones(1, 6, dtype=torch.bool, device=device)
    return (torch.zeros(1, 4, 1, 64, device=device, dtype=dtype), kv, kv, at + 6, ok, kv, kv, at, ok,
            torch.zeros(1, 4, 6, 6, device=device), 0.5, 0.0, 0.125)


CMAI_STEP = _define(
    "cmai_step",
    "cmai_step(Tensor q, Tensor k_t, Tensor v_t, Tensor text, Tensor text_ok, Tensor k_i, Tensor v_i, "
    "Tensor image, Tensor image_ok, Tensor(a!) p_ti, float keep, float weight, float scale) -> Tensor",
    {
        "triton": _triton_backend("cmai_step"),
        "cpp": _compiled("cmai_step", "cpu"),
        "torch": _reference(reference.cmai_step),
    },
    _cmai_step_fake,
    _sample_cmai_step,
    grad=False,  # a decode step (patch.cmai runs the differentiable reference where grad is on)
    shape_class=lambda args: signature(args, {1: (2,), 2: (2,), 3: (1,), 4: (1,), 9: (2,)}),  # the text entries grow
)


_mutating_autograd("cmai_step")


# ---- group_attention -----------------------------------------------------------------------

def _group_attention_fake(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, groups: torch.Tensor, num_groups: int,
                          causal: bool, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    B, H, N, D = q.shape
    out = q.new_empty(B, N, H, num_groups, D, dtype=torch.float32).transpose(1, 2)
    return out, q.new_empty(B, H, N, num_groups, dtype=torch.float32)


def _group_major(fn: Callable[..., tuple[torch.Tensor, torch.Tensor]]
                 ) -> Callable[..., tuple[torch.Tensor, torch.Tensor]]:
    """out [B, Hq, Nq, G, D] over [B, Nq, Hq, G, D] memory (token-major, as every attention op)."""
    def run_(*args: Any) -> Any:
        out, mass = fn(*args)
        if not out.transpose(1, 2).is_contiguous():
            out = out.new_empty(out.transpose(1, 2).shape).transpose(1, 2).copy_(out)
        return out, mass
    return run_


def _sample_group(device: torch.device | str, dtype: torch.dtype) -> tuple[Any, ...]:
    q, k, v = _sample_qkv(device, dtype)
    return q, k, v, (torch.arange(32, device=device) % 4 - 1).expand(1, 32).contiguous(), 3, True, 0.125


GROUP_ATTENTION = _define(
    "group_attention",
    "group_attention(Tensor q, Tensor k, Tensor v, Tensor groups, int num_groups, bool causal, float scale) "
    "-> (Tensor, Tensor)",
    {
        "cuda": Backend(lambda *a: "no CUDA kernel for group_attention yet (the Triton kernel runs it)",
                        None),  # type: ignore[arg-type]  # never run: supports refuses
        "triton": _triton_backend("group_attention"),
        "cpp": _compiled("group_attention", "cpu"),
        "torch": Backend(lambda *a: None, _group_major(reference.group_attention_chunked)),
    },
    _group_attention_fake,
    _sample_group,
    shape_class=lambda args: signature(args, {1: (2,), 2: (2,), 3: (1,)}),  # keys grow while decoding
)
