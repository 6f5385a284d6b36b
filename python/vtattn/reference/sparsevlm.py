"""SparseVLM's selection at one pruning layer, for one sample (the specification of
`vtattn.patch.SparseVLM`; the rule and its differences from the release are in docs/selection.md).

Per sample, on its tokens as the pruning layer l sees them (rows in sequence order):
- raters (once, on the LLM's input embeddings): the text tokens after the last image whose mean over
  the image tokens of softmax-over-text(image_embedding . text_embedding) exceeds that mean's mean
  (none does: every such text token rates);
- relation [R, V]: layer l's attention probabilities (softmax over every key the rater sees), mean
  over heads, rater rows x visual columns; scores [V]: its mean over the raters;
- count: rank = matrix_rank(relation) (fp32, torch's default tolerance); rank == V keeps every
  visual token, else the top min(int(rank * scale + bias), V - 1) (at least 0) by score;
- recycling: the top int(d * recycle) + 1 of the d deleted tokens by score are clustered (DPC-KNN
  on layer l's output, int(r * clusters) + 1 clusters of the r recycled tokens); each cluster's
  mean takes its center's place.
Ties go to the lower index throughout (recycled tokens are clustered in index order)."""
from __future__ import annotations

import torch


def raters(embeds: torch.Tensor, images: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
    """[L] bool: the raters among `text` ([L] bool) from embeds [L, C] and the image tokens [L] bool."""
    out = torch.zeros_like(text)
    if not bool(text.any()) or not bool(images.any()):
        return out
    v, t = embeds[images].float(), embeds[text].float()
    m = (v @ t.T).softmax(-1).mean(0)
    chosen = m > m.mean()
    out[text] = chosen if bool(chosen.any()) else torch.ones_like(chosen)
    return out


def relation(probs: torch.Tensor, raters: torch.Tensor, visual: torch.Tensor) -> torch.Tensor:
    """fp32 [R, V]: head-mean probabilities [H, L, L] of the raters' rows over the visual columns."""
    return probs.float().mean(0)[raters][:, visual]


def count(relation: torch.Tensor, scale: float, bias: float) -> int:
    """Visual tokens kept out of V = relation.shape[1] (no rater: all)."""
    R, V = relation.shape
    if R == 0:
        return V
    rank = int(torch.linalg.matrix_rank(relation.float()))
    if rank == V:
        return V
    return max(0, min(int(rank * scale + bias), V - 1))


def top(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the k largest scores, ties to the lower index, descending score order."""
    return torch.sort(-scores, stable=True).indices[:k]


def cluster(x: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """DPC-KNN on x [n, C] (fp32): (centers [k] indices into x in descending score order, each token's
    cluster [n] in 0..k-1). Density = exp(-mean of the squared distances to the k nearest (self
    included)), distances / sqrt(C); a token's parent distance is to its nearest denser token (equal
    density: the lower index is denser), the largest distance for the densest; score = parent
    distance x density; a token joins its nearest center (ties: the earlier center)."""
    n, C = x.shape
    x = x.float()
    d = torch.cdist(x, x, compute_mode="donot_use_mm_for_euclid_dist") / C ** 0.5  # no [n, n, C] tensor
    density = (-(d.topk(k, dim=-1, largest=False).values ** 2).mean(-1)).exp()
    i = torch.arange(n, device=x.device)
    same = density[None, :] == density[:, None]
    denser = (density[None, :] > density[:, None]) | (same & (i[None, :] < i[:, None]))
    parent = torch.where(denser, d, d.max()).min(-1).values
    centers = top(parent * density, k)
    assign = d[:, centers].argmin(-1)  # the first minimum: the earlier center
    assign[centers] = torch.arange(k, device=x.device)
    return centers, assign


def select(probs: torch.Tensor, raters: torch.Tensor, visual: torch.Tensor, hidden: torch.Tensor, *,
           scale: float, bias: float, recycle: float | None, clusters: float) -> dict[str, torch.Tensor]:
    """One sample at one pruning layer. probs [H, L, L]: the layer's attention probabilities; raters,
    visual [L] bool; hidden [L, C]: the layer's output. Returns scores [L] fp32 (0 off the visual
    tokens), count (0-d), kept [L] bool (the top visual tokens), centers [L] bool (recycled clusters'
    centers, not in kept) and merged [L, C] (each center's cluster mean in hidden's dtype, 0 elsewhere)."""
    L = visual.shape[0]
    where = visual.nonzero()[:, 0]
    rel = relation(probs, raters, visual)
    scores = torch.zeros(L, dtype=torch.float32, device=probs.device)
    if rel.shape[0]:
        scores[where] = rel.mean(0)
    k = count(rel, scale, bias)
    kept = torch.zeros_like(visual)
    kept[where[top(scores[where], k)]] = True
    centers, merged = torch.zeros_like(visual), torch.zeros_like(hidden)
    deleted = (visual & ~kept).nonzero()[:, 0]
    if recycle is not None and len(deleted):
        recycled = deleted[top(scores[deleted], min(int(len(deleted) * recycle) + 1, len(deleted)))].sort().values
        c = min(int(len(recycled) * clusters) + 1, len(recycled))
        heads, assign = cluster(hidden[recycled], c)
        sums = torch.zeros(c, hidden.shape[1], dtype=torch.float32, device=hidden.device)
        sums.index_add_(0, assign, hidden[recycled].float())
        sizes = torch.bincount(assign, minlength=c).float()
        centers[recycled[heads]] = True
        merged[recycled[heads]] = (sums / sizes[:, None]).to(hidden.dtype)
    return dict(scores=scores, count=torch.tensor(k), kept=kept, centers=centers, merged=merged)
