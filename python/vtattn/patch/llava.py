"""Drop-in visual-token pruning for transformers' LLaVA (CLIP or SigLIP tower) and LLaVA-NeXT.

The patched forward, on a call with pixel_values (a prefill), runs the vision tower on vtattn
attention with score probes, keeps the selected tokens of each view before the projector, builds
the shortened sequence's embeddings, attention mask and positions, and runs the unpatched forward
on them. Decode steps that continue that cache get their mask and positions translated from the
caller's (original-length) frame to the shortened one, so `generate` works unchanged."""
import weakref

import torch

from vtattn import selection as policy

from . import _install, fastv as _fastv
from ._sequence import Shrink
from .llm import Compression, check_full_attention, mount
from .vision import Selector


def llava(model, *, keep=None, keep_tokens=None, method="auto", ensemble_layers=None, merge=None, alpha=0.5,
          kv=None, fastv=None, layer=None):
    """Patch a LlavaForConditionalGeneration / LlavaNextForConditionalGeneration (or their
    Llava(Next)Model) in place and return it. keep: the ratio in (0, 1] of each view's tokens kept
    before the projector, or keep_tokens: a count per view (HiRED: per image; keep=1.0 keeps every
    token, running the tower on vtattn attention); method: see vtattn.selection; merge: None, "mean"
    or "weighted"; alpha: HiRED's share for the base view; kv: a `vtattn.kv` policy (or one per LLM
    layer, None = keep a layer whole): every prefill's KV cache becomes a `vtattn.kv.CompressedCache`
    holding what it keeps (the LLM then runs attn_implementation="vtattn"); fastv: a
    vtattn.patch.FastV to prune inside the LLM as well. method="fastv" with layer= and keep= (or
    keep_tokens=) is FastV alone (no pruning before the projector). keep defaults to 1.0 with kv= or
    fastv=; with none of keep, keep_tokens, kv and fastv there is nothing to do: ValueError.
    `vtattn.patch.unpatch(model)` restores it."""
    from transformers import (LlavaForConditionalGeneration, LlavaModel, LlavaNextForConditionalGeneration,
                              LlavaNextModel)
    if not isinstance(model, (LlavaForConditionalGeneration, LlavaModel, LlavaNextForConditionalGeneration,
                              LlavaNextModel)):
        raise TypeError(f"vtattn.patch.llava supports transformers' Llava and LlavaNext models, "
                        f"got {type(model).__name__}")
    if method not in policy.METHODS + ("fastv",):
        raise ValueError(f"unknown method {method!r}; choose one of "
                         f"{', '.join(map(repr, policy.METHODS + ('fastv',)))}")
    fastv = _fastv.resolve(method, fastv, layer, keep, keep_tokens)
    vision = method != "fastv"
    if vision and keep is None and keep_tokens is None and fastv is None and kv is None:
        raise ValueError("vtattn.patch.llava: nothing to do: pass keep= (the ratio of visual tokens to keep) or "
                         "keep_tokens=, fastv= and/or kv=")
    keep = policy.resolve_keep(keep, keep_tokens, default=1.0) if vision else None
    base = model if isinstance(model, (LlavaModel, LlavaNextModel)) else model.model
    if fastv is not None or kv is not None:
        check_full_attention(base.language_model.config)
    options = dict(keep=keep, method=method, ensemble_layers=ensemble_layers, merge=merge, alpha=alpha)
    state = _Patch(base, options if vision else None, anyres=isinstance(base, LlavaNextModel))
    if vision:
        state.selector(base.config.vision_feature_layer, base.config.vision_feature_select_strategy)  # check now
    if kv is not None:
        state.kv = Compression(base.language_model.config, kv)  # checks the policy and the LLM now
    mount(model, state, base.language_model, fastv)
    _install.hide_parameter(model, "mm_encoder_outputs")
    return model


class _Patch(_install.State):
    fastv = None  # the FastV Runner, when pruning inside the LLM too
    kv = None  # the kv.Compression, when compressing the KV cache

    def __init__(self, base, options, anyres):
        """options: the vision-side selection's, None for none (FastV alone)."""
        self.base, self.options, self.anyres = base, options, anyres
        self.selectors = {}
        # cache object -> the Shrink of the prefill that filled it; gone with the cache.
        self.continuations = weakref.WeakKeyDictionary()

    def selector(self, layer, strategy):
        if strategy not in ("default", "full"):
            raise ValueError(f"vision_feature_select_strategy must be 'default' or 'full', got {strategy!r}")
        if (layer, strategy) not in self.selectors:
            self.selectors[layer, strategy] = Selector(self.base.vision_tower, feature_layer=layer,
                                                       drop_cls=strategy == "default", **self.options)
        return self.selectors[layer, strategy]

    def __call__(self, input_ids=None, **kwargs):
        pixel_values = kwargs.get("pixel_values")
        _, cache = _install.cache_arg(kwargs)
        if self.options is not None and pixel_values is not None and pixel_values.numel():
            return self.prefill(input_ids, kwargs)
        shrink = self.continuations.get(cache) if cache is not None else None
        past = cache.get_seq_length() if shrink is not None else 0
        if shrink is not None and past >= shrink.width:  # shorter: the cache was reset and reused
            new = (input_ids if input_ids is not None else kwargs["inputs_embeds"]).shape[1]
            kwargs["attention_mask"] = shrink.continue_mask(kwargs.get("attention_mask"), past, new)
            kwargs["position_ids"] = shrink.continue_positions(kwargs.get("position_ids"), past, new)
        images = None if input_ids is None else input_ids == self.base.config.image_token_id
        return self.run(input_ids, images, kwargs)

    def run(self, input_ids, images, kwargs):
        """The unpatched forward, through FastV when configured (images: [B, N] bool, the image
        tokens of the language model's input)."""
        if self.kv is not None:
            self.kv.prepare(input_ids, images, kwargs, self.cache_name)
        if self.fastv is None:
            return self.original(input_ids, **kwargs)
        return self.fastv(self.original, input_ids, images, kwargs)

    def uninstall(self):
        if self.fastv is not None:
            self.fastv.remove()
        if self.kv is not None:
            self.kv.uninstall()

    def prefill(self, input_ids, kwargs):
        if input_ids is None:
            raise NotImplementedError("visual-token pruning finds the image spans in input_ids: pass "
                                      "input_ids, not inputs_embeds, with pixel_values")
        _, cache = _install.cache_arg(kwargs)
        if cache is not None and cache.get_seq_length() > 0:
            raise NotImplementedError("visual-token pruning needs the images in the first forward of a cache")
        config = self.base.config
        layer = kwargs.pop("vision_feature_layer", None)
        strategy = kwargs.pop("vision_feature_select_strategy", None)
        selector = self.selector(config.vision_feature_layer if layer is None else layer,
                                 config.vision_feature_select_strategy if strategy is None else strategy)
        encode = self._anyres_features if self.anyres else self._features
        features, spans, kept = encode(selector, kwargs.pop("pixel_values"), kwargs.pop("image_sizes", None))
        shrink = Shrink(input_ids, config.image_token_id, spans, kept)
        kwargs.update(inputs_embeds=shrink.embeds(self.base.get_input_embeddings()(input_ids), features),
                      attention_mask=shrink.attention_mask(kwargs.get("attention_mask")),
                      position_ids=shrink.positions(kwargs.get("position_ids")))
        if "labels" in kwargs:
            kwargs["labels"] = shrink.labels(kwargs["labels"])
        out = self.run(None, shrink.image, kwargs)
        for filled in (cache, _install.output_cache(out)):
            if filled is not None:
                self.continuations[filled] = shrink
        return out

    def _features(self, selector, pixel_values, image_sizes):
        """LLaVA: one view per image, every image the same budget (one batched selection)."""
        if image_sizes is not None:
            raise NotImplementedError("image_sizes (variable-resolution towers) are not supported for Llava")
        x, imp, _, keys = selector.encode(pixel_values)
        counts = selector.counts([x.shape[1]]).expand(len(x))
        kept, _ = selector.keep_tokens(x, selector.ranking(imp, counts), counts, keys)
        n, k = kept.shape[:2]
        return self.base.multi_modal_projector(kept).flatten(0, 1), [x.shape[1]] * n, [k] * n

    def _anyres_features(self, selector, pixel_values, image_sizes):
        """LLaVA-NeXT: per image, the base view and its crops each keep their budget among the
        tokens that survive unpadding; the kept tokens keep the packed layout (base view, then the
        crop grid row by row), and a grid row keeps its newline token while it keeps any token."""
        from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches
        config = self.base.config
        views = [image_size_to_num_patches(s, config.image_grid_pinpoints, config.vision_config.image_size)
                 for s in image_sizes]
        if pixel_values.dim() == 5:
            pixel_values = torch.cat([p[:v] for p, v in zip(pixel_values, views)])
        x, imp, early, keys = selector.encode(pixel_values)
        if x.shape[1] != selector.grid ** 2:
            raise ValueError("LLaVA-NeXT packs square grids of patch tokens: the features must leave out "
                             "any [CLS] token (strategy 'default' for CLIP, 'full' for SigLIP)")
        kept, slots, spans = [], [], []
        parts = [t.split(views) if t is not None else [None] * len(views) for t in (x, imp, early, keys)]
        for size, xi, si, ei, ki in zip(image_sizes, *parts):
            valid, slot, row, newline, span, crop_grid = _anyres_layout(size, config, selector.grid, x.device)
            tokens = valid.sum(1)
            counts = selector.counts(tokens.tolist(), None if ei is None else ei[0], crop_grid)
            scores = selector.ranking(si.masked_fill(~valid, -1.0), counts)
            flat = valid.flatten().nonzero().squeeze(1)
            used = tokens > 0  # a crop can lie entirely in the unpadded margin
            features, sel = selector.keep_tokens(
                xi.flatten(0, 1)[flat][None], scores.flatten()[flat][None], counts.to(x.device)[used][None],
                None if ki is None else ki.flatten(0, 1)[flat][None], segments=tokens[used].tolist())
            index = flat[sel.indices[0]]
            rows = row.flatten()[index].unique()
            kept.append(features[0])
            slots.append(torch.cat([slot.flatten()[index], newline[rows[rows >= 0]]]))
            spans.append(span)
        projected = self.base.multi_modal_projector(torch.cat(kept)).split([len(k) for k in kept])
        newline = self.base.image_newline
        out = [torch.cat([p, newline.to(p.dtype).expand(len(s) - len(p), -1)])[s.argsort()]
               for p, s in zip(projected, slots)]
        return torch.cat(out), spans, [len(o) for o in out]


def _anyres_layout(image_size, config, grid, device):
    """Where each token of one LLaVA-NeXT image goes in transformers' packed sequence. Views are
    the base image then the crops (row-major), each a grid x grid token grid. Returns
    valid [V, g*g] (the token survives unpadding), slot [V, g*g] (its index in the packed sequence),
    row [V, g*g] (its row in the unpadded crop grid; -1 in the base view), the newline slots [R],
    the packed length and the crop grid (nh, nw)."""
    from transformers.models.llava_next.modeling_llava_next import get_anyres_image_grid_shape, unpad_image
    nh, nw = get_anyres_image_grid_shape(image_size, config.image_grid_pinpoints,
                                         config.vision_config.image_size)
    n, width = grid * grid, nw * grid
    combined = unpad_image(torch.arange(nh * grid * width).view(1, nh * grid, width), image_size)[0]
    R, C = combined.shape
    r, c = combined // width, combined % width
    view, local = 1 + (r // grid) * nw + c // grid, (r % grid) * grid + c % grid
    valid = torch.zeros(1 + nh * nw, n, dtype=torch.bool)
    slot = torch.zeros(1 + nh * nw, n, dtype=torch.long)
    row = torch.full((1 + nh * nw, n), -1, dtype=torch.long)
    valid[0], slot[0] = True, torch.arange(n)
    valid[view, local] = True
    slot[view, local] = n + torch.arange(R)[:, None] * (C + 1) + torch.arange(C)
    row[view, local] = torch.arange(R)[:, None].expand(R, C)
    newline = n + torch.arange(R) * (C + 1) + C
    return valid.to(device), slot.to(device), row.to(device), newline.to(device), n + R * (C + 1), (nh, nw)
