"""`vtattn.kv.CompressedCache`: a transformers Cache that compresses each layer once, at prefill,
to a per-(batch, kv head) keep-set, then stores it in pages (`pages.Pages`) and grows by appending.

How a layer works with `attn_implementation="vtattn"` (or the attention modules a
`vtattn.patch.llava(model, kv=...)` routes to it): the prefill's `update` returns the full
keys/values and publishes them in the forward's context (`vtattn.patch.core.publish`); vtattn's
attention function, handed those very tensors, claims the layer, which runs the prompt's attention
with its LSE, lets its policy choose the keep-set from exact scores (`key_importance`, no L x L
tensor), merges evicted image KV if the policy asks, and moves the kept rows to pages; the full prompt KV is then freed. Decode steps append and read
only the kept KV: a one-token `update` reserves the token's room and keeps it, and the attention call
that claims the layer writes and reads it in one op (`paged_decode_step`). Another attention implementation cannot read the pages: the next layer's
`update` raises.

Positions stay those of the uncompressed sequence: keys are cached after RoPE, and
`get_seq_length()` (and the mask sizes) count every token the layer was given, kept or not, so
`generate`'s cache_position / position ids continue from the uncompressed length. Padding (from
the attention mask) is never kept. A `DecodeH2O` policy also evicts while decoding (decode.py)."""
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import numpy as np
import numpy.typing as npt
import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from .._dispatch import Direct
from ..patch import core as _handoff  # the forward context vtattn's attention claims layers from
from .decode import StaticEviction, evict, prompt_mass
from .merge import merge_kv
from .pages import Pages, _device
from .policies import DecodeH2O, Policy, per_prompt

# the prefill's attention, with the arguments the cache builds valid (the public checks would read cu_seqlens)
_ATTENTION: Direct[tuple[torch.Tensor, torch.Tensor]] = Direct("attention")
_VARLEN: Direct[tuple[torch.Tensor, torch.Tensor]] = Direct("varlen_attention")
# a decode step, one handle for every layer and cache: `Pages.cls` and the query heads stamp its choice (a
# handle per layer chose again for every new cache and after each growth, ~40 us a layer)
_DECODE: Direct[torch.Tensor] = Direct("paged_decode_step", by_stamp=True)


class Frame(NamedTuple):
    """A prefill that holds a subsequence of the prompt, in order (FastV's pruned layers): each
    row's original position (int64 [B, L]), the prompt's length (decode tokens continue from
    it) and the rows' modality (in place of the cache's, which is the whole prompt's)."""
    positions: torch.Tensor
    length: int
    modality: torch.Tensor | None


class Shared:
    """What every layer that compresses one prompt reuses from the first (`CompressedCache.shared`):
    a fixed-size policy's keep-set sizes (`Policy.fixed_size`: then no layer after the first reads
    them from the device), the parts of the policy's plan that follow from the prompt alone
    (`policies.per_prompt`), and the pages' layouts (`Pages`' `layouts`). Holds its policy and
    modality, so the ids in its key stay theirs."""
    __slots__ = ("policy", "modality", "sizes", "memo", "layouts")

    def __init__(self, policy: Policy, modality: torch.Tensor | None) -> None:
        self.policy, self.modality = policy, modality
        self.sizes: npt.NDArray[np.int64] | None = None
        self.memo: dict[Any, Any] = {}
        self.layouts: dict[Any, Any] = {}


class Padding(NamedTuple):
    """A padded prompt's real tokens, from one host read of its mask: `valid` bool [B, L]; per
    sample the indices of its real tokens (`rows`); `flat` int64 [T]: b * L + l of every real
    token in order; `cu` int32 [B + 1]: cumulative counts; `longest`: the most real tokens of a sample."""
    valid: torch.Tensor
    rows: list[torch.Tensor]
    flat: torch.Tensor
    cu: torch.Tensor
    longest: int


class CompressedCache(Cache):
    """policy: a `vtattn.kv` policy for every layer, a list with one per layer (None keeps that
    layer whole, padding aside), or None (nothing evicted). page_size: tokens per page, the
    granularity of each head's capacity (the kernels look pages up per key: 1 wastes no slot).

    Dynamic (max_new_tokens=None): each head starts with room for `room` decode tokens (default:
    what its last page leaves, at least one; for a patched model's `generate`, the tokens it will
    append, up to a head's first growth: `upcoming`) and grows when it runs out (see `pages`).
    Static (max_new_tokens=n): each head's capacity is fixed at the prefill, its kept tokens plus n,
    rounded up to a page; lengths live on the device, a decode step reads and writes no host state,
    so it traces under torch.compile and replays in a CUDA graph (`generate(...,
    cache_implementation="static")` on a patched model makes one; `get_seq_length()` is then a
    device tensor, as transformers' StaticCache's); with DecodeH2O each head's capacity is its
    floor plus `every` instead, and it evicts on device counts (`decode.StaticEviction`).
    `modality` (bool [B, L], True = image token, or span ids) must be set before the prefill for
    policies that need it (LookM, Modality, merging); the patches set it."""

    layers: list["CompressedLayer"]

    def __init__(self, policy: Policy | list[Policy | None] | tuple[Policy | None, ...] | None = None, *,
                 page_size: int = 1, room: int | None = None, max_new_tokens: int | None = None) -> None:
        for name, n, low in (("page_size", page_size, 1), ("room", room, 1), ("max_new_tokens", max_new_tokens, 0)):
            if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < low):
                raise ValueError(f"{name} must be an int >= {low}, got {n!r}")
        if page_size is None:
            raise ValueError("page_size must be an int >= 1, got None")
        policies = policy if isinstance(policy, (list, tuple)) else [policy]
        for p in policies:
            if p is not None and not isinstance(p, Policy):
                raise TypeError(f"policy must be a vtattn.kv policy (LookM, SnapKV, ...), a list of them or None, "
                                f"got {type(p).__name__}")
        if max_new_tokens is not None and room is not None:
            raise ValueError("room is the headroom of a growing cache; a static one (max_new_tokens=) has exactly "
                             "max_new_tokens")
        super().__init__(layers=[])
        self.policy, self.page_size, self.room, self.max_new_tokens = policy, page_size, room, max_new_tokens
        self.modality: torch.Tensor | None = None
        # a dynamic cache without `room`: the tokens its owner (generate, through a patch) will append after the
        # prompt, sizing the heads' first layout (None: unknown)
        self.upcoming: int | None = None
        self._padding: dict[int, Padding | None] = {}  # the prompt's padding by its length (`padding`)
        # what the layers on one prompt share (`shared`), by (policy, length, modality, sample)
        self._shared: dict[tuple[int, int, int, int], Shared] = {}

    @property
    def static(self) -> bool:
        """Whether capacities are fixed at the prefill (max_new_tokens given)."""
        return self.max_new_tokens is not None

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args: Any,
               **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        while len(self.layers) <= layer_idx:
            i = len(self.layers)
            policy = self.policy[i] if isinstance(self.policy, (list, tuple)) else self.policy
            self.layers.append(CompressedLayer(self, i, policy))
        return self.layers[layer_idx].update(key_states, value_states)

    def padding(self, mask: torch.Tensor | None, L: int) -> Padding | None:
        """The padding of this cache's prompt of L tokens, from the first layer's mask: every layer
        that sees the whole prompt has the same (one host read per prefill, not per layer)."""
        if L not in self._padding:
            self._padding[L] = _padding(mask, L)
        return self._padding[L]

    def shared(self, policy: Policy, L: int, modality: torch.Tensor | None, sample: int = -1) -> "Shared":
        """What the layers compressing this prompt of L tokens with `policy` share (with this
        modality; `sample`: one sample's tokens alone): the first layer fills it, the others read it."""
        key = (id(policy), L, id(modality), sample)
        hit = self._shared.get(key)
        if hit is None or hit.policy is not policy or hit.modality is not modality:
            hit = self._shared[key] = Shared(policy, modality)
        return hit

    def reset(self) -> None:
        self._padding.clear()
        self._shared.clear()
        super().reset()

    def kept_positions(self, layer_idx: int) -> torch.Tensor:
        """int64 [B, Hkv, L]: the original positions each (batch, kv head) holds, ascending for the
        prompt then the decoded tokens, -1 padded to the longest head."""
        layer = self.layers[layer_idx]
        if layer.pages is None:
            raise ValueError(f"layer {layer_idx} has not been compressed yet (no prefill ran through it)")
        pos = layer.pages.positions()
        if layer._evict is None:
            return pos
        # a static DecodeH2O head refills its freed slots from its tail: its tokens are not in order
        last = torch.iinfo(torch.int64).max
        ordered = torch.where(pos < 0, last, pos).sort(-1).values
        return ordered.masked_fill_(ordered == last, -1)

    def host_seq_length(self) -> int:
        """`get_seq_length()` as the host counts it, never a sync (a static cache's is a device
        tensor): the tokens eager steps gave layer 0. The prefill always counts; compiled steps and
        CUDA graph replays do not, so it tells a new cache (0) from a filled one, not the length."""
        return self.layers[0].seen if self.layers else 0

    def kv_bytes(self) -> int:
        """Bytes allocated for keys and values over all layers (pages, or uncompressed prefill KV)."""
        return sum(layer.nbytes for layer in self.layers)


class CompressedLayer(CacheLayerMixin):
    keys: torch.Tensor | None  # the prompt's, until compressed
    values: torch.Tensor | None
    is_sliding = False
    is_croppable = False

    def __init__(self, cache: CompressedCache, index: int, policy: Policy | None) -> None:
        super().__init__()
        self.cache, self.index, self.policy = cache, index, policy
        self.is_compileable = cache.static
        self.seen = 0  # tokens given to this layer: the uncompressed length (host; eager steps only when static)
        # static: the same count as a device int64 scalar, updated in place by every step
        self.seen_t: torch.Tensor | None = None
        self.offset = 0  # original position of row `seen` minus `seen` (> 0 under FastV: fewer rows)
        self.pages: Pages | None = None
        # DecodeH2O: numpy int64 [B, Hkv], each head's length after the prefill, and what an eviction leaves
        # it (`base`'s setter): that, or `recent` where that is more (it never drops into its last `recent`)
        self._base: npt.NDArray[np.int64] | None = None
        self._floor: npt.NDArray[np.int64] | None = None
        # DecodeH2O: the decode queries since its last eviction, [B, Hq, n, D] each, and their n's sum
        self.queries: list[torch.Tensor] = []
        self.noted = 0
        self._evict: StaticEviction | None = None  # DecodeH2O on a static cache: its device-side eviction
        # a decode step's token, stored by `attend` in the op that reads the layer: (k, v, start)
        self._step: tuple[torch.Tensor, torch.Tensor, int | torch.Tensor] | None = None
        self._index: Direct[torch.Tensor] = Direct("index_attention")

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        if self.cache.static:
            self.seen_t = torch.zeros((), dtype=torch.int64, device=self.device)
        self.is_initialized = True

    def _positions(self, n: int) -> torch.Tensor:
        """The original positions of the n tokens given last: int64 [n] (device arithmetic when
        static: a compiled step reads no host count)."""
        if self.seen_t is None:
            start = self.seen - n + self.offset
            return torch.arange(start, start + n, device=self.device)
        return self.seen_t + (self.offset - n) + torch.arange(n, device=self.device)

    def _advance(self, n: int) -> None:
        if self.seen_t is not None:
            self.seen_t += n
        if not torch.compiler.is_compiling():  # host state stays out of compiled graphs
            self.seen += n

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any,
               **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        last = _handoff.pending()
        if (self.pages is None and self.keys is not None) or (
                last is not None and last.cache is self.cache and last.index == self.index - 1):
            raise RuntimeError("CompressedCache: a layer's keys were not read by vtattn's attention; run the model "
                               "with attn_implementation='vtattn', or patch it (vtattn.patch.llava / llm(model, kv=...))")
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        if self.pages is None:
            self.keys, self.values = key_states, value_states
            out = key_states, value_states
        else:
            start = self.seen + self.offset if self.seen_t is None else \
                self.seen_t if self.offset == 0 else self.seen_t + self.offset
            if self._evict is not None and key_states.shape[-2] != 1:
                raise NotImplementedError("a static CompressedCache with DecodeH2O decodes one token per step, got "
                                          f"{key_states.shape[-2]}; use the dynamic cache (max_new_tokens=None)")
            if key_states.shape[-2] == 1:  # a decode step: `attend` writes it, in the op that reads the layer
                if self._evict is None:  # (a static DecodeH2O head never outgrows floor + every: no host count)
                    self.pages.reserve(1)
                # (a static cache's count advances below, in place: its start is taken now)
                self._step = key_states, value_states, start.clone() if start is self.seen_t else start
            else:
                self.pages.append(key_states, value_states, start)
            out = self.pages.k, self.pages.v
        self._advance(key_states.shape[-2])
        _handoff.publish(self, out[0])  # the attention call given these very keys lets this layer attend
        return out

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, scale: float | None,
               frame: Frame | None = None,
               prefill: Callable[..., tuple[torch.Tensor, torch.Tensor]] | None = None) -> torch.Tensor:
        """Attention of q [B, Hq, n, D] over this layer after `update` returned (k, v): the prefill
        (then compression), or the kept KV plus the new tokens. Returns [B, Hq, n, D]. A prefill
        of a subsequence of the prompt (FastV's pruned layers) gives its `Frame`. `prefill`:
        (q, k, v, scale) -> (out, lse) in place of the unpadded prompt's causal attention (the patch's
        sparse prefill); compression then scores with its LSE."""
        if self.pages is None:
            # the prompt's padding, read on the host once for the layers that see the whole prompt
            pad = self.cache.padding(mask, k.shape[2]) if frame is None else _padding(mask, k.shape[2])
            out, lse = prefill(q, k, v, scale) if prefill is not None and pad is None else \
                _prefill_attention(q, k, v, pad, scale)
            if frame is not None:
                self.offset = frame.length - self.seen
            self._compress(q, k, v, lse, pad, scale, frame)
            self.keys = self.values = None
            return out
        # The registered ops' kernels (`_dispatch.Direct`), not the public functions: these arguments are
        # valid by construction, and the public checks of lengths, page ids and index lists would read
        # them on the host each step. The layout's class (`Pages.cls`) and the query heads stamp the backend choice.
        p = self.pages
        n, D = q.shape[2], q.shape[3]
        scale = D ** -0.5 if scale is None else float(scale)
        if n == 1:  # a decode step: its token's write, then the paged split-KV kernel; one op, no host sync
            assert self._step is not None  # (update kept it)
            k_new, v_new, start = self._step
            self._step = None
            out = _DECODE(q, *p.write_args(k_new, v_new, start), p.table, scale, stamp=(p.cls, q.shape[1]))
        else:
            B, H = p.lengths.shape
            # several new tokens (stored already): original positions give exact causality among them
            out = self._index(
                q, p.k.view(1, 1, -1, D).expand(B, H, -1, -1), p.v.view(1, 1, -1, D).expand(B, H, -1, -1), p.slots(),
                p.lengths, self._positions(n).expand(B, n).contiguous(), p.pos.view(1, -1).expand(B, -1).contiguous(),
                True, scale, stamp=p.k.shape[0])
        if self._evict is not None:
            self._evict.step(q.detach(), scale)
        elif isinstance(self.policy, DecodeH2O):
            self._decoded(q, scale, self.policy)
        return out

    def _decoded(self, q: torch.Tensor, scale: float, policy: DecodeH2O) -> None:
        """DecodeH2O: note the step's queries; every `every` tokens, score them and evict."""
        D = q.shape[-1]
        if q.requires_grad:  # scores only (under no_grad, as generate runs, nothing to detach)
            q = q.detach()
        self.queries.append(q if scale == D ** -0.5 else q * (scale * D ** 0.5))
        self.noted = n = self.noted + q.shape[2]
        if n >= policy.every:
            queries, self.queries, self.noted = torch.cat(self.queries, 2), [], 0
            assert self.pages is not None and self._floor is not None  # a compressed DecodeH2O layer
            evict(self.pages, queries, self.seen - n + self.offset, self._floor, policy.recent)

    def _compress(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lse: torch.Tensor,
                  pad: Padding | None, scale: float | None, frame: Frame | None) -> None:
        # The keep-set is a discrete choice and the cache is inference state: scores and stored rows carry
        # no gradient (key_importance and merge_tokens refuse inputs that require grad).
        q, k, v, lse = q.detach(), k.detach(), v.detach(), lse.detach()
        B, H, L, D = k.shape
        if scale is not None and scale != D ** -0.5:  # the policies score with the default scale
            q = q * (scale * D ** 0.5)
        modality = self.cache.modality if frame is None else frame.modality
        if modality is not None and tuple(modality.shape) != (B, L):
            raise ValueError(f"CompressedCache.modality must be [B, L] = {(B, L)} for this prefill, "
                             f"got {tuple(modality.shape)}")
        shared = None if self.policy is None else self.cache.shared(self.policy, L, modality)
        if pad is None and self.policy is not None:
            assert shared is not None
            with per_prompt(shared.memo):
                keep = self.policy.chosen(q, k, modality, lse, sizes=shared.sizes)
            indices, ranked = keep.indices, keep.scores
            assert keep.host_counts is not None  # (from_mask reads them, or was given them)
            host: npt.NDArray[np.int64] = keep.host_counts
            if self.policy.fixed_size:
                shared.sizes = host
        else:  # padding: each sample alone on its own tokens, as it would be without the others
            indices, host = _per_sample(self.cache, self.policy, q, k, lse, modality,
                                        [None] * B if pad is None else pad.rows)
            ranked = None
        merge = getattr(self.policy, "merge", None)
        if merge is not None:
            image = torch.ones_like(k[..., 0], dtype=torch.bool) if modality is None else \
                (modality if modality.dtype == torch.bool else modality >= 0)[:, None, :].expand(B, H, L)
            if pad is not None:
                image = image & pad.valid[:, None, :]
            k_rows, v_rows = merge_kv(k, v, indices, image, merge, getattr(self.policy, "merge_rule", "vtattn"))
        else:
            at = indices.clamp(min=0)[..., None].expand(*indices.shape, D)
            k_rows, v_rows = k.gather(2, at), v.gather(2, at)
        positions = indices if frame is None else torch.where(  # kept positions are the prompt's
            indices >= 0, frame.positions[:, None, :].expand(B, H, L).gather(2, indices.clamp(min=0)), -1)
        scores = None
        if isinstance(self.policy, DecodeH2O):
            scores = prompt_mass(self.policy, ranked, q, k, lse).gather(2, indices.clamp(min=0))
        # (a DecodeH2O layer never outgrows its prompt's count plus `every`: its room)
        upcoming = None if self.cache.room is not None or isinstance(self.policy, DecodeH2O) else self.cache.upcoming
        self.base = torch.from_numpy(host.copy()) if scores is not None else None
        self.pages = Pages(k_rows, v_rows, positions, host, self.cache.page_size, self._room(), scores,
                           fixed=self.cache.static, upcoming=upcoming or 0,
                           layouts=None if shared is None else shared.layouts)
        if scores is not None and self.cache.static:
            assert self._floor is not None and isinstance(self.policy, DecodeH2O)
            self._evict = StaticEviction(self.pages, self._floor, self.policy.every, self.policy.recent)
        if self.cache.max_new_tokens is not None:  # static
            self.limit = self.seen + self.cache.max_new_tokens
            if not torch.compiler.is_compiling():  # CUDA graphs replay on these very tensors (cf. StaticLayer)
                # (a decode step writes k, v, pos, next, lengths and seen_t in place: inductor's CUDA graphs
                # take no mutated input at an address that may change)
                p = self.pages
                held = (p.k, p.v, p.pos, p.next, p.table, p.lengths, p.start, p.last, self.seen_t)
                for t in held + ((p.score, *self._evict.tensors()) if self._evict is not None else ()):
                    torch._dynamo.mark_static_address(t)
                # a compiled decode step then calls the kernel chosen now for a step of these shapes
                assert self.seen_t is not None  # (static)
                step = p.write_args(k[:, :, -1:], v[:, :, -1:], self.seen_t)
                _DECODE.prepare(q[:, :, -1:], *step, p.table, D ** -0.5, stamp=(p.cls, q.shape[1]))
                if self._evict is not None:
                    self._evict.prepare(q[:, :, -1:], D ** -0.5)

    def _room(self) -> int | npt.NDArray[np.int64]:
        """Slots each head gets past its tokens: a static cache's max_new_tokens (with DecodeH2O, what
        takes each head from its kept tokens to its floor plus `every`: it never holds more); a growing
        one's `room` (default 1, and what the last page leaves; `upcoming` may add more in Pages), at
        least a DecodeH2O's `every` (its heads then never outgrow their pages: eviction compacts them
        in place)."""
        if self.cache.max_new_tokens is not None:  # static
            if self._floor is not None and self._base is not None and isinstance(self.policy, DecodeH2O):
                return self._floor - self._base + self.policy.every
            return self.cache.max_new_tokens
        room = self.cache.room or 1
        return max(room, self.policy.every) if isinstance(self.policy, DecodeH2O) else room

    @property
    def base(self) -> torch.Tensor | None:
        """DecodeH2O: int64 [B, Hkv] (host), each head's length after the prefill; else None."""
        return None if self._base is None else torch.from_numpy(self._base)

    @base.setter
    def base(self, value: torch.Tensor | None) -> None:
        self._base = None if value is None else value.numpy()
        policy = self.policy
        self._floor = np.maximum(self._base, policy.recent) if self._base is not None and isinstance(
            policy, DecodeH2O) else None

    @property
    def nbytes(self) -> int:
        if self.pages is not None:
            return self.pages.nbytes
        return 0 if self.keys is None or self.values is None else self.keys.nbytes + self.values.nbytes

    def get_seq_length(self) -> int | torch.Tensor:
        """Tokens given to the layer (the uncompressed length): an int, a device tensor when static."""
        return self.seen if self.seen_t is None else self.seen_t

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        # A static cache's masks keep one size from the prefill on (a compiled step sees one shape);
        # compressed layers never read a decode step's mask.
        if self.pages is not None and self.cache.static:
            return self.limit, 0
        return self.seen + query_length, 0

    def get_max_length(self) -> int:
        return self.limit if self.pages is not None and self.cache.static else -1

    def reset(self) -> None:
        self.keys = self.values = self.pages = self.base = None
        self.queries, self.noted = [], 0
        self._step = self._evict = None
        self.seen = self.offset = 0
        if self.seen_t is not None:
            self.seen_t.zero_()
        self.is_initialized = False

    def reorder_cache(self, beam_idx: torch.Tensor) -> None:
        self.batch_select_indices(beam_idx)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if self.pages is not None:
            self._take(self.pages, torch.as_tensor(indices, device=self.pages.k.device).long())

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.pages is not None:
            B = self.pages.lengths.shape[0]
            self._take(self.pages, torch.arange(B, device=self.pages.k.device).repeat_interleave(repeats))

    def _take(self, pages: Pages, rows: torch.Tensor) -> None:
        pages.take(rows)
        self.queries = [x[rows] for x in self.queries]
        if self._base is not None:
            self.base = torch.from_numpy(self._base[rows.cpu().numpy()])
        if self._evict is not None:  # (in place: CUDA graphs replay on it)
            self._evict.floor.copy_(self._evict.floor[rows])


def _padding(mask: torch.Tensor | None, L: int) -> Padding | None:
    """The padding of a prefill's 4-D attention mask (its last row sees every real key), or None
    when nothing is padded: one host read; the index lists are built there."""
    if mask is None:
        return None
    valid = _handoff.prompt_padding(mask, L).bool()
    host = valid.cpu().numpy()
    if host.all():
        return None
    counts = host.sum(1)
    cu = np.concatenate([[0], np.cumsum(counts)]).astype(np.int32)
    return Padding(valid, [_device(np.flatnonzero(h), valid.device) for h in host],
                   _device(np.flatnonzero(host), valid.device), _device(cu, valid.device), int(counts.max()))


def _prefill_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pad: Padding | None,
                       scale: float | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Causal attention of the prompt and its LSE [B, Hq, L]; with padding, the real tokens of each
    sample packed into one varlen call (padded rows: out 0, LSE +inf, so they weigh nothing). The
    registered ops: these arguments are valid by construction (the public checks would read cu_seqlens)."""
    B, Hq, L, D = q.shape
    scale = D ** -0.5 if scale is None else float(scale)
    if pad is None:
        return _ATTENTION(q, k, v, True, scale, 0.0, -1, None)
    q_p, k_p, v_p = [t.transpose(1, 2).reshape(B * L, *t.shape[1:2], D).index_select(0, pad.flat) for t in (q, k, v)]
    out_p, lse_p = _VARLEN(q_p, k_p, v_p, pad.cu, pad.cu, pad.longest, True, scale, 0.0, -1, None)
    out = q.new_zeros(B * L, Hq, D).index_copy_(0, pad.flat, out_p)
    lse = torch.full((B * L, Hq), float("inf"), device=q.device).index_copy_(0, pad.flat, lse_p.t())
    return out.view(B, L, Hq, D).transpose(1, 2), lse.view(B, L, Hq).transpose(1, 2)


def _per_sample(cache: CompressedCache, policy: Policy | None, q: torch.Tensor, k: torch.Tensor, lse: torch.Tensor,
                modality: torch.Tensor | None,
                rows: Sequence[torch.Tensor | None]) -> tuple[torch.Tensor, npt.NDArray[np.int64]]:
    """indices [B, H, K] (original positions, -1 padded) and the counts [B, H] on the host, with each
    sample's policy run on its own real tokens (`rows[b]`, None = all; the sizes of a fixed-size
    policy read once per prompt and sample, `cache.shared`)."""
    B, H, L = k.shape[:3]
    found: list[tuple[torch.Tensor, npt.NDArray[np.int64]]] = []
    for b, r in enumerate(rows):
        r = torch.arange(L, device=k.device) if r is None else r
        if policy is None:
            found.append((r.expand(H, len(r)), np.full(H, len(r))))
            continue
        mod = None if modality is None else modality[b:b + 1, r]
        shared = cache.shared(policy, len(r), modality, b)
        with per_prompt(shared.memo):
            keep = policy.chosen(q[b:b + 1, :, r], k[b:b + 1, :, r], mod, lse[b:b + 1, :, r], sizes=shared.sizes)
        assert keep.host_counts is not None  # (from_mask reads them, or was given them)
        if policy.fixed_size:
            shared.sizes = keep.host_counts
        idx = keep.indices[0]
        found.append((torch.where(idx >= 0, r[idx.clamp(min=0)], -1), keep.host_counts[0]))
    K = max(i.shape[-1] for i, _ in found)
    indices = torch.full((B, H, K), -1, dtype=torch.int64, device=k.device)
    for b, (i, _) in enumerate(found):
        indices[b, :, :i.shape[-1]] = i
    return indices, np.stack([c for _, c in found]).astype(np.int64)
