"""Cases for attention over pruned tokens: varlen_attention (ragged batches of kept tokens) and
index_attention (per-head kept keys), each at keep ratios KEEPS of the shape's N.

- varlen: B sequences of kept tokens, self-attention (Nq = Nk per sequence), lengths spread over
  [0.5, 1.5] x keep x N. Baselines: pad to the longest + SDPA with a key mask (padding done
  outside the timing), and a Python loop of one SDPA call per sequence.
- index: every (batch, kv head) keeps its own keep x N keys (ascending); all N queries. Baseline:
  gather K/V (and, causal, the mask from the kept positions) then SDPA, all timed.
- block_sparse: each query block keeps a random (1 - sparsity) share of the key blocks it can see
  (causal: up to the diagonal, which is always kept), per query head. Baselines: FlexAttention with
  the same BlockMask (built and compiled outside the timing; eager on CPU, where compiling it takes
  minutes) and dense SDPA over every key. Plus the long-prompt ladder and the sparse-prefill
  policies' rows of sparse_prefill_cases.py.
FLOPs: 4 * Hq * D * visible (query, key) pairs, from the exact lists (fixed per case, not per seed).
"""
from itertools import accumulate
from typing import Any, Callable

import torch
import torch.nn.functional as F

import vtattn

from .cases import Builder, Case, Impl, Inputs, Maker, Shape, _vtattn_impls, visible_pairs

KEEPS = (0.25, 0.5)


def _lengths(s: Shape, keep: float) -> list[int]:
    g = torch.Generator().manual_seed(0)
    spread = 0.5 + torch.rand(s["B"], generator=g)
    return [max(1, round(float(f) * keep * s["N"])) for f in spread]


def _varlen_maker(s: Shape, lens: list[int]) -> Maker:
    def make(device: torch.device, dtype: torch.dtype, seed: int) -> Inputs:
        g = torch.Generator(device=device).manual_seed(seed)
        T = sum(lens)
        def r(h: int) -> torch.Tensor:
            return torch.randn(T, h, s["D"], device=device, dtype=dtype, generator=g)
        cu = torch.tensor([0] + lens, device=device).cumsum(0).to(torch.int32)
        return {"q": r(s["Hq"]), "k": r(s["Hkv"]), "v": r(s["Hkv"]), "cu": cu}
    return make


def _padded(x: Inputs, s: Shape, lens: list[int]) -> Inputs:
    """[B, H, max, D] copies of the packed q/k/v and the SDPA bool mask (keys valid, causal)."""
    B, M, dev = len(lens), max(lens), x["q"].device
    g = s["Hq"] // s["Hkv"]
    out: Inputs = {}
    for name, h in (("q", s["Hq"]), ("k", s["Hkv"]), ("v", s["Hkv"])):
        p = x[name].new_zeros(B, M, h, s["D"])
        for b, (lo, n) in enumerate(zip(accumulate(lens, initial=0), lens)):
            p[b, :n] = x[name][lo:lo + n]
        out[name] = p.transpose(1, 2)
        if name != "q" and g > 1:
            out[name] = out[name].repeat_interleave(g, 1)
    mask = torch.arange(M, device=dev)[None, :] < torch.tensor(lens, device=dev)[:, None]  # [B, keys]
    mask = mask[:, None, None, :]
    if s["causal"]:
        mask = mask & torch.ones(M, M, dtype=torch.bool, device=dev).tril()
    out["mask"] = mask
    return out


def _sdpa_loop(x: Inputs, s: Shape, lens: list[int]) -> None:
    scale, g = s["D"] ** -0.5, s["Hq"] // s["Hkv"]
    lo = 0
    for n in lens:
        q, k, v = (x[t][lo:lo + n].transpose(0, 1)[None] for t in ("q", "k", "v"))
        F.scaled_dot_product_attention(q, k, v, is_causal=s["causal"], scale=scale, enable_gqa=g > 1)
        lo += n


def varlen_cases(name: str, s: Shape, backends: list[str]) -> list[Case]:
    cases = []
    for keep in KEEPS:
        lens = _lengths(s, keep)
        c = Case("varlen_attention", f"{name}:keep-{keep}", {**s, "keep": keep, "lens": lens}, _varlen_maker(s, lens),
                 flops=4 * s["Hq"] * s["D"] * sum(visible_pairs(n, n, s["causal"]) for n in lens))
        call = lambda x, m=max(lens): vtattn.varlen_attention(
            x["q"], x["k"], x["v"], x["cu"], x["cu"], max_seqlen_q=m, max_seqlen_k=m, causal=s["causal"])
        c.impls = _vtattn_impls(backends, call)
        pad = lambda x, lens=lens: _padded(x, s, lens)
        c.impls.append(Impl("pad-sdpa", lambda x: F.scaled_dot_product_attention(
            x["q"], x["k"], x["v"], attn_mask=x["mask"], scale=s["D"] ** -0.5), role="baseline",
            prep=pad, note="padding outside the timing"))
        loop = lambda x, lens=lens: _sdpa_loop(x, s, lens)
        c.impls.append(Impl("sdpa-loop", loop, role="baseline"))
        cases.append(c)
    return cases


def _index_lists(s: Shape, keep: float) -> torch.Tensor:
    """Fixed kept lists: [B, Hkv, L] ascending, L = keep x N."""
    g = torch.Generator().manual_seed(0)
    L = max(1, round(keep * s["N"]))
    return torch.rand(s["B"], s["Hkv"], s["N"], generator=g).argsort(-1)[..., :L].sort(-1).values


def _index_pairs(s: Shape, idx: torch.Tensor) -> int:
    if not s["causal"]:
        return int(s["B"] * s["Hkv"] * idx.shape[2] * s["N"])
    return int((s["N"] - idx).sum())  # key j is seen by rows j .. N-1


def _gather_sdpa(x: Inputs, s: Shape) -> torch.Tensor:
    """What pruning code does without index_attention: gather each head's keys, then SDPA."""
    idx: torch.Tensor = x["idx"]
    def take(t: torch.Tensor) -> torch.Tensor:
        return t.gather(2, idx[..., None].expand(-1, -1, -1, s["D"]))
    k, v = take(x["k"]), take(x["v"])
    g = s["Hq"] // s["Hkv"]
    mask = None
    if s["causal"]:  # key j visible to row i iff j <= i (original positions)
        mask = (idx[:, :, None, :] <= torch.arange(s["N"], device=idx.device)[:, None]).repeat_interleave(g, 1)
    return F.scaled_dot_product_attention(x["q"], k, v, attn_mask=mask, scale=s["D"] ** -0.5, enable_gqa=g > 1)


def index_cases(name: str, s: Shape, backends: list[str]) -> list[Case]:
    cases = []
    for keep in KEEPS:
        lists = _index_lists(s, keep)

        def make(device: torch.device, dtype: torch.dtype, seed: int, lists: torch.Tensor = lists) -> Inputs:
            g = torch.Generator(device=device).manual_seed(seed)
            def r(h: int) -> torch.Tensor:
                return torch.randn(s["B"], h, s["N"], s["D"], device=device, dtype=dtype, generator=g)
            return {"q": r(s["Hq"]), "k": r(s["Hkv"]), "v": r(s["Hkv"]), "idx": lists.to(device)}

        c = Case("index_attention", f"{name}:keep-{keep}", {**s, "keep": keep}, make,
                 flops=4 * (s["Hq"] // s["Hkv"]) * s["D"] * _index_pairs(s, lists))
        c.impls = _vtattn_impls(backends, lambda x: vtattn.index_attention(
            x["q"], x["k"], x["v"], x["idx"], causal=s["causal"]))
        c.impls.append(Impl("gather-sdpa", lambda x: _gather_sdpa(x, s), role="baseline"))
        cases.append(c)
    return cases


SPARSITIES = (0.5, 0.9)


def _block_lists(s: Shape, bs: int, sparsity: float) -> torch.Tensor:
    """Fixed lists [1, Hq, Q_blocks, K_blocks]: a random share of each query block's visible key blocks."""
    qb = kb = -(-s["N"] // bs)
    g = torch.Generator().manual_seed(0)
    seen = torch.ones(qb, kb, dtype=torch.bool).tril() if s["causal"] else torch.ones(qb, kb, dtype=torch.bool)
    keep = (seen.sum(-1, keepdim=True) * (1 - sparsity)).ceil()  # per query block, at least 1
    rank = torch.where(seen, torch.rand(1, s["Hq"], qb, kb, generator=g), 2.0).argsort(-1).argsort(-1)
    blocks = rank < keep
    if s["causal"]:
        blocks |= torch.eye(qb, dtype=torch.bool)  # the diagonal: no row without keys
    return blocks


def _block_pairs(s: Shape, bs: int, blocks: torch.Tensor) -> int:
    """Visible (query, key) pairs of the listed blocks (causal masked), over the batch and heads."""
    n, kb = s["N"], blocks.shape[-1]
    rows = torch.arange(n)[:, None]
    lo = torch.arange(kb)[None, :] * bs
    hi = (rows + 1 if s["causal"] else torch.full_like(rows, n)).clamp(max=n)  # keys < hi are visible
    per_row = (torch.minimum(hi, (lo + bs).clamp(max=n)) - lo).clamp(min=0)  # [N, K_blocks]
    per_block = torch.zeros(blocks.shape[-2], kb, dtype=torch.long).index_add_(0, rows[:, 0] // bs, per_row)
    return int(s["B"]) * int((blocks * per_block).sum())


def _flex_impl(s: Shape, bs: int) -> Impl:
    from torch.nn.attention.flex_attention import flex_attention

    fn: dict[str, Any] = {}  # the flex_attention to call, compiled on CUDA

    def prep(x: Inputs) -> Inputs:
        if "call" not in fn:  # compiling flex on CPU takes minutes: there it runs eagerly (dense scores)
            cuda = x["q"].device.type == "cuda"
            fn["call"] = torch.compile(flex_attention) if cuda else flex_attention
            if not cuda:
                impl.note = "eager (unfused) on CPU: a correctness baseline, not a speed one"
        return {**x, "mask": vtattn.sparse.to_flex_block_mask(x["num"], x["idx"], bs, s["N"], s["N"],
                                                              causal=s["causal"])}

    impl = Impl("flex", lambda x: fn["call"](x["q"], x["k"], x["v"], block_mask=x["mask"], scale=s["D"] ** -0.5,
                                             enable_gqa=s["Hq"] != s["Hkv"]),
                role="baseline", prep=prep, note="BlockMask built and compiled outside the timing")
    return impl


def block_sparse_cases(name: str, s: Shape, backends: list[str]) -> list[Case]:
    bs = 128 if s["N"] >= 2048 else 64 if s["N"] >= 512 else 16  # at least a few blocks at CPU sizes
    cases = []
    for sparsity in SPARSITIES:
        blocks = _block_lists(s, bs, sparsity)
        num, idx = vtattn.sparse.from_dense_blocks(blocks)

        def make(device: torch.device, dtype: torch.dtype, seed: int, num: torch.Tensor = num,
                 idx: torch.Tensor = idx) -> Inputs:
            g = torch.Generator(device=device).manual_seed(seed)
            def r(h: int) -> torch.Tensor:
                return torch.randn(s["B"], h, s["N"], s["D"], device=device, dtype=dtype, generator=g)
            return {"q": r(s["Hq"]), "k": r(s["Hkv"]), "v": r(s["Hkv"]), "num": num.to(device), "idx": idx.to(device)}

        c = Case("block_sparse_attention", f"{name}:sparsity-{sparsity}", {**s, "sparsity": sparsity, "block_size": bs},
                 make, flops=4 * s["D"] * _block_pairs(s, bs, blocks))
        c.impls = _vtattn_impls(backends, lambda x: vtattn.block_sparse_attention(
            x["q"], x["k"], x["v"], x["num"], x["idx"], block_size=bs, causal=s["causal"]))
        # flex first: outputs are checked against the first baseline, and it computes the same thing.
        c.impls.append(_flex_impl(s, bs))
        c.impls.append(Impl("sdpa-dense", lambda x: F.scaled_dot_product_attention(
            x["q"], x["k"], x["v"], is_causal=s["causal"], scale=s["D"] ** -0.5, enable_gqa=s["Hq"] != s["Hkv"]),
            role="baseline", note="every key"))
        cases.append(c)
    from .sparse_prefill_cases import kernel_cases  # the long-prompt ladder (imports this module)
    return cases + kernel_cases(name, s, backends)


def sparse_policy_cases(name: str, s: Shape, backends: list[str]) -> list[Case]:
    from .sparse_prefill_cases import policy_cases
    return policy_cases(name, s, backends)


def sparse_prefill_e2e_cases(name: str, s: Shape, backends: list[str]) -> list[Case]:
    from .sparse_prefill_cases import video_cases
    return video_cases(name, s, backends)


BUILDERS: dict[str, Builder] = {"varlen_attention": varlen_cases, "index_attention": index_cases,
            "block_sparse_attention": block_sparse_cases, "sparse_policy": sparse_policy_cases,
            "sparse_prefill_e2e": sparse_prefill_e2e_cases}
