"""vtattn's attention in vLLM's vision encoders: `EncoderAttention` replaces vLLM's
`MMEncoderAttention` (registered with `MMEncoderAttention.register_oot`). In a vtattn variant
(`enable`) it runs `vtattn.attention` and, where a `Probe` is set, records the exact attention
scores the pruning rule needs with `vtattn.key_importance` from the same call's LSE (no eager
attention, no N x N tensor); everywhere else it is vLLM's own class, unchanged.

Tensor parallelism: with vLLM's default `mm_encoder_tp_mode="weights"` each rank holds a slice of
the heads, so a rank's scores are partial. `reduce_heads` sums the rank's heads and all-reduces
the sums, so every rank holds the same scores (and selects the same tokens); a mean divides by
all heads. Recorded keys are all-gathered along the head dimension."""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from vllm.model_executor.layers.attention import MMEncoderAttention

import vtattn


@dataclass
class Probe:
    """What one attention layer records: scores = key_importance over `rows` (0: the [CLS] query;
    "all": every query of the image / segment), reduced over all heads by `reduce` ("mean" or
    "sum"): fp32 [B, N], or [S] for packed segments (Qwen's ViT); with `keys`, the attention keys
    of all heads concatenated, [B, N, H * D]."""
    rows: Any = 0
    reduce: str = "mean"
    keys: bool = False
    scores: torch.Tensor | None = None
    key_states: torch.Tensor | None = None


def reduce_heads(partial: torch.Tensor, mode: str, total_heads: int,
                 all_reduce: Callable[[torch.Tensor], torch.Tensor] | None) -> torch.Tensor:
    """Scores of all heads from one rank's per-head sums `partial` (summed over the rank's heads):
    all-reduced across the ranks (`all_reduce`, None on one rank), divided by the number of heads
    for "mean"."""
    total = partial if all_reduce is None else all_reduce(partial)
    return total / total_heads if mode == "mean" else total


class EncoderAttention(MMEncoderAttention):
    """MMEncoderAttention that runs vtattn's attention (with score probes) once `enable`d by a
    vtattn variant; vLLM's own forward otherwise."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.vtattn = False
        self.shards = 1
        self.probe: Probe | None = None

    def enable(self, shards: int) -> None:
        """Run vtattn's attention from now on; `shards`: how many tensor-parallel ranks share the
        heads (1 when each rank holds them all)."""
        if self.num_kv_heads != self.num_heads:
            raise NotImplementedError("vtattn's vision-encoder attention expects as many kv heads as heads")
        self.vtattn, self.shards = True, shards

    def forward(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        if not self.vtattn:
            return super().forward(*args, **kwargs)
        return self._forward_vtattn(*args, **kwargs)

    def _forward_vtattn(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                        cu_seqlens: torch.Tensor | None = None, max_seqlen: Any = None,
                        sequence_lengths: Any = None) -> torch.Tensor:
        """query/key/value: [B, N, H * D] or [B, N, H, D]; cu_seqlens: packed segments along N
        (B = 1), each attending within itself. Returns the input's layout."""
        B, N = query.shape[:2]
        q, k, v = (x.reshape(B, N, self.num_heads, self.head_size).transpose(1, 2) for x in (query, key, value))
        # cu_seqlens lives on the device; vLLM's own SDPA path reads it on the host the same way.
        bounds = [0, N] if cu_seqlens is None else [int(b) for b in cu_seqlens.tolist()]
        probe = self.probe
        outs: list[torch.Tensor] = []
        scores: list[torch.Tensor] = []
        for start, end in zip(bounds[:-1], bounds[1:]):
            if end <= start:  # cu_seqlens padded with repeats
                continue
            qs, ks, vs = q[:, :, start:end], k[:, :, start:end], v[:, :, start:end]
            if probe is None or probe.rows is None:
                outs.append(vtattn.attention(qs, ks, vs, scale=self.scale))
                continue
            out, lse = vtattn.attention(qs, ks, vs, scale=self.scale, return_lse=True)
            outs.append(out)
            mode = probe.reduce if self.shards == 1 else "sum"  # one rank: the transformers drop-in's op
            scores.append(vtattn.key_importance(qs, ks, rows=probe.rows, lse=lse, scale=self.scale,
                                                reduce_heads=mode))
        if probe is not None:
            if scores:
                s = torch.cat(scores, dim=-1)
                if cu_seqlens is not None:
                    s = s[0]
                probe.scores = s if self.shards == 1 else reduce_heads(
                    s, probe.reduce, self.num_heads * self.shards, _all_reduce())
            if probe.keys:
                keys = key.reshape(B, N, -1)
                probe.key_states = keys if self.shards == 1 else _all_gather()(keys.contiguous())
        out = torch.cat(outs, dim=2).transpose(1, 2)  # [B, N, H, D]
        return out.reshape(B, N, -1) if query.dim() != 4 else out


def _all_reduce() -> Callable[[torch.Tensor], torch.Tensor]:
    from vllm.distributed import tensor_model_parallel_all_reduce
    return tensor_model_parallel_all_reduce


def _all_gather() -> Callable[[torch.Tensor], torch.Tensor]:
    from vllm.distributed import tensor_model_parallel_all_gather
    return lambda x: tensor_model_parallel_all_gather(x, dim=-1)


def layers(tower: torch.nn.Module) -> list[EncoderAttention]:
    """The encoder attention layers of a vision tower, in order."""
    found = [m for m in tower.modules() if isinstance(m, MMEncoderAttention)]
    if not all(isinstance(m, EncoderAttention) for m in found):
        raise RuntimeError("vtattn's pruned variants need vtattn's MMEncoderAttention, but another class replaced it "
                           f"({type(found[0]).__name__}): another vLLM plugin registered its own")
    return found
