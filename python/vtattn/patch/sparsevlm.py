"""SparseVLM inside a VLM's language model (Zhang et al., ICML 2025; release Gumpest/SparseVLMs, v1):
text "raters" chosen once on the LLM's input score the image tokens at each pruning layer l by the
attention they pay them; the number kept is adaptive (the rank of the raters x image attention
matrix, times `scale`, plus `bias`); the best of the deleted tokens are recycled: clustered (DPC-KNN)
and averaged, each cluster's mean taking its center's place. Tokens leave from layer l + 1 on.

Mechanics: one `drop.Drop` exit per pruning layer (at l + 1). In a prefill, a pre-hook on decoder
layer 0 captures the LLM's input (the raters' embeddings); an attention hook on layer l (ahead of
the exits' own) computes the raters' log-sum-exp with `vtattn.attention` (text rows only), the
scores with `vtattn.key_importance` (rater rows) and the R x V rater / image probability matrix for
the rank (never an L x L tensor); the exit's rule reads layer l's output (`step.hidden`) for the
recycled tokens and hands the merged rows to the exit (`drop.Chosen`). Kept tokens keep their
original positions; a merged token takes its center's slot and position. The exact rule (and the
reference, vtattn/reference/sparsevlm.py) and every difference from the release: docs/selection.md."""
from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

import vtattn

from . import core
from .drop import Chosen, Drop, Step


@dataclass(frozen=True)
class SparseVLM(core.Stage):
    """SparseVLM's options, and its stage. layers: the pruning layers l (the release's LLaVA-1.5 default
    2, 6, 15, 19): layer l's attention scores, tokens leave from l + 1 (each l + 1 < the decoder's
    layers). Each sample keeps min(int(rank * scale + bias), V - 1) of its V image tokens (all when the
    rank is V); recycle: the share of deleted tokens recycled (int(d * recycle) + 1 of d; None: none),
    clusters: clusters per recycled token (int(r * clusters) + 1 of r)."""
    layers: tuple[int, ...] = (2, 6, 15, 19)
    scale: float = 13.5
    bias: float = 0.0
    recycle: float | None = 0.3
    clusters: float = 0.1

    def __post_init__(self) -> None:
        layers = self.layers
        if isinstance(layers, int) or not all(isinstance(x, int) and not isinstance(x, bool) for x in layers):
            raise TypeError(f"SparseVLM layers must be a sequence of ints, got {layers!r}")
        layers = tuple(sorted(layers))
        if not layers or layers[0] < 0 or len(set(layers)) != len(layers):
            raise ValueError(f"SparseVLM layers must be distinct ints >= 0 (at least one), got {self.layers!r}")
        object.__setattr__(self, "layers", layers)
        for name in ("scale", "bias", "clusters") + (() if self.recycle is None else ("recycle",)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value:
                raise TypeError(f"SparseVLM {name} must be a number, got {value!r}")
        if self.scale < 0:
            raise ValueError(f"SparseVLM scale must be >= 0, got {self.scale}")
        for name in ("recycle", "clusters"):
            value = getattr(self, name)
            if value is not None and not 0 <= value <= 1:
                raise ValueError(f"SparseVLM {name} must be in [0, 1], got {value}")

    def install(self, patch: core.Patch) -> core.Installed:
        return _SparseVLM(self, patch)


class _State:
    """One prefill: the LLM's input, the raters [B, N] and, per pruning layer, scores [B, N] and counts [B]."""

    def __init__(self, embeds: torch.Tensor) -> None:
        self.embeds = embeds
        self.raters: torch.Tensor | None = None
        self.tail = 0  # the most text tokens after a sample's last image
        self.scores: dict[int, torch.Tensor] = {}
        self.counts: dict[int, torch.Tensor] = {}


class _SparseVLM(core.Installed):
    phase = core.LAYERS
    options: SparseVLM

    def __init__(self, options: SparseVLM, patch: core.Patch) -> None:
        core.require_image_ids(patch, "SparseVLM")
        decoder = core.language_model(patch.model)
        n = len(decoder.layers)
        if options.layers[-1] + 1 >= n:
            raise ValueError(f"SparseVLM layers must be < {n - 1} (tokens leave from layer l + 1 of the {n} "
                             f"decoder layers), got {options.layers}")
        core.check_full_attention(decoder.config)
        self.options = options
        self.drops: list[Drop] = []
        try:
            for layer in options.layers:
                self.drops.append(Drop(patch, decoder, layer + 1, "SparseVLM"))
        except Exception:
            self.uninstall()
            raise
        self.attn = self.drops[0].attn
        patch.route([self.attn[options.layers[0]]])  # the first scoring layer (the later ones are pruned layers)
        self.capture = decoder.layers[0].register_forward_pre_hook(self._capture, with_kwargs=True, prepend=True)
        self.recycled: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # layer -> last prefill's (slots, rows)

    @property
    def kept(self) -> torch.Tensor | None:
        return self.drops[-1].kept

    def forward(self, call: core.Call, proceed: Callable[[core.Call], Any]) -> Any:
        def scored(call: core.Call) -> Any:
            step = self.drops[0].step()
            if step is not None and step.images is not None:  # a prefill: score ahead of the exits' attention
                ctx = core.current()
                assert ctx is not None  # inside the patched forward
                for layer in self.options.layers:
                    ctx.hook(self.attn[layer], functools.partial(self._score, layer), first=True)
            return proceed(call)
        run = scored
        for layer, drop in reversed(list(zip(self.options.layers, self.drops))):
            run = functools.partial(drop.forward, proceed=run, choose=functools.partial(self._choose, layer))
        return run(call)

    def uninstall(self) -> None:
        for drop in self.drops:
            drop.remove()
        if hasattr(self, "capture"):
            self.capture.remove()

    def _capture(self, module: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        step = self.drops[0].step()
        if step is not None and step.images is not None:
            ctx = core.current()
            assert ctx is not None  # inside the patched forward
            ctx.state[self] = _State(args[0] if args else kwargs["hidden_states"])
            self.recycled = {}

    def _raters(self, step: Step, state: _State) -> None:
        """The raters [B, N] on the LLM's input (batched form of reference.sparsevlm.raters)."""
        images, real = step.images, step.real
        assert images is not None and real is not None  # a prefill
        B, N = images.shape
        visual = images & step.kept.get(0, real)  # the image tokens the LLM's first layer sees
        arange = torch.arange(N, device=images.device)
        last = torch.where(images, arange, -1).amax(1)
        text = real & ~images & (arange > last[:, None]) & visual.any(1, keepdim=True)
        T = int(text.sum(1).max())
        state.tail, state.raters = T, torch.zeros_like(text)
        if T == 0:
            return
        x = state.embeds.detach().float()
        tv = text[:, N - T:]
        logits = (x @ x[:, N - T:].transpose(1, 2)).masked_fill(~tv[:, None], float("-inf"))  # [B, N, T]
        p = torch.where(visual[..., None], logits.softmax(-1), 0.0)
        m = p.sum(1) / visual.sum(1).clamp(min=1)[:, None]
        mean = torch.where(tv, m, 0.0).sum(1) / tv.sum(1).clamp(min=1)
        chosen = (m > mean[:, None]) & tv
        state.raters[:, N - T:] = torch.where(chosen.any(1, keepdim=True), chosen, tv)

    def _score(self, layer: int, module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor,
               value: torch.Tensor, mask: Any, scaling: float | None, kwargs: dict[str, Any]) -> None:
        """Layer l's attention hook in a prefill: scores [B, N] (mean over raters of the head-mean
        probabilities) and counts [B] (from the rank of the raters x image matrix). Goes on as usual."""
        step, ctx = self.drops[0].step(), core.current()
        assert step is not None and ctx is not None  # a hook of a prefill
        state: _State = ctx.state[self]
        if state.raters is None:
            self._raters(step, state)
        images, real, raters_ = step.images, step.real, state.raters
        assert images is not None and real is not None and raters_ is not None  # a prefill, rated above
        B, N = images.shape
        exit = self.drops[0].exits.group.get(module)  # this layer's group (None: the whole sequence)
        if exit is None:
            index, slots = torch.arange(N, device=images.device).expand(B, N), real
        else:
            index, slots = step.records[exit].index, step.records[exit].real
        raters = raters_.gather(1, index) & slots
        visual = images.gather(1, index) & slots
        scores, counts = score(query, key, value, raters, visual, slots, state.tail, scaling,
                               self.options.scale, self.options.bias)
        state.scores[layer] = torch.zeros(B, N + 1, dtype=torch.float32, device=query.device).scatter_(
            1, index.masked_fill(~slots, N), scores)[:, :N]
        state.counts[layer] = counts

    def _choose(self, layer: int, step: Step) -> Chosen:
        """SparseVLM's rule at exit l + 1: the top tokens by layer l's scores; the recycled ones'
        cluster means (layer l's output) at their centers' slots."""
        ctx = core.current()
        assert ctx is not None  # inside the patched forward
        state: _State = ctx.state[self]
        scores, counts = state.scores[layer], state.counts[layer]
        images, real, hidden = step.images, step.real, step.hidden
        assert images is not None and real is not None and hidden is not None  # a prefill's exit
        B, N = images.shape
        earlier = [e for e in step.records if e < layer + 1]
        visual = images & (step.kept[max(earlier)] if earlier else real)
        kept = self._top(scores, visual, counts)
        if self.options.recycle is None:
            return kept
        deleted = visual & ~kept
        d = deleted.sum(1)
        r = torch.minimum(torch.trunc(d.double() * self.options.recycle).long() + 1, d)
        recycled = self._top(scores, deleted, r)
        if not bool(recycled.any()):
            return kept
        rows = torch.arange(N, device=images.device).expand(B, N)  # full index -> row of step.hidden
        if earlier:
            previous = step.records[max(earlier)]
            P = previous.index.shape[1]
            rows = torch.zeros(B, N + 1, dtype=torch.long, device=images.device).scatter_(
                1, previous.index.masked_fill(~previous.real, N), torch.arange(P, device=images.device).expand(B, P))
        R = int(r.max())
        members = torch.sort((~recycled).to(torch.uint8), dim=1, stable=True).indices[:, :R]  # ascending index
        x = hidden.gather(1, rows.gather(1, members)[..., None].expand(-1, -1, hidden.shape[-1]))
        c = torch.minimum(torch.trunc(r.double() * self.options.clusters).long() + 1, r)
        centers, merged = _cluster(x, r, c)
        slots = torch.where(centers >= 0, members.gather(1, centers.clamp(min=0)), -1)
        self.recycled[layer] = (slots, merged)
        return kept | (torch.zeros(B, N + 1, dtype=torch.bool, device=images.device).scatter_(
            1, slots.masked_fill(slots < 0, N), True)[:, :N]), slots, merged

    @staticmethod
    def _top(scores: torch.Tensor, among: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """[B, N] bool: each sample's counts[b] best-scored tokens of `among` (ties: the lower index)."""
        if not bool(counts.any()):
            return torch.zeros_like(among)
        chosen = vtattn.select_tokens(scores.masked_fill(~among, -1.0), keep_tokens=counts.clamp(min=1)).mask
        return chosen & among & (counts > 0)[:, None]



def score(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, raters: torch.Tensor, visual: torch.Tensor,
          real: torch.Tensor, tail: int, scaling: float | None, scale: float,
          bias: float) -> tuple[torch.Tensor, torch.Tensor]:
    """SparseVLM's scores [B, M] fp32 and counts [B] at one layer, from its attention call (query
    [B, Hq, M, D], key / value [B, Hkv, >= M, D]) over M slots in sequence order: raters, visual, real
    [B, M] bool (each sample's real slots after its padding; its raters among its last `tail` rows).
    Never an M x M tensor: the raters' LSE from `attention` on the last rows, the scores from
    `key_importance` on the rater rows, the [R, V] matrix for the rank."""
    B, _, M, _ = query.shape
    scores = torch.zeros(B, M, dtype=torch.float32, device=query.device)
    V = visual.sum(1)
    counts = V.clone()  # no rater: every image token stays
    scale_qk = query.shape[-1] ** -0.5 if scaling is None else float(scaling)
    # no gradient through scores; a StaticCache's keys are its capacity, the prompt's M first
    query, key, value = query.detach(), key[:, :, :M].detach(), value[:, :, :M].detach()
    groups: dict[int, list[int]] = {}
    for b, (start, has) in enumerate(zip((~real).sum(1).tolist(), raters.any(1).tolist())):
        if has:
            groups.setdefault(start, []).append(b)
    for start, members in groups.items():
        rows = torch.tensor(members, device=query.device)
        T = min(tail, M - start)  # the text after the last image: each sample's last rows
        q, k, v = query[rows, :, M - T:], key[rows, :, start:], value[rows, :, start:]
        lse = vtattn.attention(q, k, v, causal=True, scale=scale_qk, return_lse=True)[1]
        picked = raters[rows, M - T:]
        scores[rows, start:] = vtattn.key_importance(q, k, rows=picked, lse=lse, causal=True, scale=scale_qk,
                                                     reduce_heads="mean") / picked.sum(1)[:, None]
        counts[rows] = _count(q, k, lse, picked, visual[rows, start:], scale_qk, V[rows], scale, bias)
    return scores.masked_fill(~visual, 0.0), counts


def _count(q: torch.Tensor, k: torch.Tensor, lse: torch.Tensor, raters: torch.Tensor, visual: torch.Tensor,
           scale_qk: float, V: torch.Tensor, scale: float, bias: float) -> torch.Tensor:
    """Image tokens kept per sample: the rank of each sample's [R, V] head-mean rater x image
    probabilities (padded with zero rows / columns, which leave the rank and torch's default
    tolerance eps * max(R, V) * sigma_max unchanged)."""
    R = raters.sum(1)
    rows = torch.sort((~raters).to(torch.uint8), dim=1, stable=True).indices[:, :int(R.max())]
    cols = torch.sort((~visual).to(torch.uint8), dim=1, stable=True).indices[:, :max(int(V.max()), 1)]
    g, Hq, _, D = q.shape
    qr = q.gather(2, rows[:, None, :, None].expand(g, Hq, -1, D)).float()
    kv = k.gather(2, cols[:, None, :, None].expand(g, k.shape[1], -1, D)).float()
    kv = kv.repeat_interleave(Hq // k.shape[1], dim=1)
    lse_r = lse.gather(2, rows[:, None].expand(g, Hq, -1))[..., None]
    p = torch.exp(qr @ kv.transpose(-1, -2) * scale_qk - lse_r)
    valid = (torch.arange(rows.shape[1], device=q.device) < R[:, None])[:, :, None] & (
        torch.arange(cols.shape[1], device=q.device) < V[:, None])[:, None, :]
    matrix = torch.where(valid, p.mean(1), 0.0)
    eps = torch.finfo(torch.float32).eps
    rank = torch.linalg.matrix_rank(matrix, rtol=eps * torch.maximum(R, V).double())
    pruned = torch.trunc(rank.double() * scale + bias).long()
    return torch.where(rank == V, V, torch.minimum(pruned, V - 1).clamp(min=0))

def _cluster(x: torch.Tensor, n: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Batched DPC-KNN (reference.sparsevlm.cluster) of x [B, R, C], sample b's first n[b] rows into
    k[b] clusters: (centers [B, K] row indices in descending score order, -1 past k[b]; each
    cluster's mean [B, K, C] in x's dtype)."""
    B, R, C = x.shape
    K = int(k.max())
    device = x.device
    i = torch.arange(R, device=device)
    valid = i < n[:, None]
    pair = valid[:, :, None] & valid[:, None, :]
    xf = x.float()
    d = torch.cdist(xf, xf, compute_mode="donot_use_mm_for_euclid_dist") / C ** 0.5
    near = d.masked_fill(~pair, float("inf")).topk(K, dim=-1, largest=False).values
    near = torch.where(torch.arange(K, device=device) < k[:, None, None], near ** 2, 0.0)
    density = (-(near.sum(-1) / k[:, None])).exp()
    top = torch.where(pair, d, float("-inf")).flatten(1).amax(1)
    denser = ((density[:, None, :] > density[:, :, None]) | ((density[:, None, :] == density[:, :, None])
                                                            & (i[None, :] < i[:, None]))) & pair
    parent = torch.where(denser, d, top[:, None, None]).amin(-1)
    score = (parent * density).masked_fill(~valid, float("-inf"))
    centers = torch.sort(-score, dim=1, stable=True).indices[:, :K]
    live = torch.arange(K, device=device) < k[:, None]
    to = d.gather(2, centers[:, None, :].expand(B, R, K)).masked_fill(~live[:, None, :], float("inf"))
    assign = torch.cat([to.argmin(-1), torch.full((B, 1), K, device=device)], 1)  # spare column R
    assign = assign.scatter(1, torch.where(live, centers, R), torch.arange(K, device=device).expand(B, K))[:, :R]
    assign = assign.masked_fill(~valid, K)  # padding rows: a spare cluster K
    sums = xf.new_zeros(B, K + 1, C).scatter_add_(1, assign[..., None].expand(B, R, C), xf)
    sizes = xf.new_zeros(B, K + 1).scatter_add_(1, assign, torch.ones_like(xf[..., 0]))
    merged = (sums[:, :K] / sizes[:, :K].clamp(min=1)[..., None]).to(x.dtype)
    return centers.masked_fill(~live, -1), merged
