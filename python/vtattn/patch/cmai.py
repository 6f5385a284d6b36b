"""CMAI (cross-modality attention inhibition; Yang et al. 2024, arXiv 2411.15453) inside a VLM's
language model: in the chosen decoder layers, each text query's attention to the image tokens it
focuses on least is inhibited (masked, or multiplied by `weight`), prompt and generated rows alike.
The exact rule is `vtattn.reference.cmai_attention` (docs/selection.md, "CMAI").

Per hooked layer and forward, in two passes and without an N x N tensor:
1. the call's attention as usual on vtattn's kernels (`attention`, one call per left-padding amount),
   which gives the image and padding rows their output;
2. the text rows alone, in chunks of rows (`reference.cmai_step`, torch matmuls): their logits over
   the text keys ([T, T]) and the image keys ([T, I]), the row log-sum-exp, P_tt and P_ti; focus
   F = mean_h P_tt @ P_ti (the P_ti of every earlier text row is kept, [B, H, T, I]); the kept image
   keys by rank (ties to the lower index); then the text rows' attention again with the inhibited
   logits shifted by log(weight) (-inf for a mask), which replaces their output.
A decode step's rows are all text: only pass 2 runs, as one `cmai_step` op call per layer (its C++ /
Triton kernels), against the cache's text / image lists and the layer's record (`Focus`, one per
cache: image keys / values gathered once, text keys / values and P_ti rows in capacity buffers), to
which it writes its new rows only: O(new rows) of upkeep per layer and step, no copy of what earlier
steps kept; nothing syncs with the host."""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from .. import reference
from .._dispatch import Direct
from . import core
from .filled import Filled
from .growing import Growing
from .hf_attention import count

_ATTENTION: Direct[tuple[torch.Tensor, torch.Tensor]] = Direct("attention")  # (out, lse)
_STEP: Direct[torch.Tensor] = Direct("cmai_step", by_stamp=True)


@dataclass(frozen=True)
class CMAI(core.Stage):
    """CMAI's options, and its stage. In decoder layers `layers` (None: every layer), each text query
    (prompt or generated token) keeps the `keep` share (a ratio in (0, 1]: max(1, round(keep * n)) of the
    n image tokens it sees) of image tokens with the highest focus, and its attention probabilities on the
    others are multiplied by `weight` (in [0, 1]; 0, the default, masks them, as the paper) before the
    row is renormalised. keep=1.0 or weight=1.0 is the unpatched model (nothing routed)."""
    keep: float = 0.5
    weight: float = 0.0
    layers: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        for name, value, low in (("keep", self.keep, "(0"), ("weight", self.weight, "[0")):
            if isinstance(value, bool) or not isinstance(value, (float, int)):
                raise TypeError(f"CMAI {name} must be a float, got {value!r}")
            if not (0.0 < value <= 1.0 if name == "keep" else 0.0 <= value <= 1.0):
                raise ValueError(f"CMAI {name} must be in {low}, 1], got {value}")
            object.__setattr__(self, name, float(value))
        if self.layers is not None:
            layers = tuple(self.layers) if isinstance(self.layers, (tuple, list, range)) else None
            if not layers or any(isinstance(i, bool) or not isinstance(i, int) or i < 0 for i in layers):
                raise ValueError(f"CMAI layers must be None or a non-empty sequence of decoder layer indices "
                                 f">= 0, got {self.layers!r}")
            if len(set(layers)) != len(layers):
                raise ValueError(f"CMAI layers lists a layer twice: {self.layers!r}")
            object.__setattr__(self, "layers", tuple(sorted(layers)))

    @property
    def off(self) -> bool:
        return self.keep == 1.0 or self.weight == 1.0

    def install(self, patch: core.Patch) -> core.Installed:
        return _CMAI(self, patch)


class Focus:
    """One cache's CMAI record: its text and image tokens as per-sample lists of token indices
    (`text` / `image` [B, T] / [B, I] int64, ascending where `*_ok`), its length, and per hooked layer
    its `Layer` record. The text lists grow in place (`Growing`): a decode step writes its new entries only."""

    def __init__(self, images: torch.Tensor, real: torch.Tensor, room: int | None, width: int | None) -> None:
        N = images.shape[1]
        text, text_ok = _listed(real & ~images)
        self._text, self._text_ok = Growing(text, 1, room), Growing(text_ok, 1, room)
        self.image, self.image_ok = _listed(images & real)
        self.length = N
        self.room = room  # a static cache's decode tokens (core.static_room): the buffers reserve them
        self.width = width  # a static cache's capacity (None: a growing cache)
        self.rows: dict[int, Layer] = {}

    @property
    def text(self) -> torch.Tensor:
        return self._text.filled

    @property
    def text_ok(self) -> torch.Tensor:
        return self._text_ok.filled

    def select(self, index: torch.Tensor) -> None:
        """Keep the rows `index` [B'] of the batch, as its cache did (beam search reorders them each step:
        a beam's text record is its own)."""
        self._text.select(index)
        self._text_ok.select(index)
        self.image, self.image_ok = _rows(self.image, index), _rows(self.image_ok, index)
        for layer in self.rows.values():
            layer.k_i, layer.v_i = _rows(layer.k_i, index), _rows(layer.v_i, index)
            for grown in (layer.k_t, layer.v_t, layer.p_ti):
                grown.select(index)

    def extend(self, real: torch.Tensor) -> None:
        """Append `real.shape[1]` generated tokens (text; real [B, new] bool)."""
        B, new = real.shape
        self._text.append(self.length + torch.arange(new, device=real.device).expand(B, new))
        self._text_ok.append(real)
        self.length += new


class Layer:
    """A hooked layer's CMAI record: the image keys and values ([B, Hkv, I, D]), gathered once (a
    cache never changes them), and, aligned with focus.text and growing with it, the text keys /
    values ([B, Hkv, T, D]), all in the cache's dtype (pass 2 reads them in fp32), and every text
    entry's P_ti ([B, Hq, T, I], fp32). A decode step gathers and computes its new rows only."""

    def __init__(self, key: torch.Tensor, value: torch.Tensor, focus: Focus, heads: int) -> None:
        B, Hkv, _, D = key.shape
        self.k_i = _take(key, focus.image)
        self.v_i = _take(value, focus.image)
        none, room = key.new_empty(B, Hkv, 0, D), focus.room
        room = None if room is None else focus.text.shape[1] + room  # (the prompt's text entries come first)
        self.k_t, self.v_t = Growing(none, 2, room), Growing(none, 2, room)
        self.p_ti = Growing(key.new_empty(B, heads, 0, focus.image.shape[1], dtype=torch.float32), 2, room)


def _listed(chosen: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The chosen tokens of each row, first and in order ([B, M] indices, M the largest count; one host
    read, in the prefill), and which slots hold one."""
    order = torch.sort((~chosen).to(torch.uint8), dim=1, stable=True).indices
    M = int(chosen.sum(1).max())
    order = order[:, :M]
    return order, chosen.gather(1, order)


def _rows(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """x's rows `index` (dim 0): in place where as many (a static cache's step reads them there)."""
    picked = x.index_select(0, index.to(x.device))
    return x.copy_(picked) if picked.shape == x.shape else picked


def _take(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """x [B, H, N, D] at the per-sample token indices [B, M] -> [B, H, M, D]."""
    B, H, _, D = x.shape
    return x.gather(2, index[:, None, :, None].expand(B, H, index.shape[1], D))


def inhibit(q_rows: torch.Tensor, key: torch.Tensor, value: torch.Tensor, focus: Focus, layer: Layer,
            keep: float, weight: float, scale: float, decode: bool) -> torch.Tensor:
    """Pass 2 for the last `rows` entries of focus.text, those `layer` does not hold yet: q_rows
    [B, Hq, rows, D] their queries, key / value [B, Hkv, length, D] the cache's. Appends their text keys,
    values and P_ti to `layer`; returns their inhibited output [B, Hq, rows, D] (fp32; 0 for slots
    without a token). A prefill's rows run the chunked torch form (its matmuls: rows x T x I products
    a head for the focus), a decode step's the `cmai_step` op (one kernel call: ~140 torch ops before)."""
    rows, text = q_rows.shape[2], focus.text
    if decode:  # the step's tokens: the cache's last (a static cache's keys: its capacity, filled to length)
        k_new, v_new = key[:, :, focus.length - rows:focus.length], value[:, :, focus.length - rows:focus.length]
    else:
        k_new, v_new = _take(key, text[:, text.shape[1] - rows:]), _take(value, text[:, text.shape[1] - rows:])
    args = (q_rows, layer.k_t.append(k_new), layer.v_t.append(v_new), text, focus.text_ok, layer.k_i, layer.v_i,
            focus.image, focus.image_ok, layer.p_ti.grow(rows), keep, weight, scale)
    grad = torch.is_grad_enabled() and (q_rows.requires_grad or key.requires_grad or value.requires_grad)
    stamp = (q_rows.device, q_rows.dtype, q_rows.shape[1], key.shape[1])
    if decode and not grad:  # (the op has no backward: a step under autograd runs the differentiable form)
        return _STEP(*args, stamp=stamp)
    if focus.room is not None:  # a static cache's compiled steps call the vtattn._C kernel chosen now
        _STEP.prepare(*args, stamp=stamp)
    return reference.cmai_step(*args)


def _padded_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scale: float,
                      pads: list[int]) -> torch.Tensor:
    """Pass 1 of a left-padded prefill: causal attention over each sample's real keys, [B, Hq, N, D]
    (padding rows 0), one kernel call per padding amount."""
    out = query.new_zeros(query.shape)
    groups = [(slice(None), pads[0])] if len(set(pads)) == 1 else [(slice(b, b + 1), p) for b, p in enumerate(pads)]
    for rows, pad in groups:
        q, k, v = query[rows, :, pad:], key[rows, :, pad:], value[rows, :, pad:]
        out[rows, :, pad:] = _ATTENTION(q, k, v, True, scale, 0.0, -1, None, stamp=(q.shape[2] == 1,))[0]
    return out


def cmai_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, images: torch.Tensor,
                   real: torch.Tensor, keep: float, weight: float, scale: float | None = None) -> torch.Tensor:
    """The fused form of `vtattn.reference.cmai_attention` on a whole left-padded sequence (same
    arguments; `real` zeros then ones per row): out [B, Hq, N, D] in q's dtype, no N x N tensor."""
    scale = query.shape[-1] ** -0.5 if scale is None else float(scale)
    pads = (~real).sum(1).tolist()
    out = _padded_attention(query, key, value, scale, pads)
    focus = Focus(images, real, None, None)
    T = focus.text.shape[1]
    if T and focus.image.shape[1]:
        layer = Layer(key, value, focus, query.shape[1])
        rows = inhibit(_take(query, focus.text), key, value, focus, layer, keep, weight, scale, False)
        out = _place(out, rows, focus)
    return out


def _place(out: torch.Tensor, rows: torch.Tensor, focus: Focus) -> torch.Tensor:
    """out [B, Hq, N, D] with its text rows replaced by rows [B, Hq, T, D] (listed slots only)."""
    B, Hq, N, D = out.shape
    index = focus.text.masked_fill(~focus.text_ok, N)  # unlisted slots write to a row dropped after
    full = torch.cat([out, out.new_zeros(B, Hq, 1, D)], 2)
    full = full.scatter(2, index[:, None, :, None].expand(B, Hq, index.shape[1], D), rows.to(out.dtype))
    return full[:, :, :N]


class _Step:
    def __init__(self, focus: Focus, pads: list[int] | None) -> None:
        self.focus, self.pads = focus, pads  # pads: None in a decode step


class _CMAI(core.Installed):
    phase = core.LAYERS
    options: CMAI

    def __init__(self, options: CMAI, patch: core.Patch) -> None:
        core.require_image_ids(patch, "CMAI")
        decoder = core.language_model(patch.model)
        n = len(decoder.layers)
        layers = tuple(range(n)) if options.layers is None else options.layers
        if layers[-1] >= n:
            raise ValueError(f"CMAI layers must be < the {n} decoder layers, got {layers[-1]}")
        core.check_full_attention(decoder.config)
        self.options, self.decoder = options, decoder
        self.attn = {decoder.layers[i].self_attn: i for i in layers}
        # cache -> its record; caches whose prompt had no image (on the cache: `Filled`)
        self.records, self.text_only = Filled(rows=Focus.select), Filled()
        if not options.off:
            patch.route(list(self.attn))

    def forward(self, call: core.Call, proceed: Callable[[core.Call], Any]) -> Any:
        if self.options.off:
            return proceed(call)
        if getattr(self.decoder, "_vtattn_drop", None) is not None:
            raise NotImplementedError("CMAI with tokens leaving the language model (FastV, VisualExit, Qwen2-VL "
                                      "keep < 1) is not supported")
        kwargs = call.kwargs
        if kwargs.get("labels") is not None:
            raise NotImplementedError("CMAI: labels are not supported")
        _, cache = call.cache()
        mask = core.full_attention_mask(kwargs.get("attention_mask"))
        if mask is not None and not (isinstance(mask, torch.Tensor) and mask.dim() == 2) and \
                not core.is_static_mask(mask):
            raise NotImplementedError("CMAI needs a 2-D attention mask (or none), or generate's for a static cache")
        ctx = core.current()
        assert ctx is not None  # inside the patched forward
        # a decode step is told from a prefill by the cache's record (a static cache's length is a device count)
        focus: Focus | None = self.records.get(cache)  # (None without a cache)
        if cache in self.text_only:
            return proceed(call)
        if focus is None:
            # (imported here, not in a decode step: torch 2.11's dynamo breaks the graph on transformers' lazy module)
            from transformers import DynamicCache, StaticCache

            from ..kv.cache import CompressedCache
            if cache is not None and (not isinstance(cache, (DynamicCache, StaticCache)) or
                                      isinstance(cache, CompressedCache)):
                raise NotImplementedError(f"CMAI needs a DynamicCache, a StaticCache (or none), got "
                                          f"{type(cache).__name__}")
            if cache is not None and cache.get_seq_length() > 0:
                raise RuntimeError("CMAI: this cache's prefill ran without CMAI")
            images = call.images
            if images is None:
                raise NotImplementedError("CMAI finds image tokens in input_ids: pass input_ids, not inputs_embeds")
            N = images.shape[1]
            real = torch.ones_like(images) if mask is None else \
                core.prompt_padding(mask, N).bool() if mask.dim() == 4 else mask[:, :N].bool()
            pads = (~real).sum(1)
            if not torch.equal(real, torch.arange(N, device=real.device) >= pads[:, None]):
                raise NotImplementedError("CMAI needs left padding: each attention-mask row zeros then ones")
            if not bool((images & real).any()):
                return self._text_only(call, proceed, cache)
            room = core.static_room(cache, call.given)
            step = _Step(Focus(images, real, room, core.static_width(call.given, room)), pads.tolist())
        else:
            static = focus.room is not None  # (its crops are counted on the host: its length is not read)
            assert cache is not None  # (it holds the record)
            if self.records.cropped(cache) or (not static and cache.get_seq_length() != focus.length):
                raise RuntimeError("CMAI: the cache no longer matches its record (cropped or edited outside vtattn)")
            new, end = call.new_tokens(), focus.length + call.new_tokens()
            if mask is None or mask.dim() == 4:  # (generate's decode tokens for a static cache are real)
                real = torch.ones(focus.text.shape[0], new, dtype=torch.bool, device=focus.text.device)
            elif mask.shape[1] == end or (static and mask.shape[1] > end):  # (a static cache's may be as wide)
                real = mask[:, focus.length:end].bool()
            else:
                raise ValueError(f"the attention mask has {mask.shape[1]} columns; the sequence so far has {end} "
                                 f"tokens")
            focus.extend(real)
            step = _Step(focus, None)
        ctx.state[self] = step
        for module in self.attn:
            ctx.hook(module, self._attend)
        out = proceed(call)
        for filled in (cache, core.output_cache(out)):
            if filled is not None and (step.pads is not None or filled is not cache):  # (a step's cache holds it)
                self.records[filled] = step.focus
        return out

    def _text_only(self, call: core.Call, proceed: Callable[[core.Call], Any], cache: Any) -> Any:
        out = proceed(call)  # no image: nothing to inhibit, now or while decoding
        for filled in (cache, core.output_cache(out)):
            if filled is not None:
                self.text_only[filled] = True
        return out

    def _attend(self, module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                mask: Any, scaling: float | None, kwargs: dict[str, Any]) -> torch.Tensor:
        """A hooked layer's attention in this forward: [B, N, Hq, D]."""
        ctx = core.current()
        assert ctx is not None  # a hook runs inside the patched forward
        step: _Step = ctx.state[self]
        focus, layer, options = step.focus, self.attn[module], self.options
        if step.pads is not None:  # (a static cache's keys: its capacity, the prompt first)
            key, value = key[:, :, :focus.length], value[:, :, :focus.length]
        elif key.shape[2] != focus.width and key.shape[2] != focus.length:  # (a static cache's: its width)
            raise RuntimeError(f"CMAI: layer {layer} holds {key.shape[2]} keys, its record {focus.length}")
        scale = query.shape[-1] ** -0.5 if scaling is None else float(scaling)
        count("cmai")
        if step.pads is not None:  # the prefill: pass 1 for every row, pass 2 for the text rows
            out = _padded_attention(query, key, value, scale, step.pads)
            focus.rows[layer] = Layer(key, value, focus, query.shape[1])
            if not focus.text.shape[1]:  # a prompt of image tokens only: no text row yet (decode steps add them)
                return out.transpose(1, 2)
            rows = inhibit(_take(query, focus.text), key, value, focus, focus.rows[layer], options.keep,
                           options.weight, scale, False)
            return _place(out, rows, focus).transpose(1, 2)
        rows = inhibit(query, key, value, focus, focus.rows[layer], options.keep, options.weight, scale, True)
        return rows.to(query.dtype).transpose(1, 2)
