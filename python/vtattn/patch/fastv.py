"""FastV inside a VLM's language model: from decoder layer K on, the image tokens that the
last prompt token attended to least at layer K-1 (mean over heads) leave the sequence.

How it runs in a transformers Llama-style decoder, whose layer loop hands every layer the same
kwargs (mask, RoPE tables, position ids):
- Prefill: layer K-1's attention goes through `attention_forward`, which records the last prompt
  token's probabilities over the keys it sees (`vtattn.key_importance`, left-padding keys left
  out) and then runs the model's own attention. A forward pre-hook on layer K keeps the top image
  tokens and gathers the hidden states, RoPE tables and position ids: kept tokens keep their
  original positions (RoPE gaps).
- Layers < K cache the whole sequence, layers >= K the kept tokens. Everything `generate` sees
  (masks, positions, layer 0's cache length) stays in the full sequence's frame, so decoding
  needs nothing special.
- Layers >= K attend with `vtattn.index_attention`: every sample lists its own cache slots and
  causality follows the original positions, so samples may keep different numbers of tokens
  without a padded mask. A sample's kept tokens are right-aligned in the pruned cache; the
  leading slots of a shorter sample are never listed.
- With a `vtattn.kv.CompressedCache` (kv= as well), a layer >= K hands its prefill to the cache
  layer instead, with the slots' original positions and padding (a `Frame`): it compresses FastV's
  kept tokens and attends over what it keeps, prefill and decode.
"""
import contextvars
import sys
import weakref
from dataclasses import dataclass

import torch

import vtattn
from vtattn import selection as policy

from ..kv._claim import claim
from . import _install

NAME = "vtattn_fastv"
_STEP = contextvars.ContextVar("vtattn_fastv_step", default=None)


@dataclass(frozen=True)
class FastV:
    """FastV's options. From decoder layer `layer` (K >= 1) on, each sample keeps some of its
    image tokens, ranked by layer K-1's attention of the last prompt token (mean over heads):
    `keep`, a ratio in [0, 1] (max(1, round(keep * n)) of n tokens, none for 0; default 0.5), or
    `keep_tokens`, an int count (at most n; 0 drops every image token from layer K on)."""
    layer: int = 2
    keep: float | None = None
    keep_tokens: int | None = None

    def __post_init__(self):
        if isinstance(self.layer, bool) or not isinstance(self.layer, int):
            raise TypeError(f"FastV layer must be an int, got {self.layer!r}")
        if self.layer < 1:
            raise ValueError(f"FastV layer must be >= 1 (layer K-1 scores the tokens), got {self.layer}")
        keep = policy.resolve_keep(self.keep, self.keep_tokens, zero=True, default=0.5, stacklevel=4)
        object.__setattr__(self, "keep", keep if isinstance(keep, float) else None)  # frozen: normalised once
        object.__setattr__(self, "keep_tokens", keep if isinstance(keep, int) else None)

    def budget(self, n):
        """Image tokens kept out of a sample's n."""
        if self.keep_tokens is not None:
            return min(self.keep_tokens, n)
        return 0 if n == 0 or self.keep == 0 else policy.budget(self.keep, n)


def resolve(method, fastv, layer, keep, keep_tokens):
    """The FastV of `vtattn.patch.llava`'s arguments (None for none); method="fastv" is the
    shorthand for FastV(layer, keep or keep_tokens) alone."""
    if method == "fastv":
        if fastv is not None:
            raise ValueError("pass either method='fastv' (with layer= and keep=) or fastv=FastV(...), not both")
        return FastV(layer=2 if layer is None else layer, keep=keep, keep_tokens=keep_tokens)
    if layer is not None:
        raise ValueError("layer is FastV's decoder layer: pass it with method='fastv' "
                         "(or fastv=vtattn.patch.FastV(layer=...))")
    if fastv is not None and not isinstance(fastv, FastV):
        raise TypeError(f"fastv must be a vtattn.patch.FastV, got {type(fastv).__name__}")
    return fastv


class Runner:
    """FastV installed on a language model (a decoder with `layers`; hooks stay until `remove`).
    options: a FastV, or any object with `layer` 0 for a selection at the LLM's input whose
    `choose` each call gives (vision-side scores: `vtattn.patch.qwen2_vl`)."""

    def __init__(self, decoder, options):
        from transformers import AttentionInterface
        layers = decoder.layers
        if options.layer >= len(layers):
            raise ValueError(f"FastV layer must be < the {len(layers)} decoder layers, got {options.layer}")
        self.attn = [layer.self_attn for layer in layers]
        if any(isinstance(attn.config, _Routed) for attn in self.attn):
            raise ValueError("FastV is already on this language model (patched through another model object: "
                             "unpatch that one first)")
        AttentionInterface.register(NAME, attention_forward)
        self.options = options
        self.records = weakref.WeakKeyDictionary()  # cache -> _Record of the prefill that filled it
        self.text_only = weakref.WeakSet()  # caches of text-only prompts: nothing to prune, ever
        self.kept = None  # [B, N] bool: the LLM input tokens the last prefill kept from layer K on
        self.hooks = [layer.register_forward_pre_hook(self._prune, with_kwargs=True)
                      for layer in layers[options.layer:]]
        # Layers K-1.. name FastV's attention for as long as the patch is on (set once: swapping
        # configs per call races between threads); outside a FastV step of this runner it runs
        # the model's own attention.
        self.pruned = frozenset(self.attn[options.layer:])
        self.first = max(options.layer - 1, 0)  # layer K-1 scores (none at K = 0)
        self.configs = [attn.config for attn in self.attn[self.first:]]
        for attn in self.attn[self.first:]:
            attn.config = _Routed(attn.config)

    def remove(self):
        for hook in self.hooks:
            hook.remove()
        for attn, config in zip(self.attn[self.first:], self.configs):
            attn.config = config

    def __call__(self, forward, input_ids, images, kwargs, choose=None):
        """Run `forward(input_ids, **kwargs)` (one model forward) with FastV. images: [B, N] bool,
        the image tokens of the language model's input (None without input_ids). choose: for a
        prefill, a function giving the kept image tokens [B, N] bool in place of FastV's rule."""
        if kwargs.get("labels") is not None:
            raise NotImplementedError("FastV shortens the sequence inside the LLM: labels are not supported")
        mask = kwargs.get("attention_mask")
        if mask is not None and mask.dim() != 2:
            raise NotImplementedError("FastV needs a 2-D attention mask (or none)")
        _, cache = _install.cache_arg(kwargs)
        record = self.records.get(cache) if cache is not None else None
        new_cache = cache is None or cache.get_seq_length() == 0  # a new cache, or one reset and reused
        if (new_cache and images is not None and not bool(images.any())) or (not new_cache and cache in self.text_only):
            out = forward(input_ids, **kwargs)  # a text-only prompt (a chat turn): the unpatched model
            for filled in (cache, _install.output_cache(out)):
                if filled is not None:
                    self.text_only.add(filled)
            return out
        if record is None or new_cache:
            step = self._prefill(cache, images, mask)
            step.choose = choose
        else:
            pixel_values = kwargs.get("pixel_values")
            if pixel_values is not None and pixel_values.numel():  # (generated image-token ids are text)
                raise NotImplementedError("FastV needs the images in the first forward of a cache")
            if cache.get_seq_length(self.options.layer) != record.index.shape[1]:
                raise RuntimeError("the pruned layers' cache no longer matches FastV's record "
                                   "(cropped or edited outside FastV)")
            new = (input_ids if input_ids is not None else kwargs["inputs_embeds"]).shape[1]
            record.extend(mask, new)
            step = _Step(record=record)
        step.pruned = self.pruned
        token = _STEP.set(step)
        try:
            out = forward(input_ids, **kwargs)
        finally:
            _STEP.reset(token)
        for filled in (cache, _install.output_cache(out)):
            if filled is not None:
                self.records[filled] = step.record
        return out

    def _prefill(self, cache, images, mask):
        if cache is not None and cache.get_seq_length() > 0:
            raise NotImplementedError("FastV needs the images in the first forward of a cache")
        if images is None:
            raise NotImplementedError("FastV finds the image tokens in input_ids: pass input_ids, not inputs_embeds")
        from transformers import DynamicCache

        from ..kv.cache import CompressedCache
        if cache is not None and not isinstance(cache, (DynamicCache, CompressedCache)):
            raise NotImplementedError(f"FastV needs a DynamicCache or a vtattn.kv.CompressedCache (layers keep "
                                      f"different lengths), got {type(cache).__name__}")
        N = images.shape[1]
        real = torch.ones_like(images) if mask is None else mask.bool()
        pads = (~real).sum(1)
        if not torch.equal(real, torch.arange(N, device=real.device) >= pads[:, None]):
            raise NotImplementedError("FastV needs left padding: each attention-mask row zeros then ones")
        probe = self.attn[self.options.layer - 1] if self.options.layer else None
        return _Step(images=images, real=real, pads=pads.tolist(), probe=probe)

    def _prune(self, layer, args, kwargs):
        """Pre-hook of layers >= K. In a prefill, the first of them selects the kept tokens and
        gathers the hidden states; each gets the kept tokens' RoPE tables and positions."""
        step = _STEP.get()
        if step is None or step.images is None:
            return None  # decoding: the layer loop's kwargs are already right
        if step.layer_kwargs is None:
            index = self._select(step)
            B, M = index.shape
            take = lambda t: t.expand(B, *t.shape[1:]).gather(  # noqa: E731
                1, index.view(B, M, *[1] * (t.dim() - 2)).expand(B, M, *t.shape[2:]))
            cos, sin = kwargs["position_embeddings"]
            position_ids = kwargs.get("position_ids")
            step.layer_kwargs = dict(position_embeddings=(take(cos), take(sin)), attention_mask=None,
                                     position_ids=None if position_ids is None else take(position_ids))
            if args:
                args = (take(args[0]),) + tuple(args[1:])
            else:
                kwargs["hidden_states"] = take(kwargs["hidden_states"])
        return args, {**kwargs, **step.layer_kwargs}

    def _select(self, step):
        """Top image tokens per sample by the recorded scores; returns the pruned rows' indices
        [B, M] into the full sequence (right-aligned; a shorter row's leading slots are 0)."""
        images, real = step.images, step.real
        B, N = images.shape
        if step.choose is not None:
            chosen = step.choose() & images
        else:
            counts = torch.tensor([self.options.budget(n) for n in images.sum(1).tolist()], device=images.device)
            chosen = torch.zeros_like(images)
            if bool(counts.any()):  # select_tokens keeps >= 1 per sample: a zero budget is masked after
                scores = step.scores.masked_fill(~images, -1.0)  # probabilities are >= 0: images first
                chosen = (vtattn.select_tokens(scores, keep_tokens=counts.clamp(min=1)).mask & images
                          & (counts > 0)[:, None])
        kept = real & (~images | chosen)
        self.kept = kept
        length = kept.sum(1)
        M = int(length.max())
        start = M - length
        dest = torch.where(kept, start[:, None] + kept.cumsum(1) - 1, M)
        index = torch.zeros(B, M + 1, dtype=torch.long, device=images.device)
        index = index.scatter_(1, dest, torch.arange(N, device=images.device).expand(B, N))[:, :M]
        step.record = _Record(index, torch.arange(M, device=index.device) >= start[:, None], N)
        return index


class _Step:
    """One forward under FastV. A prefill has images / real / pads / probe (layer K-1's attention)
    or `choose` (the kept image tokens from elsewhere, at K = 0) and fills scores, layer_kwargs and
    record; a decode step has only the record."""

    def __init__(self, images=None, real=None, pads=None, probe=None, record=None):
        self.images, self.real, self.pads, self.probe, self.record = images, real, pads, probe, record
        self.scores = self.layer_kwargs = self.kv = self.choose = None
        self.pruned = frozenset()  # the attention modules of layers >= K


class _Record:
    """The pruned cache of layers >= K: per slot its index in the full sequence (its position for
    causality) and whether it holds a real token; `length` is the full sequence's length so far."""

    def __init__(self, index, real, length):
        self.index, self.real, self.length = index, real, length

    def extend(self, mask, new):
        B, device = self.index.shape[0], self.index.device
        if mask is not None and mask.shape[1] != self.length + new:
            raise ValueError(f"the attention mask has {mask.shape[1]} columns; the sequence so far has "
                             f"{self.length + new} tokens")
        real = mask[:, -new:].bool() if mask is not None else torch.ones(B, new, dtype=torch.bool, device=device)
        self.index = torch.cat([self.index, self.length + torch.arange(new, device=device).expand(B, new)], 1)
        self.real = torch.cat([self.real, real], 1)
        self.length += new

    def attention_args(self, rows, kv_heads):
        """index_attention's key lists ([B, Hkv, S] real slots first, counts) and positions for the
        last `rows` slots as queries (a padding slot sees no key)."""
        real = self.real
        order = torch.sort((~real).to(torch.uint8), dim=1, stable=True).indices
        counts = real.sum(1, dtype=torch.int32)[:, None].expand(-1, kv_heads).contiguous()
        q_positions = self.index[:, -rows:].masked_fill(~real[:, -rows:], -1)
        return dict(kv_indices=order[:, None].expand(-1, kv_heads, -1), kv_counts=counts,
                    q_positions=q_positions, kv_positions=self.index)


def _scores(step, query, key, scale):
    """[B, N] fp32: the last prompt token's attention probabilities, mean over heads, over the keys
    it sees (one key_importance call per left-padding amount; padding columns stay 0)."""
    B, N = step.images.shape
    scores = torch.zeros(B, N, dtype=torch.float32, device=query.device)
    pads = step.pads
    groups = [(slice(None), pads[0])] if len(set(pads)) == 1 else [(slice(b, b + 1), p) for b, p in enumerate(pads)]
    for rows, pad in groups:
        scores[rows, pad:] = vtattn.key_importance(query[rows, :, -1:], key[rows, :, pad:], rows=0, scale=scale,
                                                   reduce_heads="mean")
    return scores


def attention_forward(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """The attention of layers >= K-1 while FastV is installed (transformers' AttentionInterface
    signature): the model's own outside a FastV forward, at layer K-1 and at other models' layers
    (the step holds the modules it prunes); layer K-1 records the scores in a prefill."""
    step = _STEP.get()
    if step is None or module not in step.pruned:
        if step is not None and module is step.probe:
            step.scores = _scores(step, query, key, scaling)
        return _original(module)(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout,
                                 **kwargs)
    layer = claim(key)
    if layer is not None:  # a vtattn.kv.CompressedCache layer: it compresses, then reads what it keeps
        frame = None
        if step.images is not None:  # the prefill: this layer holds the kept tokens, right-aligned
            from ..kv.cache import Frame
            record, modality = step.record, layer.cache.modality
            frame = Frame(record.index, record.length,
                          None if modality is None else modality.gather(1, record.index))
            attention_mask = record.real[:, None, None, :]
        out = layer.attend(query, key, value, attention_mask, scaling, frame)
        return out.transpose(1, 2), None
    if key.shape[2] != step.record.index.shape[1]:
        raise RuntimeError(f"a FastV layer holds {key.shape[2]} keys, its record {step.record.index.shape[1]}")
    if step.kv is None:  # the same for every layer >= K
        step.kv = step.record.attention_args(query.shape[2], key.shape[1])
    out = vtattn.index_attention(query, key, value, causal=True, scale=scaling, **step.kv)
    return out.transpose(1, 2), None  # [B, N, H, D], free: index_attention lays it out so


def _original(module):
    """The attention function the module's own config names (its modeling file's eager one for
    "eager")."""
    from transformers import AttentionInterface
    impl = module.config._config._attn_implementation
    interface = AttentionInterface()
    return interface[impl] if impl in interface else sys.modules[type(module).__module__].eager_attention_forward


class _Routed:
    """A config seen through, but naming FastV's attention: routes one attention module only (the
    model's own config, and so its mask creation, stay as they are)."""

    def __init__(self, config):
        self.__dict__.update(_config=config, _attn_implementation=NAME)

    def __getattr__(self, name):
        if name == "_config":  # not set yet (copy / pickle build the object without __init__)
            raise AttributeError(name)
        return getattr(self._config, name)

