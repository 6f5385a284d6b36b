"""What the stages keep per cache (`Filled`): a prefill's records, held by the cache itself and
forgotten when it is reset. A cache's edits are followed on the host: its `reset()` / `crop()` calls
are counted (a static cache's length is a device count, never read), and a table given `rows`
applies the cache's row selections (`reorder_cache`: beam search; `batch_select_indices`) to its
records, on the device."""
from __future__ import annotations

import itertools
import weakref
from collections.abc import Callable
from typing import Any

import torch

# A table's row selection: (its record for a cache, int64 row indices [B']) -> None, the record then
# holding those rows of the batch (in that order, repeats allowed) as the cache does.
Rows = Callable[[Any, torch.Tensor], None]
_ROW_EDITS = ("reorder_cache", "batch_select_indices")


class _Counted:
    """A cache's own `reset` / `crop` (set on the instance by `Filled`), counting its calls on the host."""

    def __init__(self, cache: Any, name: str) -> None:
        self.cache, self.name, self.calls = weakref.ref(cache), name, 0

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        self.calls += 1
        cache = self.cache()
        return getattr(type(cache), self.name)(cache, *args, **kwargs)

    def __reduce__(self) -> tuple[Any, ...]:  # a copy of the cache (deepcopy, pickle) counts its own calls
        return _Counted, (self.cache(), self.name)


def _edits(cache: Any) -> tuple[int, int]:
    """(resets, crops) of `cache` since it was first asked (host counts: each method wrapped once)."""
    counts = []
    for name in ("reset", "crop"):
        counted = cache.__dict__.get(name)
        if not isinstance(counted, _Counted) or counted.cache() is not cache:  # (a shallow copy's: the original's)
            if getattr(type(cache), name, None) is None:
                counts.append(0)
                continue
            counted = _Counted(cache, name)
            setattr(cache, name, counted)
        counts.append(counted.calls)
    return counts[0], counts[1]


class _Selected:
    """A cache's own `reorder_cache` / `batch_select_indices` (set on the instance by a `Filled` with
    `rows`): the cache's, then the same rows for each current record of such a table."""

    def __init__(self, cache: Any, name: str) -> None:
        self.cache, self.name = weakref.ref(cache), name

    def __call__(self, index: torch.Tensor) -> Any:
        cache = self.cache()
        out = getattr(type(cache), self.name)(cache, index)
        held = _held(cache)
        if held is not None:
            resets = _edits(cache)[0]
            for key, rows in held.rows.items():
                entry = held.entries.get(key)
                if entry is not None and entry[0] == resets:
                    rows(entry[2], index)
        return out

    def __reduce__(self) -> tuple[Any, ...]:  # a copy of the cache selects its own rows
        return _Selected, (self.cache(), self.name)


class _Held:
    """What the stages' prefills left in one cache (`Filled`), held by the cache itself (attribute
    `_vtattn_held`); its owner's only: a copy of the cache (copy, deepcopy, pickle) holds none of it."""
    __slots__ = ("owner", "entries", "rows")

    def __init__(self, cache: Any = None) -> None:
        self.owner = None if cache is None else weakref.ref(cache)
        self.entries: dict[str, tuple[int, int, Any]] = {}  # table's key -> (resets, crops when set, value)
        self.rows: dict[str, Rows] = {}  # table's key -> its row selection (tables given one)

    def __reduce__(self) -> tuple[Any, ...]:
        return _Held, ()


def _held(cache: Any) -> _Held | None:
    """The cache's own `_Held`, or None (a shallow copy of a cache shares the original's: not its own)."""
    held: _Held | None = getattr(cache, "_vtattn_held", None)
    return held if held is not None and held.owner is not None and held.owner() is cache else None


_UNNAMED = itertools.count()


class Filled:
    """cache -> what a stage's prefill left in it (a vision.Shrink, drop's Records), forgotten once the
    cache is reset. A static cache's length is a device counter: reading it to tell a reset cache from
    the one filled would sync the host in every decode step, so its `reset()` / `crop()` calls are
    counted on the host instead. The entries live on the cache (`_Held`): a compiled decode step reads
    them through its cache argument, so the new cache of each generate call compiles nothing new (a
    table keyed by caches had dynamo guard on its keys: a recompile per call, then a failed guard).
    Keyed there by `key`, which `install` makes the table's place in the patch (stage index, class,
    attribute): a new patch of the same stages compiles nothing new either (keyed by the tables
    themselves, dynamo guarded on their identity: a recompile per patch, eager after 8)."""

    def __init__(self, rows: Rows | None = None) -> None:
        self.key = f"@{next(_UNNAMED)}"  # until `install` names it (never an id: a dead table's may come back)
        self.rows = rows  # None: records that every beam of a sample shares (a beam reorder keeps them right)

    def renew(self) -> None:
        """Forget every cache's entry: a new key (the entries already set are never read again)."""
        self.key += "'"

    def _entry(self, cache: Any) -> tuple[int, int, Any] | None:
        held = _held(cache)
        return None if held is None else held.entries.get(self.key)

    def get(self, cache: Any) -> Any:
        entry = None if cache is None else self._entry(cache)
        return entry[2] if entry is not None and entry[0] == _edits(cache)[0] else None

    def __contains__(self, cache: Any) -> bool:
        return self.get(cache) is not None

    def __setitem__(self, cache: Any, value: Any) -> None:
        held = _held(cache)
        if held is None:
            held = cache._vtattn_held = _Held(cache)
        held.entries[self.key] = (*_edits(cache), value)
        if self.rows is not None:
            held.rows[self.key] = self.rows
            for name in _ROW_EDITS:
                selected = cache.__dict__.get(name)
                if getattr(type(cache), name, None) is not None and \
                        (not isinstance(selected, _Selected) or selected.cache() is not cache):
                    setattr(cache, name, _Selected(cache, name))

    def pop(self, cache: Any) -> None:
        held = _held(cache)
        if held is not None:
            held.entries.pop(self.key, None)

    def cropped(self, cache: Any) -> bool:
        """`cache.crop()` ran since its entry was set."""
        entry = self._entry(cache)
        assert entry is not None  # (asked of a cache this table holds)
        return entry[1] != _edits(cache)[1]
