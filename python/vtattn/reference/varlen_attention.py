import torch

from .attention import attention


def varlen_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens_q: torch.Tensor,
                     cu_seqlens_k: torch.Tensor, max_seqlen_q: int, causal: bool, scale: float, softcap: float = 0.0,
                     window: int = -1, sinks: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Packed q [Tq, Hq, D], k/v [Tk, Hkv, D]; sequence b is rows cu_seqlens_*[b]:cu_seqlens_*[b+1].
    (out [Tq, Hq, D] in q's dtype, lse [Hq, Tq] fp32); each sequence is plain `attention`
    (causal and window end-aligned within the sequence); max_seqlen_q is only a launch hint for kernels."""
    out = q.new_zeros(q.shape)
    lse = torch.full((q.shape[1], q.shape[0]), float("-inf"), dtype=torch.float32, device=q.device)
    bq, bk = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()

    def seq(x: torch.Tensor, lo: int, hi: int) -> torch.Tensor:  # [1, H, N, D]
        return x[lo:hi].transpose(0, 1)[None]

    for b in range(len(bq) - 1):
        (q0, q1), (k0, k1) = bq[b:b + 2], bk[b:b + 2]
        if q1 == q0:
            continue
        o, s = attention(seq(q, q0, q1), seq(k, k0, k1), seq(v, k0, k1), causal, scale, softcap, window, sinks)
        out[q0:q1] = o[0].transpose(0, 1)
        lse[:, q0:q1] = s[0]
    return out, lse
