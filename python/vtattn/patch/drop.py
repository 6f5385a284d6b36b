"""Tokens leaving a language model's sequence from decoder layer K on (FastV's mechanics), shared by
the stages that prune inside the LLM: `FastV` (K >= 1, scored at layer K-1), `VisualExit` (every
image token leaves at K) and, for Qwen2-VL, `VisionSelect` at the LLM's input (K = 0, scored in the
ViT). Several of them may drop at different layers of one language model (Qwen2-VL's VisionSelect
at 0 then VisualExit at K; FastV at K then VisualExit at K' > K): each exit layer starts a group of
layers holding what the exits up to it kept.

How it runs in a transformers Llama-style decoder, whose layer loop hands every layer the same
kwargs (mask, RoPE tables, position ids):
- Prefill: a forward pre-hook on an exit layer K asks the owning stage which image tokens stay
  (`choose`; a token an earlier exit dropped stays out), gathers the kept rows of the hidden
  states, RoPE tables and position ids: kept tokens keep their original positions (RoPE gaps).
- Layers before the first exit cache the whole sequence, each later group its kept tokens.
  Everything `generate` sees (masks, positions, layer 0's cache length) stays in the full
  sequence's frame, so decoding needs nothing special.
- Layers from the first exit on are routed to vtattn's attention, where this forward's hook runs
  `vtattn.index_attention`: every sample lists its own cache slots and causality follows the
  original positions, so samples may keep different numbers of tokens without a padded mask. A
  sample's kept tokens are right-aligned in its group's cache; the leading slots of a shorter
  sample are never listed. A decode step's single query sees every cached key causally: there the
  real slots are the whole mask, and one SDPA call with it runs the layer.
- With a `vtattn.kv.CompressedCache`, such a layer hands its prefill to the cache layer instead,
  with the slots' original positions and padding (a `Frame`): it compresses the kept tokens and
  attends over what it keeps, prefill and decode.
"""
from __future__ import annotations

import functools
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from .._dispatch import Direct
from . import core
from .filled import Filled
from .hf_attention import count

if TYPE_CHECKING:
    from ..kv.cache import CompressedLayer

_INDEX: Direct[torch.Tensor] = Direct("index_attention")
# What an exit's rule returns: the kept image tokens [B, N] bool, or (kept, slots [B, R] full-sequence
# indices of kept tokens (-1: none), rows [B, R, C]): those tokens enter the exit layer as `rows`.
Chosen = torch.Tensor | tuple[torch.Tensor, torch.Tensor, torch.Tensor]


class Step:
    """One forward with tokens dropping. A prefill has images / real / pads (and `scores`, where the
    owning stage records them), each exit's `choose`, and fills each exit's layer_kwargs and record
    at that layer; a decode step has only the records ({exit layer: Record})."""

    def __init__(self, images: torch.Tensor | None = None, real: torch.Tensor | None = None,
                 pads: list[int] | None = None, records: dict[int, Record] | None = None) -> None:
        self.images, self.real, self.pads = images, real, pads
        self.records: dict[int, Record] = {} if records is None else records
        self.choose: dict[int, Callable[[Step], Chosen]] = {}
        self.hidden: torch.Tensor | None = None  # while an exit's choose runs: its layer's input (previous group)
        self.replace: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # exit -> (slots, rows): see Drop.forward
        self.scores: torch.Tensor | None = None
        self.layer_kwargs: dict[int, dict[str, Any]] = {}
        self.index_args: dict[int, dict[str, torch.Tensor]] = {}
        self.masks: dict[int, torch.Tensor] = {}  # exit -> a decode step's additive [B, 1, 1, S] padding mask
        self.kept: dict[int, torch.Tensor] = {}  # exit layer -> [B, N] bool: the input tokens kept from there on
        self.static = False  # the cache is a StaticCache: a layer's keys are its capacity, the first slots filled
        self.room: int | None = None  # a prefill's: the decode tokens a static cache takes (core.static_room)


class Record:
    """The cache of one group of layers (from an exit on): per slot its index in the full sequence
    (its position for causality) and whether it holds a real token; `length` is the full sequence's
    length so far. Both live in buffers with room for later tokens: slot S + j of a decode token holds
    position length + j (slots and positions advance together), written ahead with `real` True, so a
    decode step writes at most the mask's new column (nothing without a mask). `room`: a static cache's
    decode tokens (core.static_room), all reserved here, and one spare slot (a compiled step that filled
    the buffers exactly would specialize on it: a recompile at the last step); else the buffers grow."""

    def __init__(self, index: torch.Tensor, real: torch.Tensor, length: int, room: int | None = None) -> None:
        self.slots, self.length = index.shape[1], length
        self._index, self._real = index, real
        self._reserve(self.slots + (max(16, self.slots // 4) if room is None else room + 1))
        if room is not None and not torch.compiler.is_compiling():  # CUDA graphs replay on these very tensors
            for t in (self._index, self._real):  # (a step may write `real`: inductor's CUDA graphs take no
                torch._dynamo.mark_static_address(t)  # mutated input at an address that may change)

    @property
    def index(self) -> torch.Tensor:
        return self._index[:, :self.slots]

    @property
    def real(self) -> torch.Tensor:
        return self._real[:, :self.slots]

    def _reserve(self, capacity: int) -> None:
        """Buffers of `capacity` slots: the filled ones kept, the later ones their future positions, real."""
        B, S, device = self._index.shape[0], self.slots, self._index.device
        index = (torch.arange(capacity, device=device) + (self.length - S)).repeat(B, 1)
        index[:, :S] = self._index[:, :S]
        real = torch.ones(B, capacity, dtype=torch.bool, device=device)
        real[:, :S] = self._real[:, :S]
        self._index, self._real = index, real

    def extend(self, mask: torch.Tensor | None, new: int, real: torch.Tensor | None = None) -> None:
        """Append `new` tokens, real where the 2-D mask's last columns say (or `real` [B, new])."""
        if mask is not None and mask.shape[1] != self.length + new:
            raise ValueError(f"the attention mask has {mask.shape[1]} columns; the sequence so far has "
                             f"{self.length + new} tokens")
        S = self.slots
        if S + new > self._index.shape[1]:
            self._reserve(max(2 * self._index.shape[1], S + new))
        if real is None and mask is not None:
            real = mask[:, -new:]
        if real is not None:  # (else real, as written ahead)
            self._real[:, S:S + new] = real  # (copy_ casts a long mask to bool)
        self.slots += new
        self.length += new

    def attention_args(self, rows: int, kv_heads: int) -> dict[str, torch.Tensor]:
        """index_attention's key lists ([B, Hkv, S] real slots first, counts) and positions for the
        last `rows` slots as queries (a padding slot sees no key)."""
        index, real = self.index, self.real
        order = torch.sort((~real).to(torch.uint8), dim=1, stable=True).indices
        counts = real.sum(1, dtype=torch.int32)[:, None].expand(-1, kv_heads).contiguous()
        q_positions = torch.where(real[:, -rows:], index[:, -rows:], -1)
        return dict(kv_indices=order[:, None].expand(-1, kv_heads, -1).contiguous(), kv_counts=counts,
                    q_positions=q_positions, kv_positions=index)


class Drop:
    """One stage's exit: tokens leave `decoder`'s sequence from layer `layer` on, for as long as the
    patch is on (`remove` takes the exit off; the patch unroutes the layers). The exits of one
    language model share its `Exits` (one patch per language model). first: the stage reads the
    full sequence before its layer (FastV scores at K-1): no other exit may come before it."""

    def __init__(self, patch: core.Patch, decoder: core.Decoder, layer: int, owner: str,
                 first: bool = False) -> None:
        layers = decoder.layers
        if layer >= len(layers):
            raise ValueError(f"{owner} layer must be < the {len(layers)} decoder layers, got {layer}")
        exits = getattr(decoder, "_vtattn_drop", None)
        if exits is None:
            exits = Exits(patch, decoder)
        elif exits.patch is not patch:
            raise ValueError("tokens already leave this language model through a vtattn stage of another patch "
                             "(patched through another model object: unpatch that one first)")
        exits.add(layer, owner, first)
        self.exits, self.layer, self.attn = exits, layer, exits.attn

    @property
    def kept(self) -> torch.Tensor | None:
        """[B, N] bool: the input tokens the last prefill kept from this exit on."""
        return self.exits.kept.get(self.layer)

    def step(self) -> Step | None:
        return self.exits.step()

    def forward(self, call: core.Call, proceed: Callable[[core.Call], Any],
                choose: Callable[[Step], Chosen]) -> Any:
        """Run one forward (`proceed(call)`) with the drop. choose(step): in a prefill, at this exit's
        layer, the kept image tokens [B, N] bool (the owner's rule), or `Chosen`'s tuple when some
        kept tokens enter the layer with new hidden states (`step.hidden`: the layer's input)."""
        return self.exits.forward(self.layer, call, proceed, choose)

    def remove(self) -> None:
        self.exits.discard(self.layer)


class Exits:
    """The exits of one language model (`decoder._vtattn_drop`): {layer: owner} and the per-cache
    records. A prefill puts pre-hooks on the layers from the first exit on for its own run (a hook
    left on a layer would cost every decode step ~5 us per layer, in nn.Module's hooked call path)."""

    def __init__(self, patch: core.Patch, decoder: core.Decoder) -> None:
        self.patch, self.decoder = patch, decoder
        self.attn = [block.self_attn for block in decoder.layers]
        self.owners: dict[int, tuple[str, bool]] = {}  # exit layer -> (owner, first)
        self.group: dict[torch.nn.Module, int] = {}  # attention module -> the exit its layer's cache follows
        # cache -> {exit: Record} / True for a text-only prompt's (nothing to drop, ever); forgotten on reset()
        self.records, self.text_only = Filled(), Filled()
        for attr in ("records", "text_only"):  # (one Exits a language model: keys a new patch's Exits shares)
            getattr(self, attr).key = f"exits:{type(decoder).__qualname__}.{attr}"
        self.kept: dict[int, torch.Tensor] = {}  # exit layer -> [B, N] bool: the last prefill's kept input tokens
        decoder._vtattn_drop = self  # type: ignore[assignment]  # stubs: a Tensor or Module

    def add(self, layer: int, owner: str, first: bool) -> None:
        if layer in self.owners:
            raise ValueError(f"tokens already leave this language model at layer {layer} "
                             f"({self.owners[layer][0]})")
        before = [f"{o} at layer {e}" for e, (o, f) in self.owners.items() if e < layer]
        after = [f"{o} at layer {e}" for e, (o, f) in self.owners.items() if e > layer and f]
        if (first and before) or after:
            this = f"{owner} at layer {layer}"
            reader, earlier = (after[0], this) if after else (this, before[0])
            raise NotImplementedError(f"{reader} reads the whole sequence before its layer: no tokens may leave "
                                      f"earlier ({earlier})")
        self.owners[layer] = (owner, first)
        self.patch.route(self.attn[layer:])
        self._regroup()

    def discard(self, layer: int) -> None:
        self.owners.pop(layer, None)
        self.kept.pop(layer, None)
        self.records.renew()  # recorded for the old exits
        self._regroup()
        if not self.owners:
            self.decoder.__dict__.pop("_vtattn_drop", None)

    def _regroup(self) -> None:
        exits = sorted(self.owners)
        self.group = {m: max(e for e in exits if e <= i) for i, m in enumerate(self.attn) if exits and i >= exits[0]}

    def step(self) -> Step | None:
        """This forward's step (None outside a forward with these exits)."""
        ctx = core.current()
        return None if ctx is None else ctx.state.get(self)

    def forward(self, layer: int, call: core.Call, proceed: Callable[[core.Call], Any],
                choose: Callable[[Step], Chosen]) -> Any:
        ctx = core.current()
        assert ctx is not None  # the patch's forward, which runs the stages
        step = ctx.state.get(self)
        if step is not None:  # an earlier stage of this forward set the step up: add this exit's rule
            step.choose[layer] = choose
            return proceed(call)
        kwargs = call.kwargs
        if kwargs.get("labels") is not None:
            raise NotImplementedError("tokens leave the sequence inside the LLM (FastV, VisualExit, or VisionSelect "
                                      "at the LLM input): labels are not supported")
        mask = core.full_attention_mask(kwargs.get("attention_mask"))  # (None: a causal prompt, no padding)
        static = core.is_static_mask(mask)  # generate's 4-D mask for a static cache (full frame)
        _, cache = call.cache()
        static_cache = bool(getattr(cache, "is_compileable", False))  # (a CompressedCache's layers claim their keys)
        if mask is not None and not static and mask.dim() != 2:
            raise NotImplementedError("dropping tokens inside the LLM needs a 2-D attention mask (or none), "
                                      "or generate's for a static cache")
        # Told on the host (a static cache's length is a device count): a cache this patch filled and nobody
        # reset since continues; any other is new (a prefill; `_prefill` refuses one filled elsewhere).
        records = self.records.get(cache)
        text_only = records is None and cache in self.text_only
        new_cache = records is None and not text_only
        hooks: list[Any] = []  # a prefill's pre-hooks, off when it returns
        images = call.images if new_cache else None  # (a decode step needs none: not computed)
        if text_only or (images is not None and not bool(images.any())):
            out = proceed(call)  # a text-only prompt (a chat turn): the unpatched model
            for filled in (cache, core.output_cache(out)):
                if filled is not None:
                    self.text_only[filled] = True
            return out
        if new_cache:
            prompt = mask
            if (static or static_cache) and mask is not None and images is not None:  # maybe the cache's width
                prompt = core.prompt_padding(mask, images.shape[1]) if static else mask[:, :images.shape[1]]
            step = self._prefill(cache, images, prompt, call.given)
            step.choose[layer] = choose
            hooks = [self.decoder.layers[i].register_forward_pre_hook(functools.partial(self._prune, i),
                                                                      with_kwargs=True)
                     for i in range(min(self.owners), len(self.attn))]
        else:
            pixel_values = kwargs.get("pixel_values")
            if pixel_values is not None and pixel_values.numel():  # (generated image-token ids are text)
                raise NotImplementedError("tokens can only leave the sequence in the first forward of a cache "
                                          "(images come with the prompt)")
            cropped = self.records.cropped(cache)
            if call.new_tokens() > 1 and any(e == 0 and r.slots != r.length for e, r in records.items()):
                # (the cache's length, layer 0's, is then shorter than the caller's sequence: generate
                # restarted on this cache slices input_ids by it, feeding tokens the cache holds again)
                raise NotImplementedError(
                    "a forward of several tokens on a cache whose prefill dropped tokens at the LLM input (a "
                    "vision-side keep): generate restarted from a filled cache (a second chat turn) would feed "
                    "tokens the cache already holds. Start each turn on a new cache with the whole conversation "
                    "and its pixel_values; decode one token a forward")
            for exit, record in records.items():
                length = cache.get_seq_length(exit)  # a static cache's: a device count, not read (crops are counted)
                if cropped or (not isinstance(length, torch.Tensor) and length != record.slots):
                    raise RuntimeError("the pruned layers' cache no longer matches its record "
                                       "(cropped or edited outside vtattn)")
                new = call.new_tokens()
                if static:  # generate's decode tokens are real; its 4-D mask is in layer 0's frame (pruned at K=0)
                    record.extend(None, new)
                elif static_cache and mask is not None:  # a 2-D mask as wide as the static cache
                    record.extend(None, new, mask[:, record.length:record.length + new].bool())
                else:
                    record.extend(mask, new)
            step = Step(records=records)
        step.static = static_cache
        ctx.state[self] = step
        attend = functools.partial(self._attend, step)  # this forward's step, bound
        for module in self.group:
            ctx.hook(module, attend)
        try:
            out = proceed(call)
        finally:
            for hook in hooks:
                hook.remove()
        for filled in (cache, core.output_cache(out)):
            if filled is not None and (new_cache or filled is not cache):  # (a decode step's cache holds them)
                self.records[filled] = step.records
        return out

    def _prefill(self, cache: Any, images: torch.Tensor | None, mask: torch.Tensor | None, given: int) -> Step:
        if cache is not None and cache.get_seq_length() > 0:
            raise NotImplementedError("tokens can only leave the sequence in the first forward of a cache")
        if images is None:
            raise NotImplementedError("dropping image tokens finds them in input_ids: pass input_ids, not "
                                      "inputs_embeds")
        from transformers import DynamicCache, StaticCache

        from ..kv.cache import CompressedCache
        if cache is not None and not isinstance(cache, (DynamicCache, StaticCache, CompressedCache)):
            raise NotImplementedError(f"dropping tokens inside the LLM needs a DynamicCache, a StaticCache or a "
                                      f"vtattn.kv.CompressedCache (layers keep different lengths), got "
                                      f"{type(cache).__name__}")
        N = images.shape[1]
        real = torch.ones_like(images) if mask is None else mask.bool()
        pads = (~real).sum(1)
        if not torch.equal(real, torch.arange(N, device=real.device) >= pads[:, None]):
            raise NotImplementedError("dropping tokens inside the LLM needs left padding: each attention-mask row "
                                      "zeros then ones")
        step = Step(images=images, real=real, pads=pads.tolist())
        step.room = core.static_room(cache, given)  # (the caller's frame: the cache's)
        return step

    def _prune(self, i: int, layer: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        """Pre-hook of layer i (>= the first exit), while a prefill runs. There, an exit layer selects its
        kept tokens and gathers the hidden states; each layer gets its group's RoPE tables and positions."""
        step = self.step()
        if step is None or step.images is None:
            return None  # another thread's forward meanwhile (a decode step: the loop's kwargs are right)
        exit = self.group[self.attn[i]]
        if exit not in step.layer_kwargs:
            step.hidden = args[0] if args else kwargs["hidden_states"]
            index, local = self._select(step, exit)
            step.hidden = None
            take: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = lambda t, index: t.expand(  # noqa: E731
                index.shape[0], *t.shape[1:]).gather(
                1, index.view(*index.shape, *[1] * (t.dim() - 2)).expand(*index.shape, *t.shape[2:]))
            cos, sin = kwargs["position_embeddings"]  # the full sequence's: every layer gets the loop's own
            position_ids = kwargs.get("position_ids")
            step.layer_kwargs[exit] = dict(position_embeddings=(take(cos, index), take(sin, index)),
                                           attention_mask=None,
                                           position_ids=None if position_ids is None else take(position_ids, index))
            replace = step.replace.pop(exit, None)
            if args:
                args = (_put(take(args[0], local), step.records[exit], replace),) + tuple(args[1:])
            else:
                kwargs["hidden_states"] = _put(take(kwargs["hidden_states"], local), step.records[exit], replace)
        return args, {**kwargs, **step.layer_kwargs[exit]}

    def _select(self, step: Step, exit: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The tokens kept from `exit` on (the owner's image tokens among those the previous exit
        kept); returns their indices [B, M] into the full sequence (right-aligned; a shorter row's
        leading slots are 0) and into the previous group's rows (the hidden states' frame)."""
        images, real = step.images, step.real
        assert images is not None and real is not None  # a prefill
        B, N = images.shape
        earlier = [e for e in step.records if e < exit]
        previous = step.records[max(earlier)] if earlier else None
        before = real if previous is None else step.kept[max(earlier)]
        chosen = step.choose[exit](step)
        if isinstance(chosen, tuple):  # some kept tokens get new hidden states (SparseVLM's recycled tokens)
            step.replace[exit] = chosen[1:]
            chosen = chosen[0]
        kept = before & (~images | (chosen & images))
        step.kept[exit] = self.kept[exit] = kept
        length = kept.sum(1)
        M = int(length.max())
        start = M - length
        dest = torch.where(kept, start[:, None] + kept.cumsum(1) - 1, M)
        arange = torch.arange(N, device=images.device).expand(B, N)
        index = torch.zeros(B, M + 1, dtype=torch.long, device=images.device).scatter_(1, dest, arange)[:, :M]
        step.records[exit] = Record(index, torch.arange(M, device=index.device) >= start[:, None], N, step.room)
        if previous is None:
            return index, index
        P = previous.index.shape[1]
        slots = torch.arange(P, device=index.device).expand(B, P)
        where = torch.zeros(B, N + 1, dtype=torch.long, device=index.device)  # full index -> previous slot
        where.scatter_(1, previous.index.masked_fill(~previous.real, N), slots)
        return index, where.gather(1, index)

    def _attend(self, step: Step, module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor,
                value: torch.Tensor, mask: Any, scaling: float | None, kwargs: dict[str, Any]) -> torch.Tensor:
        """The attention of a layer from the first exit on in this forward (an attention hook, `step`
        bound): over its group's cache."""
        exit = self.group[module]
        record = step.records[exit]
        layer: CompressedLayer | None = core.claim(key)
        if layer is not None:  # a vtattn.kv.CompressedCache layer: it compresses, then reads what it keeps
            frame = None
            if step.images is not None:  # the prefill: this layer holds the kept tokens, right-aligned
                from ..kv.cache import Frame
                modality = layer.cache.modality
                frame = Frame(record.index, record.length,
                              None if modality is None else modality.gather(1, record.index))
                mask = record.real[:, None, None, :]
            count("cache")
            return layer.attend(query, key, value, mask, scaling, frame).transpose(1, 2)
        slots = record.slots
        if key.shape[2] != slots:
            if not step.static or key.shape[2] < slots:
                raise RuntimeError(f"a pruned layer holds {key.shape[2]} keys, its record {slots}")
            key, value = key[:, :, :slots], value[:, :, :slots]  # a StaticCache layer: its capacity, filled to slots
        grad = core.needs_grad(query, key, value)
        scale = query.shape[-1] ** -0.5 if scaling is None else float(scaling)
        if step.images is None and query.shape[2] == 1 and not grad:
            # A decode step: its one query is the newest token, so every cached key is causally visible and
            # only padding slots are hidden: one masked SDPA call, no index lists to keep (a padding query
            # sees the real keys, as in the unpatched model, where index_attention would give it 0).
            if exit not in step.masks:  # the same for every layer of the group; additive (SDPA turns a bool one
                real = record.real  # into this in every call)
                step.masks[exit] = query.new_full(real.shape, float("-inf")).masked_fill_(real, 0.0)[:, None, None, :]
            count("sdpa: a pruned layer's decode step")
            return F.scaled_dot_product_attention(query, key, value, attn_mask=step.masks[exit], scale=scale,
                                                  enable_gqa=query.shape[1] != key.shape[1]).transpose(1, 2)
        if exit not in step.index_args:  # the same for every layer of the group
            step.index_args[exit] = record.attention_args(query.shape[2], key.shape[1])
        args = step.index_args[exit]
        count("index_attention")
        if grad:  # index_attention has no gradient; its reference has
            return _index_attention_grad(record, query, key, value, scaling, args)
        # The registered op's kernel (_dispatch.Direct), not the public function: these lists are valid by
        # construction, and its checks would read them on the host in every layer of every step.
        out = _INDEX(query, key, value, args["kv_indices"], args["kv_counts"], args["q_positions"],
                     args["kv_positions"], True, scale, stamp=(query.device, query.dtype, query.shape[2] == 1))
        return out.transpose(1, 2)  # [B, N, H, D], free: index_attention lays it out so


def _put(hidden: torch.Tensor, record: Record, replace: tuple[torch.Tensor, torch.Tensor] | None) -> torch.Tensor:
    """hidden [B, M, C] in `record`'s slots with replace = (slots [B, R] full-sequence indices (-1:
    none), rows [B, R, C]): each listed token's row replaced (None: unchanged)."""
    if replace is None:
        return hidden
    slots, rows = replace
    B, M, C = hidden.shape
    match = (record.index[:, None, :] == slots[:, :, None]) & record.real[:, None, :]  # [B, R, M]
    where = torch.where(match.any(2), match.to(torch.uint8).argmax(2), M)  # unlisted: a spare row M
    out = torch.cat([hidden, hidden.new_zeros(B, 1, C)], 1)
    return out.scatter(1, where[..., None].expand(-1, -1, C), rows.to(hidden.dtype))[:, :M]


def _index_attention_grad(record: Record, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                          scaling: float | None, args: dict[str, torch.Tensor]) -> torch.Tensor:
    """index_attention through its (differentiable) reference, [B, N, H, D]. A padding row attends to
    every listed key, then gives 0 as in the kernel: a row that sees no key has NaN gradients."""
    from ..reference.index_attention import index_attention
    real = record.real[:, -query.shape[2]:]
    q_positions = args["q_positions"].masked_fill(~real, record.length)
    scale = query.shape[-1] ** -0.5 if scaling is None else float(scaling)
    out = index_attention(query, key, value, args["kv_indices"], args["kv_counts"], q_positions,
                          args["kv_positions"], True, scale)
    return out.masked_fill(~real[:, None, :, None], 0.0).transpose(1, 2)
