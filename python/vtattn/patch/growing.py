"""A tensor that grows along one dimension while decoding (CMAI's per-cache records)."""
from __future__ import annotations

import torch


class Growing:
    """A tensor grown along `dim` by appended entries, kept in a buffer whose capacity doubles when full:
    n entries cost O(n) amortised where torch.cat would copy every entry so far at each step. `filled`
    is a view of the entries so far; only host ints track the size, so growing syncs with nothing."""

    def __init__(self, first: torch.Tensor, dim: int, room: int | None = None) -> None:
        """room: the entries to come, when known (a static cache's decode tokens): reserved now, plus a
        spare one (a compiled step whose write ended at the buffer's end would be specialized on it), at
        a static address (a CUDA graph of the step writes there); the buffer then never moves."""
        self.data, self.dim, self.size = first, dim, first.shape[dim]  # `first` is never written to
        self.reserved = room is not None
        if room is not None:
            shape = list(first.shape)
            shape[dim] += room + 1
            self.data = first.new_empty(shape)
            self.filled.copy_(first)
            if not torch.compiler.is_compiling():
                torch._dynamo.mark_static_address(self.data)

    @property
    def filled(self) -> torch.Tensor:
        return self.data.narrow(self.dim, 0, self.size)

    def grow(self, n: int) -> torch.Tensor:
        """Room for n more entries (uninitialised; written by the caller): the view of all of them."""
        size = self.size + n
        if size > self.data.shape[self.dim]:
            shape = list(self.data.shape)
            shape[self.dim] = max(size, 2 * shape[self.dim])
            data = self.data.new_empty(shape)
            data.narrow(self.dim, 0, self.size).copy_(self.filled)
            self.data = data
        self.size = size
        return self.filled

    def append(self, new: torch.Tensor) -> torch.Tensor:
        """`new`'s entries after the others: the view of all of them."""
        n = new.shape[self.dim]
        out = self.grow(n)
        out.narrow(self.dim, self.size - n, n).copy_(new)
        return out

    def select(self, index: torch.Tensor) -> None:
        """Keep the rows `index` of dim 0 (a cache's rows selected: beams reordered): in place in a
        reserved buffer of as many rows (its address stays static), else in a new buffer."""
        picked = self.data.index_select(0, index.to(self.data.device))
        if self.reserved and picked.shape == self.data.shape:
            self.data.copy_(picked)
        else:
            self.data = picked
