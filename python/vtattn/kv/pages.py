"""One layer's compact KV storage: each (batch, kv head) owns its own pages.

Pools k, v [P, page_size, D] hold every page of the layer; `table` int32 [B, Hkv, max_pages] lists
a head's pages in order (-1 past its own), `lengths` int32 [B, Hkv] its tokens, `pos` int64
[P, page_size] the original position of each stored token (-1 in unused slots). A head gets the
pages its kept tokens need plus `room` tokens of headroom, so the bytes allocated follow the kept
fraction, not the longest head. Appending a decode token writes one slot per head (no copy of the
cache); when the headroom runs out every head gets another `room` tokens of pages (one pool copy
per `room` steps). Page allocation is host-side: the head lengths are read once, when the pages
are built (not at all when given on the host), and tracked on the host after that (every append
adds the same count to every head). With `scores`, a fp32 pool `score [P, page_size]` follows the
tokens (decode-time eviction's accumulated attention mass; appended tokens start at 0)."""
import torch


def _table(npages):
    """int32 [B, H, max_pages] for host int64 page counts [B, H]: pages numbered in (b, h) order."""
    first = npages.flatten().cumsum(0) - npages.flatten()
    cols = torch.arange(int(npages.max()) if npages.numel() else 0)
    table = first.view(*npages.shape, 1) + cols
    return torch.where(cols < npages[..., None], table, -1).to(torch.int32)


class Pages:
    def __init__(self, k_rows, v_rows, positions, counts, page_size, room, scores=None):
        """k_rows, v_rows [B, H, K, D]: each head's kept rows, valid up to counts [B, H] (int64, on
        the host or the device); positions int64 [B, H, K]: their original positions; scores: None
        or fp32 [B, H, K], the rows' scores."""
        B, H, K, D = k_rows.shape
        device = k_rows.device
        self.page_size, self.chunk = page_size, room
        self.host_lengths = counts.cpu()  # the one host sync of a compression
        self.npages = (self.host_lengths + room + page_size - 1) // page_size
        self.room = int((self.npages * page_size - self.host_lengths).min()) if counts.numel() else room
        total = int(self.npages.sum())
        self.k = k_rows.new_empty(total, page_size, D)
        self.v = v_rows.new_empty(total, page_size, D)
        self.pos = torch.full((total, page_size), -1, dtype=torch.int64, device=device)
        self.table = _table(self.npages).to(device)
        self.lengths = counts.to(device=device, dtype=torch.int32)
        t = torch.arange(K, device=device)
        stored = t < self.lengths[..., None]
        slots = self._slots(t.expand(B, H, K))[stored]
        self.k.view(-1, D)[slots] = k_rows[stored]
        self.v.view(-1, D)[slots] = v_rows[stored]
        self.pos.view(-1)[slots] = positions[stored]
        self.score = None
        if scores is not None:
            self.score = torch.zeros(total, page_size, device=device)
            self.score.view(-1)[slots] = scores[stored].float()

    def _slots(self, t):
        """Flat slot index (page * page_size + offset) of each head's token t [B, H, n] (valid t)."""
        page = self.table.long().gather(-1, (t // self.page_size).clamp(max=self.table.shape[-1] - 1))
        return page * self.page_size + t % self.page_size

    def append(self, k, v, start):
        """Store k, v [B, H, n, D] after each head's tokens, at original positions start..start+n-1."""
        n, D = k.shape[2], k.shape[3]
        if n > self.room:
            self._grow(n)
        t = self.lengths[..., None].long() + torch.arange(n, device=k.device)
        slots = self._slots(t).flatten()
        self.k.view(-1, D)[slots] = k.reshape(-1, D)
        self.v.view(-1, D)[slots] = v.reshape(-1, D)
        self.pos.view(-1)[slots] = (start + torch.arange(n, device=k.device)).repeat(t.shape[0] * t.shape[1])
        if self.score is not None:
            self.score.view(-1)[slots] = 0
        self.lengths += n
        self.host_lengths += n
        self.room -= n

    def _grow(self, n):
        ps = self.page_size
        extra = (max(n, self.chunk) + ps - 1) // ps
        B, H = self.npages.shape
        P = self.k.shape[0]
        cols = torch.arange(int((self.npages + extra).max()))
        old = torch.full((B, H, len(cols)), -1, dtype=torch.int64)
        old[..., :self.table.shape[-1]] = self.table.cpu()
        new = P + torch.arange(B * H).view(B, H, 1) * extra + (cols - self.npages[..., None])
        table = torch.where(cols < self.npages[..., None], old,
                            torch.where(cols < (self.npages + extra)[..., None], new, -1))
        self.table = table.to(device=self.k.device, dtype=torch.int32)
        self.npages = self.npages + extra
        self.room += extra * ps
        grow = B * H * extra
        self.k = torch.cat([self.k, self.k.new_empty(grow, ps, self.k.shape[-1])])
        self.v = torch.cat([self.v, self.v.new_empty(grow, ps, self.v.shape[-1])])
        self.pos = torch.cat([self.pos, self.pos.new_full((grow, ps), -1)])
        if self.score is not None:
            self.score = torch.cat([self.score, self.score.new_zeros(grow, ps)])

    def slots(self):
        """int64 [B, H, L] flat slot of each head's tokens, -1 past its length (L = longest head)."""
        B, H = self.lengths.shape
        t = torch.arange(int(self.host_lengths.max()) if self.host_lengths.numel() else 0, device=self.k.device)
        t = t.expand(B, H, len(t))
        return torch.where(t < self.lengths[..., None], self._slots(t), -1)

    def positions(self):
        """int64 [B, H, L]: the original positions of each head's tokens in order, -1 padded."""
        slots = self.slots()
        return torch.where(slots >= 0, self.pos.view(-1)[slots.clamp(min=0)], -1)

    def take(self, rows):
        """Keep batch rows `rows` (int64 [B'], repeats allowed: beams): each kept row gets its own
        copy of its pages, so later appends of two beams never share a page."""
        table = self.table[rows].long()
        used = table >= 0
        pages = table[used]
        self.k, self.v, self.pos = self.k[pages], self.v[pages], self.pos[pages]
        if self.score is not None:
            self.score = self.score[pages]
        self.npages = self.npages[rows.cpu()]
        self.table = _table(self.npages).to(self.k.device)
        self.lengths = self.lengths[rows]
        self.host_lengths = self.host_lengths[rows.cpu()]

    @property
    def nbytes(self):
        return self.k.nbytes + self.v.nbytes
