import torch


def paged_append(k_pages: torch.Tensor, v_pages: torch.Tensor, pos: torch.Tensor, next_slot: torch.Tensor,
                 lengths: torch.Tensor, k: torch.Tensor, v: torch.Tensor, start: torch.Tensor,
                 last: torch.Tensor | None, score: torch.Tensor | None) -> None:
    """Append k, v [B, H, n, D] to a paged cache in place (a decode step of `kv.pages.Pages`).
    Token t of head (b, h) goes to flat slot s = next_slot[b, h] + t (slot s is row s % page_size of
    page s // page_size of k_pages / v_pages [P, page_size, D]), clamped to last[b, h] when `last`
    (int64 [B, H]) is given; pos[s] = start + t (start: int64 0-dim, on the pools' device or the
    CPU), score[s] = 0 (fp32 [P, page_size], when given). Then next_slot (int64 [B, H]) and lengths
    (int32 [B, H]) grow by n. Tokens that clamp to a head's last slot all write its newest one
    (t = n - 1), so the slot's content does not depend on the order of the writes."""
    B, H, n, D = k.shape
    ps = k_pages.shape[1]
    t = torch.arange(n, device=k.device)
    slots = next_slot[..., None] + t  # [B, H, n]
    src = t.expand(B, H, n)
    if last is not None:
        clamped = slots >= last[..., None]
        slots = torch.where(clamped, last[..., None], slots)
        src = torch.where(clamped, n - 1, src)
    rows = (slots // ps, slots % ps)
    k_pages.index_put_(rows, k.gather(2, src[..., None].expand(B, H, n, D)))
    v_pages.index_put_(rows, v.gather(2, src[..., None].expand(B, H, n, D)))
    pos.index_put_(rows, start.to(pos.device) + src)
    if score is not None:
        score.index_put_(rows, score.new_zeros(()))
    next_slot += n
    lengths += n
