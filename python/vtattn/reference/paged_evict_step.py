import torch


def paged_evict_step(k_pages: torch.Tensor, v_pages: torch.Tensor, pos: torch.Tensor, score: torch.Tensor,
                     q: torch.Tensor, head_start: torch.Tensor, capacity: torch.Tensor, floor: torch.Tensor,
                     lengths: torch.Tensor, next_slot: torch.Tensor, since: torch.Tensor, every: int, recent: int,
                     width: int, scale: float) -> None:
    """DecodeH2O's decode step on a static cache (`kv.decode.StaticEviction`), in place, on device
    counts: no host read, the same ops every step (a compiled graph or a CUDA-graph replay runs it).
    Head (b, h) owns capacity[b, h] <= width flat slots from head_start[b, h] of the [P, page_size]
    pools (k_pages / v_pages [P, page_size, D], pos int64, score fp32) and holds its n = lengths[b, h]
    (int32) tokens in the first n, this step's token included (n <= floor[b, h] + every: the static
    cache's invariant, which bounds the moves); q [B, G * H, 1, D] is the step's
    query. Every held token's score grows by its attention mass: (1 / G) * the sum over the head's G
    query heads of softmax(scale * q . k) over its n tokens (fp32). `since` (int64, one element)
    counts the steps since the last eviction: it grows by one, and when it reaches `every` it
    returns to 0 and each head drops its max(n - floor[b, h], 0) lowest-scored tokens outside its
    `recent` newest positions (ties, NaN last: the lower position first; floor >= recent). The
    slots freed below keep = n - drop take, in order, the kept tokens at or past keep, in order (k,
    v, pos, score move; at most `every` rows); slots [keep, n) get pos = -1 (their scores stay);
    lengths = keep and next_slot = head_start + keep. head_start, capacity, floor: int64 [B, H] on
    the pools' device; width: the widest capacity (the [B, H, width] working shape)."""
    B, H = lengths.shape
    D, W, ps = q.shape[-1], width, k_pages.shape[1]
    t = torch.arange(W, device=q.device)
    n = lengths.long()[..., None]  # [B, H, 1]
    cols = torch.minimum(t, capacity[..., None] - 1)  # columns past a head's capacity repeat its last
    slot = head_start[..., None] + cols  # [B, H, W]
    page, row = slot // ps, slot % ps
    valid = t < n
    keys = k_pages[page, row].float()  # [B, H, W, D]
    logits = (q.reshape(B, H, -1, 1, D).float() @ keys[:, :, None].transpose(-1, -2)).squeeze(-2) * scale
    mass = logits.masked_fill(~valid[:, :, None], float("-inf")).softmax(-1).mean(2)  # [B, H, W], GQA mean
    p = pos[page, row]
    s = score[page, row] + mass.masked_fill(~valid, 0)
    since += 1
    due = since >= every
    since.masked_fill_(due, 0)
    drop = torch.where(due, (n - floor[..., None]).clamp(min=0), 0)  # [B, H, 1]
    keep = n - drop
    cand = valid
    if recent:  # outside the head's `recent` newest positions
        cutoff = torch.where(valid, p, -1).topk(recent, -1).values[..., -1:]
        cand = valid & (p < cutoff)
    # lowest score first, ties: the lower position (unique in a head), candidates before the rest
    by_pos = torch.where(cand, p, torch.iinfo(torch.int64).max).argsort(-1)
    ranked = torch.where(cand, s, float("nan")).gather(-1, by_pos).argsort(dim=-1, stable=True)
    gone = torch.zeros_like(valid).scatter(-1, by_pos.gather(-1, ranked), t < drop)
    # the j-th hole below `keep` takes the j-th survivor at or past it (as many of each); pairs that
    # do not exist copy the head's newest slot onto itself (never a hole when a token goes)
    E = every
    holes, newest = _ranked(gone & (t < keep), E), (n - 1).clamp(min=0).expand(B, H, E)
    dst = torch.where(holes < 0, newest, holes)
    src = torch.where(holes < 0, newest, _ranked(~gone & valid & (t >= keep), E))
    at, take = head_start[..., None] + dst, head_start[..., None] + src
    to, frm = (at // ps, at % ps), (take // ps, take % ps)
    for pool in (k_pages, v_pages):
        pool.index_put_(to, pool[frm])  # (the right side is a copy)
    moved = t.expand(B, H, W).scatter(-1, dst, src)  # the column each column's token comes from
    p = torch.where(valid & (t >= keep), -1, p.gather(-1, moved))
    s = s.gather(-1, moved)
    # (a column past a capacity writes its head's last column's value)
    pos.index_put_((page, row), p.gather(-1, cols))
    score.index_put_((page, row), s.gather(-1, cols))
    lengths.copy_(keep.squeeze(-1))
    next_slot.copy_(head_start + keep.squeeze(-1))


def _ranked(mask: torch.Tensor, E: int) -> torch.Tensor:
    """int64 [B, H, E]: the columns where mask [B, H, W] is True, in order, -1 past their count (<= E)."""
    rank = torch.where(mask, (mask.cumsum(-1) - 1).clamp(max=E), E)  # (the clamp: never an index past E)
    cols = torch.arange(mask.shape[-1], device=mask.device).expand_as(rank)
    out = torch.full((*mask.shape[:-1], E + 1), -1, dtype=torch.int64, device=mask.device)
    return out.scatter(-1, rank, cols)[..., :E]
