"""One layer's compact KV storage: each (batch, kv head) owns one contiguous run of pages.

Pools k, v [P, page_size, D] hold every page of the layer. Head (b, h) owns `capacity[b, h]` slots
(whole pages) from flat slot `start[b, h]` on, its tokens first: token t of the head is flat slot
`start + t`, so an append writes at `start + lengths` (device arithmetic: no host read), and the
paged decode kernel reads the head through `table` int32 [B, Hkv, max_pages] (its pages in order,
-1 past its own). `lengths` int32 [B, Hkv] counts each head's tokens, `pos` int64 [P, page_size]
their original positions (-1 in unused slots); with `scores`, a fp32 pool `score` follows the
tokens (decode-time eviction's accumulated attention mass; appended tokens start at 0).

Capacity: each head gets its kept tokens plus `room` slots, rounded up to whole pages, so the bytes
allocated follow each head's kept count (never the longest head's), within one page per head. The
kernels look a key's page up per key, so the page size is the allocation's granularity only.
A fixed layout (a static cache) never grows: `room` is the most tokens it will append, and its
tensors keep their addresses (CUDA graphs replay on them). A growing layout tracks the lengths on
the host (each append adds the same count to every head) and, when a head's free slots run out,
moves into a larger layout: each head then gets a quarter of its length more (at least GROWTH
tokens), so the copies add up to a constant number of copies of each token however long the
decoding. Told how many tokens will come (`upcoming`: generate's), a head starts with room for
them, up to what its first growth would give it: a short decode never relayouts, a long one holds
no more than growth would.
Host-side state (lengths, capacities, starts) is numpy: reading or growing it never touches the
device, so no decode step waits for one (growth and relayouts included)."""
from typing import Any, NamedTuple

import numpy as np
import numpy.typing as npt
import torch

from .._dispatch import _INT32_LIMIT, Direct

Host = npt.NDArray[np.int64]  # host-side counts, [B, H]
# the write of new tokens: one op, no validation; `Pages.cls` stamps its backend choice
_APPEND: Direct[None] = Direct("paged_append", by_stamp=True)


# a growth gives each head a quarter of its length more, at least this many tokens
GROWTH = 16


def _round_up(n: Host, m: int) -> Host:
    return (n + m - 1) // m * m


def _growth(lengths: Host, n: int) -> Host:
    """Slots each head gets past its length when its layout grows for n more tokens."""
    return np.maximum(lengths // 4, max(GROWTH, n))


def _same(counts: Host) -> int | None:
    """The count every head has, or None where they differ."""
    return int(counts.flat[0]) if counts.size and (counts == counts.flat[0]).all() else None


def _by_head(pool: torch.Tensor, capacity: Host) -> torch.Tensor:
    """pool [P, page_size, ...] as [B, H, c, ...] for heads of one capacity c (`_same`): their runs lie
    back to back from slot 0."""
    return pool.view(*capacity.shape, int(capacity.flat[0]), *pool.shape[2:])


def _device(array: npt.NDArray[Any], device: torch.device) -> torch.Tensor:
    """A numpy array on `device`: a host-to-device copy, never a wait for the device (from pinned
    memory: a copy from pageable memory may wait for the stream)."""
    host = torch.from_numpy(np.ascontiguousarray(array))
    return (host.pin_memory() if device.type == "cuda" else host).to(device, non_blocking=True)


class _Layout(NamedTuple):
    """Where each head's run lies, for given lengths and capacities: what the layers of one prompt
    can share (read only; each layer has its own pools and counts)."""
    cls: tuple[Any, ...]
    capacity: Host
    room: int
    host_start: Host
    start: torch.Tensor
    table: torch.Tensor
    last: torch.Tensor | None
    width: int
    slots: int


class Pages:
    _host: Host  # host_lengths, without the appends since it was last read
    _appended: int

    def __init__(self, k_rows: torch.Tensor, v_rows: torch.Tensor, positions: torch.Tensor, counts: torch.Tensor | Host,
                 page_size: int, room: int | Host, scores: torch.Tensor | None = None, fixed: bool = False,
                 upcoming: int = 0, layouts: dict[Any, _Layout] | None = None) -> None:
        """k_rows, v_rows [B, H, K, D]: each head's kept rows, valid up to counts [B, H] (int64, on
        the host or the device); positions int64 [B, H, K]: their original positions; scores: None
        or fp32 [B, H, K]; room: slots each head gets past its kept rows (an int, or numpy [B, H]);
        fixed: never grow; upcoming: tokens the caller expects to append (a growing layout's heads get
        room for them, up to their first growth); layouts: where the layers of one prompt share their layouts (the
        same counts give the same runs and table: ~10 small ops a layer)."""
        self.page_size, self.fixed = page_size, fixed
        self._bound: tuple[Host, Host, int] | None = None  # shrink's (floor, capacity, the room floor leaves)
        # a decode step's start position, as a CPU scalar the kernels read at launch: written in place
        # through its numpy view (a torch op per layer and step costs ~4 us in a model's step on CPU)
        self._start_host = np.zeros((), dtype=np.int64)
        self._start = torch.from_numpy(self._start_host)
        # int64 numpy [B, H]: the one host sync of a compression (none for counts given in numpy)
        lengths = (counts if isinstance(counts, np.ndarray) else counts.cpu().numpy()).astype(np.int64)
        self.host_lengths = lengths
        slack = np.maximum(room, np.minimum(upcoming, _growth(lengths, 0))) if upcoming and not fixed else room
        self._allocate(lengths, _round_up(lengths + slack, page_size), k_rows, scores is not None, layouts)
        self._store(k_rows, v_rows, positions, scores)

    @property
    def host_lengths(self) -> Host:
        """int64 numpy [B, H]: each head's tokens, on the host."""
        if self._appended:
            self._host, self._appended = self._host + self._appended, 0
        return self._host

    @host_lengths.setter
    def host_lengths(self, value: Host) -> None:
        self._host, self._appended = value, 0

    def _allocate(self, lengths: Host, capacity: Host, like: torch.Tensor, with_scores: bool,
                  layouts: dict[Any, _Layout] | None = None) -> None:
        """Empty pools for numpy int64 `lengths` / `capacity` [B, H] (capacity in whole pages), in
        the layout `layouts` holds for them if any; the device counts (`lengths`, `next`) are the
        caller's to set."""
        key = (lengths.tobytes(), capacity.tobytes(), capacity.shape, like.dtype, like.shape[-1], like.device,
               self.page_size, self.fixed, with_scores)
        layout = None if layouts is None else layouts.get(key)
        if layout is None:
            layout = self._layout(lengths, capacity, like, with_scores)
            if layouts is not None:
                layouts[key] = layout
        self.cls, self.capacity, self.room, self.host_start, self.start, self.table, last, self.width, slots = layout
        if last is not None:
            self.last = last
        ps, D, device = self.page_size, like.shape[-1], like.device
        self.k = like.new_empty(slots // ps, ps, D)
        self.v = like.new_empty(slots // ps, ps, D)
        self.pos = torch.full((slots // ps, ps), -1, dtype=torch.int64, device=device)
        self.score = torch.zeros(slots // ps, ps, device=device) if with_scores else None

    def _layout(self, lengths: Host, capacity: Host, like: torch.Tensor, with_scores: bool) -> _Layout:
        B, H = capacity.shape
        ps, device = self.page_size, like.device
        # what the backends' choice for this layout's ops reads (Direct's stamp): the tokens appended and the
        # queries are the model's own, of the pools' dtype and device; a fixed layout's start is on the device;
        # of the sizes, only whether a head's capacity fits int32 (the CUDA kernels' limit), so growth keeps it
        cls = (like.dtype, device, B, H, like.shape[-1], self.fixed, with_scores,
               int(capacity.max(initial=0)) >= _INT32_LIMIT)
        pages = capacity // ps
        host_start = (np.cumsum(pages) - pages.ravel()).reshape(B, H) * ps
        start = _device(host_start, device)
        # made on the device: a table entry per page of every head (pages of a few tokens: as many as slots)
        cols = torch.arange(int(pages.max(initial=0)), device=device)
        table = torch.where(cols < _device(pages, device)[..., None], (start // ps)[..., None] + cols, -1).to(torch.int32)
        # a fixed layout's writes are clamped to each head's last slot (write_args)
        last = _device(np.maximum(host_start + capacity - 1, 0), device) if self.fixed else None
        return _Layout(cls, capacity, int((capacity - lengths).min()) if lengths.size else 0, host_start, start, table,
                       last, int(capacity.max()) if capacity.size else 0, int(pages.sum()) * ps)

    def _store(self, k_rows: torch.Tensor, v_rows: torch.Tensor, positions: torch.Tensor,
               scores: torch.Tensor | None) -> None:
        """Write each head's first host_lengths[b, h] rows of [B, H, K, ...]: one strided copy a pool
        where every head has one length and one capacity (a uniform policy's prompt), else through
        slot lists made on the host (the lengths are known there). No host sync."""
        K, device = k_rows.shape[2], self.k.device
        pairs = [(self.k, k_rows), (self.v, v_rows), (self.pos, positions)]
        if scores is not None:
            assert self.score is not None  # allocated with_scores
            pairs.append((self.score, scores))
        n = _same(self.host_lengths)
        if n is not None and _same(self.capacity) is not None:
            for pool, rows in pairs:
                _by_head(pool, self.capacity)[:, :, :n].copy_(rows[:, :, :n])
        else:
            stored = np.arange(K) < self.host_lengths[..., None]
            src = _device(np.flatnonzero(stored), device)
            dst = _device((self.host_start[..., None] + np.arange(K))[stored], device)
            for pool, rows in pairs:  # pools [P, page_size, ...] and rows [B, H, K, ...] by slot
                rows = rows.reshape(-1, *rows.shape[3:]).index_select(0, src)
                pool.view(-1, *pool.shape[2:]).index_copy_(0, dst, rows.to(pool.dtype))
        self.lengths = _device(self.host_lengths.astype(np.int32), device)
        self.next = self.start + self.lengths  # the next write's slot

    def append(self, k: torch.Tensor, v: torch.Tensor, start: int | torch.Tensor) -> None:
        """Store k, v [B, H, n, D] after each head's tokens, at original positions start..start+n-1
        (`start` an int, or an int64 device scalar: a static cache's count). No host sync; one
        device op (`paged_append`)."""
        self.reserve(k.shape[2])
        _APPEND(*self.write_args(k, v, start), stamp=self.cls)

    def reserve(self, n: int) -> None:
        """Room for n more tokens per head (a growing layout moves into a larger one first); the
        write is `append`'s, or a decode step's `paged_decode_step` (`write_args`). Host bookkeeping only,
        none under torch.compile."""
        if torch.compiler.is_compiling():  # host bookkeeping stays out of compiled graphs
            return
        if n > self.room:
            lengths = self.host_lengths  # (after an eviction `room` is only a lower bound)
            self.room = int((self.capacity - lengths).min()) if lengths.size else 0
        if n > self.room:
            if self.fixed:
                raise RuntimeError(f"a static CompressedCache layer has room for {self.room} more tokens, "
                                   f"{n} were appended (size it with max_new_tokens)")
            self._grow(n)
        self._appended += n  # folded into host_lengths when read: a decode step runs no numpy
        self.room -= n

    def write_args(self, k: torch.Tensor, v: torch.Tensor, start: int | torch.Tensor) -> tuple[Any, ...]:
        """paged_append's arguments for k, v written at original positions from `start` (after `reserve`)."""
        if k.requires_grad or v.requires_grad:  # the cache is inference state (as its compressed prefill)
            k, v = k.detach(), v.detach()
        if not isinstance(start, torch.Tensor):  # a CPU scalar: the kernels read it at launch, no copy
            if torch.compiler.is_compiling():
                start = torch.scalar_tensor(start, dtype=torch.int64)
            else:
                self._start_host[()] = start
                start = self._start
        # a fixed layout clamps each write to its head's last slot: replays and compiled steps skip the host check
        return (self.k, self.v, self.pos, self.next, self.lengths, k, v, start, self.last if self.fixed else None,
                self.score)

    def _grow(self, n: int) -> None:
        """Move into a layout where every head has room for n more tokens (and a quarter of its length)."""
        lengths = self.host_lengths
        extra = _growth(lengths, n)
        device, old_start, old_capacity = self.k.device, self.host_start, self.capacity
        old = [self.k, self.v, self.pos] + ([self.score] if self.score is not None else [])
        self._allocate(lengths, _round_up(lengths + extra, self.page_size), self.k, self.score is not None)
        new = [self.k, self.v, self.pos] + ([self.score] if self.score is not None else [])
        # Each head's tokens move from its old run to its new one (no sync; the lengths stay): one strided
        # copy a pool where every head has one length and capacity, else through slot lists made on the host.
        m = _same(lengths)
        if m is not None and _same(old_capacity) is not None and _same(self.capacity) is not None:
            for pool, before in zip(new, old):
                _by_head(pool, self.capacity)[:, :, :m].copy_(_by_head(before, old_capacity)[:, :, :m])
        else:
            cols = np.arange(int(lengths.max()) if lengths.size else 0)
            stored = cols < lengths[..., None]
            src = _device((old_start[..., None] + cols)[stored], device)
            dst = _device((self.host_start[..., None] + cols)[stored], device)
            for pool, before in zip(new, old):  # by slot
                slot = pool.shape[2:]
                pool.view(-1, *slot).index_copy_(0, dst, before.view(-1, *slot).index_select(0, src))
        self.next = self.start + self.lengths  # (the device lengths stay)

    def shrink(self, counts: Host, floor: Host) -> None:
        """Each head now holds its first counts[b, h] <= floor[b, h] tokens: decode-time eviction's
        `paged_evict` moved them to the front of its run and set the device counts (`lengths`,
        `next`); the host's follow. `room` becomes a lower bound, the larger of the one before and
        the room floor leaves (counted once per floor and layout: a numpy reduction costs ~10 us cold
        in a model's step), which `reserve` counts again before it would grow. Pools, table and
        capacities stay."""
        self.host_lengths = counts
        bound = self._bound
        if bound is None or bound[0] is not floor or bound[1] is not self.capacity:
            bound = self._bound = (floor, self.capacity, int((self.capacity - floor).min()) if floor.size else 0)
        self.room = max(self.room, bound[2])

    def slots(self) -> torch.Tensor:
        """int64 [B, H, W] flat slot of each head's tokens, -1 past its length (W: the widest
        capacity). No host sync."""
        t = torch.arange(self.width, device=self.k.device)
        return torch.where(t < self.lengths[..., None], self.start[..., None] + t, -1)

    def positions(self) -> torch.Tensor:
        """int64 [B, H, L]: the original positions of each head's tokens in order, -1 padded to the
        longest head."""
        slots = self.slots()[..., :int(self.lengths.max()) if self.lengths.numel() else 0]
        return torch.where(slots >= 0, self.pos.view(-1)[slots.clamp(min=0)], -1)

    def take(self, rows: torch.Tensor) -> None:
        """Keep batch rows `rows` (int64 [B'], repeats allowed: beams): each kept row gets its own
        copy of its tokens, so later appends of two beams never share a slot. A fixed layout copies
        in place (rows of equal capacities only: beams of one sample), from the device lengths."""
        D = self.k.shape[-1]
        host = rows.cpu().numpy()
        pools = [self.k.view(-1, D), self.v.view(-1, D), self.pos.view(-1)]
        if self.score is not None:
            pools.append(self.score.view(-1))
        if self.fixed:  # the tensors keep their addresses: CUDA graphs replay on them
            if not np.array_equal(self.capacity[host], self.capacity):
                raise NotImplementedError("a static CompressedCache can only reorder rows of equal capacity (beams "
                                          "of one sample); use the dynamic CompressedCache")
            cols = np.arange(self.width)
            inside = cols < self.capacity[..., None]
            src = _device((self.host_start[host][..., None] + cols)[inside], self.k.device)
            dst = _device((self.host_start[..., None] + cols)[inside], self.k.device)
            for pool in pools:
                pool.index_copy_(0, dst, pool.index_select(0, src))
            self.lengths.copy_(self.lengths[rows])
            self.next.copy_(self.start + self.lengths)
            self.host_lengths = self.host_lengths[host]
            self.room = int((self.capacity - self.host_lengths).min()) if self.host_lengths.size else 0
            return
        flat = self.slots()[rows].clamp(min=0)
        data = [pool[flat] for pool in pools]
        self._allocate(self.host_lengths[host], self.capacity[host], self.k, self.score is not None)
        self.host_lengths = self.host_lengths[host]
        self._store(data[0], data[1], data[2], data[3] if len(data) > 3 else None)

    @property
    def nbytes(self) -> int:
        return self.k.nbytes + self.v.nbytes
