"""Dense attention through PyTorch's own fused kernels (the aten SDPA ops that return the LSE).

Reuse what exists: where FlashAttention-2 / memory-efficient attention (CUDA) or PyTorch's CPU
flash kernel cover the inputs they are the fastest dense kernels (CPU, 1 thread: 1.8-4x vtattn's
C++ kernel on prefill shapes, about equal on one fp32 decode row; docs/internals.md, "Backends and
dispatch"); vtattn's own kernels serve everything else."""
import torch


def attention_supports(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, scale: float, softcap: float,
                       window: int, sinks: torch.Tensor | None) -> str | None:
    for name, on in (("softcap", softcap > 0), ("window", window >= 0), ("sinks", sinks is not None)):
        if on:
            return f"{name} is not implemented in PyTorch's fused attention kernels"
    if q.device.type not in ("cpu", "cuda"):
        return f"PyTorch's fused attention kernels need CPU or CUDA tensors, got {q.device.type}"
    nq, nk = q.shape[2], k.shape[2]
    if nq == 0 or nk == 0:
        return "empty sequence"
    if causal and nq != nk and nq != 1:  # (one row, end-aligned, sees every key: not causal)
        # SDPA aligns causal masks to the top-left corner; vtattn aligns them to the end.
        return "causal with Nq != Nk (SDPA aligns the mask to the top-left, vtattn to the end)"
    if q.device.type == "cpu":  # the CPU flash kernel: any head dim, GQA (kv head h // (Hq / Hkv))
        return None
    if q.shape[1] != k.shape[1]:
        return "GQA (Hq != Hkv) is left to vtattn's own kernels, which read shared kv heads in place"
    d = q.shape[-1]
    if d % 8 != 0 or d > 256:
        return f"head dim {d} is not a multiple of 8 up to 256"
    if torch.cuda.get_device_capability(q.device) < (8, 0):
        return "needs compute capability 8.0 or newer"
    return None


def _lead_contiguous(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, scale: float, softcap: float,
              window: int, sinks: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Only runs what attention_supports accepts: softcap, window and sinks are off."""
    q, k, v = (_lead_contiguous(t) for t in (q, k, v))
    causal = causal and q.shape[2] > 1
    if q.device.type == "cpu":
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, causal, scale=scale)
        return out, lse.contiguous()  # (laid out [B, N, H])
    if q.dtype in (torch.float16, torch.bfloat16):
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention(
            q, k, v, 0.0, causal, False, scale=scale)[:2]
    else:
        out, lse = torch.ops.aten._scaled_dot_product_efficient_attention(
            q, k, v, None, True, 0.0, causal, scale=scale)[:2]
        lse = lse[..., : q.shape[2]]  # padded to a multiple of 32 rows
    return out, lse.contiguous()

