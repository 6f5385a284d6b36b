import torch

_MAX_LOGITS = 1 << 25  # fp32 logits per chunk of queries (128 MiB)


def paged_evict(k_pages: torch.Tensor, v_pages: torch.Tensor, pos: torch.Tensor, score: torch.Tensor,
                queries: torch.Tensor, head_start: torch.Tensor, lengths: torch.Tensor, keep: torch.Tensor,
                start: int, recent: int, scale: float, counts: torch.Tensor | None = None,
                next_slot: torch.Tensor | None = None) -> None:
    """Decode-time H2O eviction of a paged cache (`kv.pages.Pages`), in place. Token t of head (b, h)
    is flat slot head_start[b, h] + t (row s % page_size of page s // page_size of k_pages / v_pages
    [P, page_size, D], pos int64 / score fp32 [P, page_size]), for t < lengths[b, h]. head_start,
    lengths and keep are int64 [B, H] on the CPU: read on the host (no device wait), they shape the
    masks. Query i of queries [B, G * H, n, D] sits at position start + i and sees the keys of its
    kv head h (query head // G) with pos <= start + i. Every token's score grows by its attention
    mass: (1 / G) * the sum over the head's G query heads and n queries of softmax(scale * q . k)
    (fp32; a query that sees no key adds nothing). Then each head drops its lengths - keep
    lowest-scored tokens among its first max(lengths - recent, 0) (ties, NaN last: the lower t
    first; the caller keeps lengths - keep within that), moves its kept tokens (k, v, pos, score) to
    the front of its run in order, and sets pos = -1 on its slots [keep, lengths) (their k, v and
    grown score stay). Then, where given, the pools' own counts follow (on their device, [B, H]):
    counts (int32) = keep, next_slot (int64) = head_start + keep."""
    device = k_pages.device
    if counts is not None:
        counts.copy_(keep.to(device, torch.int32, non_blocking=True))
    if next_slot is not None:
        next_slot.copy_((head_start + keep).to(device, non_blocking=True))
    B, H = lengths.shape
    Lm = int(lengths.max()) if lengths.numel() else 0
    if Lm == 0:
        return
    ps = k_pages.shape[1]
    Hq, n, D = queries.shape[1:]
    G = Hq // H
    # the masks and slot lists, from the host's counts (copies to the device: no wait)
    cols = torch.arange(Lm)
    valid = cols < lengths[..., None]
    slots = head_start[..., None] + cols

    def dev(t: torch.Tensor) -> torch.Tensor:
        return t.to(device, non_blocking=True)

    flat, hidden = dev(torch.where(valid, slots, 0)), dev(~valid)
    page, row = flat // ps, flat % ps
    p = pos[page, row]  # [B, H, Lm]
    keys = k_pages[page, row].float()  # [B, H, Lm, D]
    q = queries.reshape(B, H, G, n, D).float() * scale
    last = p.masked_fill(hidden, torch.iinfo(torch.int64).max)[:, :, None, None]  # hides padding from every query
    qpos = dev(torch.arange(start, start + n))[:, None]
    mass = torch.zeros(B, H, Lm, device=device)
    step = max(1, _MAX_LOGITS // max(1, B * Hq * Lm))
    for i in range(0, n, step):  # chunks of queries bound the logits' memory
        s = q[:, :, :, i:i + step] @ keys[:, :, None].transpose(-1, -2)  # [B, H, G, c, Lm]
        masked = last > qpos[i:i + step]
        probs = s.masked_fill(masked, float("-inf")).softmax(-1).masked_fill(masked.all(-1, keepdim=True), 0)
        mass += probs.sum((2, 3))
    new = score[page, row] + mass / G

    # Candidates: the first lengths - recent tokens (the rest, padding included, sort after them as NaN)
    cand = dev(cols < (lengths - recent)[..., None])
    order = new.masked_fill(~cand, float("nan")).argsort(dim=-1, stable=True)  # lowest first, ties: lower t
    gone = torch.zeros_like(hidden).scatter(-1, order, dev(cols < (lengths - keep)[..., None])) | hidden
    kept = gone.argsort(dim=-1, stable=True)  # each head's kept tokens first, ascending
    # slot t of a head takes token src[t]: its t-th kept token for t < keep, else its own (unmoved)
    front = dev(cols < keep[..., None])
    src = torch.where(front, kept, dev(cols))
    at = dev(valid.view(-1).nonzero()[:, 0])  # the heads' tokens among the [B, H, Lm] entries
    take = (dev(head_start)[..., None] + src).view(-1).index_select(0, at)
    to = (page.view(-1).index_select(0, at), row.view(-1).index_select(0, at))
    src_at = (take // ps, take % ps)
    k_pages.index_put_(to, k_pages[src_at])  # (the right side is a copy: overlaps are safe)
    v_pages.index_put_(to, v_pages[src_at])
    pos.index_put_(to, torch.where(front, p.gather(-1, src), -1).view(-1).index_select(0, at))
    score.index_put_(to, new.gather(-1, src).view(-1).index_select(0, at))
