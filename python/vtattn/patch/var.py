"""VAR, visual attention sink redistribution (Kang et al., "See What You Are Told: Visual Attention
Sink in Large Multimodal Models", ICLR 2025; release seilk/VisAttnSink), inside a VLM's language model.

In each affected layer (default: every layer from 2 on, as the release):
- sinks: in a prefill, a forward pre-hook on the decoder layer takes the hidden states entering it,
  RMS-normalises them (no weight, eps 1e-6) and marks token t a sink when
  max over the sink dims d of |x_t,d| / RMS(x_t) > tau. Decode steps keep the prefill's sinks (new
  tokens never are).
- each key's group: 0 image sink, 1 image non-sink, 2 text sink, 3 other (-1: padding).
  One `vtattn.group_attention` pass gives each row's per-group partial outputs and masses.
- a row (batch, head, query) is redistributed when it may be (prefill: a text row; decode: the new
  row), its sample has an image sink in this layer, and its attention is image-centric:
  image mass >= summ and image-sink mass / (image mass + n_image * 1e-6) <= rho.
- there, the sinks (image and text) keep a fraction p of their attention and the rest,
  (1 - p) * (sink mass), goes to the image non-sink tokens in proportion to their attention:
  out = p * (o_0 + o_2) + (1 + (1 - p) * (m_0 + m_2) / m_1) * o_1 + o_3. No second pass, no N x N.
The exact rule and every difference from the release: docs/selection.md, "VAR"."""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from .._dispatch import Direct
from . import core
from .filled import Filled
from .hf_attention import count

_GROUP: Direct[tuple[torch.Tensor, torch.Tensor]] = Direct("group_attention")  # (out, mass)
IMAGE_SINK, IMAGE, TEXT_SINK, REST, HIDDEN = 0, 1, 2, 3, -1
GROUPS = 4
EPS = 1e-6  # the release's RMS-norm eps and its per-image-token term in the sink ratio's denominator

# The release's sink dimensions (src/logic/constants.py), by the LLaMA-2 model LLaVA-1.5 / 1.6 build on.
RELEASE_DIMS = {("llama", 4096, 32): (2533, 1415), ("llama", 5120, 40): (2100, 4743)}


@dataclass(frozen=True)
class VAR(core.Stage):
    """VAR's options, and its stage. p: the fraction of a redistributed row's sink attention the
    sinks keep (1 - p moves to the image's non-sink tokens; p = 1 is the unpatched model); tau: the
    massive-activation threshold; rho: the largest image-sink share of a row's image attention;
    summ: the smallest image attention of a row; dims: the sink dimensions of the LLM's hidden
    states (None: the release's, for LLaMA-2 7B / 13B LLMs only); layers: the decoder layers
    redistributed (None: 2 .. L-1, the release's). Defaults: the release's (p 0.6, tau 20, rho 0.5,
    summ 0.2)."""
    p: float = 0.6
    tau: float = 20.0
    rho: float = 0.5
    summ: float = 0.2
    dims: tuple[int, ...] | None = None
    layers: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        for name in ("p", "tau", "rho", "summ"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise TypeError(f"VAR {name} must be a finite number, got {value!r}")
            object.__setattr__(self, name, float(value))
        if not 0.0 <= self.p <= 1.0:
            raise ValueError(f"VAR p must lie in [0, 1] (the fraction of sink attention kept), got {self.p}")
        for name in ("dims", "layers"):
            value = getattr(self, name)
            if value is None:
                continue
            value = tuple(value) if isinstance(value, (list, tuple)) else value
            if (not isinstance(value, tuple) or not value
                    or any(isinstance(i, bool) or not isinstance(i, int) or i < 0 for i in value)):
                raise ValueError(f"VAR {name} must be a non-empty sequence of ints >= 0, got {getattr(self, name)!r}")
            object.__setattr__(self, name, tuple(sorted(set(value))))

    def install(self, patch: core.Patch) -> core.Installed:
        return _VAR(self, patch)


def sink_dims(config: Any, dims: tuple[int, ...] | None) -> tuple[int, ...]:
    """The sink dimensions for a language model's config: `dims`, or the release's for its model."""
    hidden = config.hidden_size
    if dims is None:
        dims = RELEASE_DIMS.get((config.model_type, hidden, config.num_hidden_layers))
        if dims is None:
            raise ValueError(f"VAR needs dims= (the sink dimensions of this LLM: {config.model_type}, hidden size "
                             f"{hidden}); the release lists them for LLaMA-2 7B and 13B only")
    if max(dims) >= hidden:
        raise ValueError(f"VAR dims must be < the hidden size {hidden}, got {dims}")
    return dims


def sinks(hidden: torch.Tensor, dims: tuple[int, ...], tau: float) -> torch.Tensor:
    """[B, N] bool: tokens whose RMS-normalised hidden state has a sink dimension above tau."""
    x = hidden.detach().float()
    x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + EPS)
    return x[..., list(dims)].abs().amax(-1) > tau


class _Record:
    """One cache's VAR state: per layer the keys' groups and whether each sample has an image sink [B];
    the image token count [B] (fp32) and the sequence length so far. Each layer's groups live in a
    [B, width] buffer, its first `length` columns filled, the rest hidden. On a static cache the width
    is the cache's capacity (`width`), reserved at the prefill: a decode step attends over all of the
    cache's slots, the empty ones hidden (fixed shapes, nothing allocated that the record keeps: what a
    CUDA graph of the step needs); on a growing cache the buffers double when full. Host ints track
    the length, so nothing syncs."""

    def __init__(self, images: torch.Tensor, width: int | None) -> None:
        self.groups: dict[int, torch.Tensor] = {}
        self.has_sink: dict[int, torch.Tensor] = {}
        self.images = images.sum(1, dtype=torch.float32)
        self.length = images.shape[1]
        self.width = width  # None: a growing cache

    def set(self, layer: int, groups: torch.Tensor) -> None:
        """A prefill's groups [B, N] for `layer`."""
        B, N = groups.shape
        # (a static cache's width and a spare slot: a compiled step whose write ends exactly at the buffer's
        # end would be specialized on it, a recompile for the last step)
        buf = groups.new_full((B, N + max(16, N // 4) if self.width is None else self.width + 1), HIDDEN)
        buf[:, :N] = groups
        if self.width is not None and not torch.compiler.is_compiling():  # a CUDA graph's step writes it
            torch._dynamo.mark_static_address(buf)
        self.groups[layer] = buf

    def keys(self, layer: int, count: int) -> torch.Tensor:
        """The groups of an attention over `count` keys: a prefill's or a growing cache's first ones,
        or a static cache's every slot."""
        buf = self.groups[layer]
        # (a static cache's width matches first: a compiled step then does not guard on the length)
        if count != self.width and count != self.length:
            raise RuntimeError(f"VAR: layer {layer} holds {count} keys, its record {self.length}")
        return buf[:, :count]

    def extend(self, new: torch.Tensor) -> None:
        """Append the new tokens' groups [B, n] (other, or hidden for padding) to every layer."""
        n, end = new.shape[1], self.length + new.shape[1]
        for layer, buf in self.groups.items():
            if self.width is None and end > buf.shape[1]:  # (a static cache's write past its capacity fails first)
                grown = buf.new_full((buf.shape[0], max(end, 2 * buf.shape[1])), HIDDEN)
                grown[:, :self.length] = buf[:, :self.length]
                self.groups[layer] = buf = grown
            buf[:, self.length:end] = new
        self.length = end


class _Step:
    """One forward: the record, and the rows that may be redistributed [B, Nq] bool."""

    def __init__(self, record: _Record, rows: torch.Tensor, prefill: tuple[torch.Tensor, torch.Tensor] | None) -> None:
        self.record, self.rows, self.prefill = record, rows, prefill  # prefill: (images, real) [B, N]


class _VAR(core.Installed):
    phase = core.LAYERS
    options: VAR

    def __init__(self, options: VAR, patch: core.Patch) -> None:
        core.require_image_ids(patch, "VAR")
        decoder = core.language_model(patch.model)
        core.check_full_attention(decoder.config)
        count_layers = len(decoder.layers)
        layers = options.layers if options.layers is not None else tuple(range(2, count_layers))
        if layers and max(layers) >= count_layers:
            raise ValueError(f"VAR layers must be < the {count_layers} decoder layers, got {layers}")
        self.options, self.decoder = options, decoder
        self.dims = sink_dims(decoder.config, options.dims)
        self.attn = {decoder.layers[i].self_attn: i for i in layers}
        # cache -> its record; caches whose prompt had no image (their steps: the unpatched model). On the
        # cache (`Filled`): a static cache's length is a device count, so a decode step is told from
        # a prefill by its record, not by reading the length.
        self.records, self.text_only = Filled(), Filled()
        patch.route(list(self.attn))
        self.handles = [decoder.layers[i].register_forward_pre_hook(self._sinks(i), with_kwargs=True) for i in layers]

    def forward(self, call: core.Call, proceed: Callable[[core.Call], Any]) -> Any:
        if not self.attn:
            return proceed(call)
        if getattr(self.decoder, "_vtattn_drop", None) is not None:
            raise NotImplementedError("VAR with tokens leaving the language model (FastV, VisualExit, Qwen2-VL's "
                                      "VisionSelect) is not supported")
        _, cache = call.cache()
        mask = core.full_attention_mask(call.kwargs.get("attention_mask"))
        if mask is not None and mask.dim() != 2 and not core.is_static_mask(mask):
            raise NotImplementedError("VAR needs a 2-D attention mask (or none), or generate's for a static cache")
        record = self.records.get(cache)
        step: _Step | None
        if record is not None:  # (its cache passed the check below at the prefill)
            step = self._decode(call, cache, mask, record)
        elif cache in self.text_only:
            return proceed(call)  # no image in its prompt: the unpatched model
        else:
            # (imported here, not in a decode step: torch 2.11's dynamo breaks the graph on transformers' lazy module)
            from transformers import DynamicCache, StaticCache
            if cache is not None and type(cache) is not DynamicCache and not isinstance(cache, StaticCache):
                raise NotImplementedError(f"VAR needs a DynamicCache, a StaticCache (or none), got "
                                          f"{type(cache).__name__}")
            if cache is not None and cache.get_seq_length() > 0:
                return proceed(call)  # a cache VAR did not fill: the unpatched model
            step = self._prefill(call, cache, mask)
        if step is None:  # a text-only prompt: no image sink, the unpatched model (its decode steps too)
            out = proceed(call)
            for filled in (cache, core.output_cache(out)):
                if filled is not None:
                    self.text_only[filled] = True
            return out
        ctx = core.current()
        assert ctx is not None  # inside the patched forward
        ctx.state[self] = step
        for module in self.attn:
            ctx.hook(module, self._attend)
        out = proceed(call)
        for filled in (cache, core.output_cache(out)):
            if filled is not None and (record is None or filled is not cache):  # (a step's cache holds it)
                self.records[filled] = step.record
        return out

    def uninstall(self) -> None:
        for handle in self.handles:
            handle.remove()

    def _prefill(self, call: core.Call, cache: Any, mask: torch.Tensor | None) -> _Step | None:
        images = call.images
        if images is None:
            raise NotImplementedError("VAR finds the image tokens in input_ids: pass input_ids, not inputs_embeds")
        if not bool(images.any()):
            return None
        N = images.shape[1]
        if mask is None:
            real = torch.ones_like(images)
        elif mask.dim() == 4:  # generate's for a static cache: the padding read back from its last row
            real = core.prompt_padding(mask, N).bool()
        else:
            real = mask[:, :N].bool()  # (a static cache's 2-D mask may be as wide as the cache)
        room = core.static_room(cache, call.given)
        return _Step(_Record(images, core.static_width(call.given, room)), real & ~images, (images, real))

    def _decode(self, call: core.Call, cache: Any, mask: torch.Tensor | None, record: _Record) -> _Step:
        pixel_values = call.kwargs.get("pixel_values")
        if pixel_values is not None and pixel_values.numel():
            raise NotImplementedError("VAR finds an image's sinks in the first forward of a cache (images come with "
                                      "the prompt)")
        # (a static cache's length is a device count: its crops are counted on the host instead)
        if self.records.cropped(cache) or (record.width is None and cache.get_seq_length() != record.length):
            raise RuntimeError("VAR's record no longer matches the cache (cropped or edited outside vtattn)")
        new, B = call.new_tokens(), record.images.shape[0]
        end = record.length + new
        if mask is None or mask.dim() == 4:  # (generate's decode tokens for a static cache are real)
            real = torch.ones(B, new, dtype=torch.bool, device=record.images.device)
        elif mask.shape[1] == end or (record.width is not None and mask.shape[1] == record.width):
            real = mask[:, record.length:end].bool()
        else:
            raise ValueError(f"the attention mask has {mask.shape[1]} columns; the sequence so far has {end} tokens")
        record.extend(torch.where(real, REST, HIDDEN))
        return _Step(record, real, None)

    def _sinks(self, layer: int) -> Callable[..., None]:
        def hook(module: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            ctx = core.current()
            step = None if ctx is None else ctx.state.get(self)
            if step is None or step.prefill is None:
                return None
            images, real = step.prefill
            sink = sinks(args[0] if args else kwargs["hidden_states"], self.dims, self.options.tau)
            groups = torch.where(images, torch.where(sink, IMAGE_SINK, IMAGE), torch.where(sink, TEXT_SINK, REST))
            step.record.set(layer, groups.masked_fill(~real, HIDDEN))
            step.record.has_sink[layer] = (sink & images & real).any(1)
            return None
        return hook

    def _attend(self, module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                mask: Any, scaling: float | None, kwargs: dict[str, Any]) -> torch.Tensor:
        """A redistributed layer's attention (an attention hook): one group_attention pass, then the
        per-row combine. Returns [B, N, H, D]."""
        ctx = core.current()
        assert ctx is not None  # a hook runs inside the patched forward
        step: _Step = ctx.state[self]
        layer = self.attn[module]
        record = step.record
        if step.prefill is not None:  # (a static cache's keys: its capacity, the prompt first)
            key, value = key[:, :, :record.length], value[:, :, :record.length]
        groups = record.keys(layer, key.shape[2])
        scale = query.shape[-1] ** -0.5 if scaling is None else float(scaling)
        count("group_attention")
        if core.needs_grad(query, key, value):  # the op has no gradient; its reference has
            from ..reference import group_attention
            out, mass = group_attention(query, key, value, groups, GROUPS, True, scale)
        else:
            out, mass = _GROUP(query, key, value, groups, GROUPS, True, scale)
        out = combine(out, mass, step.rows, record.has_sink[layer], record.images, self.options)
        return out.to(query.dtype).transpose(1, 2)


def combine(out: torch.Tensor, mass: torch.Tensor, rows: torch.Tensor, has_sink: torch.Tensor,
            images: torch.Tensor, options: VAR) -> torch.Tensor:
    """VAR's output [B, H, Nq, D] fp32 from group_attention's (out [B, H, Nq, 4, D], mass [B, H, Nq, 4])
    over the groups (image sink, image, text sink, other); rows [B, Nq] bool: rows that may be
    redistributed; has_sink [B] bool: the sample has an image sink; images [B]: its image token count."""
    m_sink, m_image, m_text = mass[..., IMAGE_SINK], mass[..., IMAGE], mass[..., TEXT_SINK]
    on_image = m_sink + m_image
    portion = m_sink / (on_image + images[:, None, None] * EPS)
    chosen = ((portion <= options.rho) & (on_image >= options.summ) & (m_image > 0)
              & rows[:, None, :] & has_sink[:, None, None])
    p = options.p
    keep = torch.where(chosen, p, 1.0)[..., None]
    gain = torch.where(chosen, 1.0 + (1.0 - p) * (m_sink + m_text) / torch.where(chosen, m_image, 1.0), 1.0)[..., None]
    return keep * (out[..., IMAGE_SINK, :] + out[..., TEXT_SINK, :]) + gain * out[..., IMAGE, :] + out[..., REST, :]
