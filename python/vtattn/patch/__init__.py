"""Drop-in patches for transformers models, composed of stages: `VisionSelect` (vision-side visual-
token pruning: before the projector for LLaVA / LLaVA-NeXT, at the LLM's input for Qwen2-VL /
Qwen2.5-VL, or a bare CLIP / SigLIP tower's features), `FastV` (pruning inside the LLM),
`VisualExit` (every visual token leaves the LLM from a layer on), `SparseVLM` and `AIM` (more pruning
inside the LLM), `VAR` and `CMAI` (attention reweighted, no token removed) and `KVCompress` (a
`vtattn.kv.CompressedCache` per prefill), put on a model by a thin adapter per family (`llava`,
`qwen2_vl`, `llm`, `vision_tower`, or `auto` by `config.model_type`) and taken off by `unpatch`; and
`attn_implementation="vtattn"` (`register_hf_attention`). transformers is imported on use only.
How a patch runs: `core` (docs/internals.md walks through it)."""
from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from vtattn import pruning

from . import core
from .aim import AIM
from .cmai import CMAI
from .compress import KVCompress
from .core import Stage, unpatch
from .fastv import FastV
from .hf_attention import register_hf_attention
from .sparse_prefill import SparsePrefillStage
from .sparsevlm import SparseVLM
from .var import VAR
from .vision import SelectedFeatures, VisionSelect
from .visual_exit import VisualExit

__all__ = ["llava", "qwen2_vl", "llm", "vision_tower", "auto", "unpatch", "register_hf_attention", "Stage",
           "VisionSelect", "FastV", "VisualExit", "KVCompress", "SparsePrefillStage", "SelectedFeatures", "FAMILIES",
           "AIM", "VAR", "CMAI", "SparseVLM"]


def _stages(name: str, stages: Sequence[Stage] | None, given: bool) -> list[Stage] | None:
    """A list of stages given instead of the keyword options (None when not given)."""
    if stages is None:
        return None
    if given:
        raise ValueError(f"vtattn.patch.{name}: pass a list of stages or the keyword options, not both")
    stages = list(stages)
    bad = [s for s in stages if not isinstance(s, Stage)]
    if bad or not stages:
        raise TypeError(f"vtattn.patch.{name}: stages must be a non-empty list of vtattn.patch stages "
                        f"(VisionSelect, FastV, VisualExit, SparseVLM, AIM, VAR, CMAI, KVCompress, ...), got {bad[0] if bad else stages!r}")
    return stages


def _sparse(policy: Any, inside: list[Stage]) -> list[Stage]:
    """[SparsePrefillStage(policy)], or [] for None; FastV's and VisualExit's pruned layers run their
    own attention."""
    if policy is None:
        return []
    if inside:
        raise NotImplementedError("sparse_prefill= and fastv= / visual_exit= both rewrite the LLM's prefill attention: "
                                  "pass one")
    return [SparsePrefillStage(policy)]


def _inside(fastv: FastV | None, visual_exit: VisualExit | None) -> list[Stage]:
    """The given stages that drop tokens inside the LLM (FastV first: it scores the whole sequence)."""
    if fastv is not None and not isinstance(fastv, FastV):
        raise TypeError(f"fastv must be a vtattn.patch.FastV, got {type(fastv).__name__}")
    if visual_exit is not None and not isinstance(visual_exit, VisualExit):
        raise TypeError(f"visual_exit must be a vtattn.patch.VisualExit, got {type(visual_exit).__name__}")
    return [s for s in (fastv, visual_exit) if s is not None]


def _vision(keep: float | int | None, keep_tokens: int | None, **options: Any) -> VisionSelect:
    """A VisionSelect from an adapter's keep / keep_tokens (resolved here, so an int keep's
    FutureWarning names the caller's line)."""
    budget = pruning.resolve_keep(keep, keep_tokens, default=1.0, stacklevel=4)
    return VisionSelect(**({"keep": budget} if isinstance(budget, float) else {"keep_tokens": budget}), **options)


def _fastv(method: str, fastv: FastV | None, layer: int | None, keep: float | None,
           keep_tokens: int | None) -> FastV | None:
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


def llava(model: torch.nn.Module, stages: Sequence[Stage] | None = None, *, keep: float | None = None,
          keep_tokens: int | None = None, method: str = "auto", ensemble_layers: Any = None,
          merge: str | None = None, alpha: float = 0.5, kv: Any = None, fastv: FastV | None = None,
          layer: int | None = None, sparse_prefill: Any = None,
          visual_exit: VisualExit | None = None, hired_split: str = "vtattn") -> torch.nn.Module:
    """Patch a LlavaForConditionalGeneration / LlavaNextForConditionalGeneration (or their
    Llava(Next)Model) in place and return it. keep: the ratio in (0, 1] of each view's tokens kept
    before the projector, or keep_tokens: a count per view (HiRED: per image; keep=1.0 keeps every
    token, running the tower on vtattn attention); method: see vtattn.pruning; merge: None, "mean"
    or "weighted"; alpha: HiRED's share for the base view; hired_split: "vtattn" (default) or
    "release", HiRED's budget split over LLaVA-NeXT's views (docs/selection.md); kv: a `vtattn.kv`
    policy (or one per LLM layer, None = keep a layer whole): every prefill's KV cache becomes a
    `vtattn.kv.CompressedCache` holding what it keeps (the LLM's attention modules are routed to vtattn's); fastv: a
    vtattn.patch.FastV to prune inside the LLM as well; visual_exit: a vtattn.patch.VisualExit (every
    image token leaves the LLM from its layer on). method="fastv" with layer= and keep= (or
    keep_tokens=) is FastV alone (no pruning before the projector). sparse_prefill: a `vtattn.sparse`
    policy (FlexPrefill, MoA, HiP, RegionRouting): the LLM's prefill attention runs block-sparse
    (docs/sparse.md). keep defaults to 1.0 with kv=, fastv=, visual_exit= or sparse_prefill=; with none
    of keep, keep_tokens, kv, fastv, visual_exit and sparse_prefill there is nothing to do: ValueError.
    stages: a list of stages (VisionSelect, KVCompress, FastV, VisualExit) instead of the keyword options.
    `vtattn.patch.unpatch(model)` restores it."""
    from transformers import (LlavaForConditionalGeneration, LlavaModel, LlavaNextForConditionalGeneration,
                              LlavaNextModel)
    if not isinstance(model, (LlavaForConditionalGeneration, LlavaModel, LlavaNextForConditionalGeneration,
                              LlavaNextModel)):
        raise TypeError(f"vtattn.patch.llava supports transformers' Llava and LlavaNext models, "
                        f"got {type(model).__name__}")
    given = [keep, keep_tokens, ensemble_layers, merge, kv, fastv, layer, sparse_prefill, visual_exit] != [None] * 9 \
        or (method, alpha, hired_split) != ("auto", 0.5, "vtattn")
    chosen = _stages("llava", stages, given)
    if chosen is None:
        if method not in pruning.METHODS + ("fastv",):
            raise ValueError(f"unknown method {method!r}; choose one of "
                             f"{', '.join(map(repr, pruning.METHODS + ('fastv',)))}")
        fastv = _fastv(method, fastv, layer, keep, keep_tokens)
        inside = _inside(fastv, visual_exit)
        vision = method != "fastv"
        if vision and keep is None and keep_tokens is None and not inside and kv is None and sparse_prefill is None:
            raise ValueError("vtattn.patch.llava: nothing to do: pass keep= (the ratio of visual tokens to keep) or "
                             "keep_tokens=, fastv=, visual_exit= and/or kv=")
        chosen = [_vision(keep, keep_tokens, method=method, ensemble_layers=ensemble_layers, merge=merge,
                          alpha=alpha, hired_split=hired_split)] if vision else []
        chosen += [KVCompress(kv)] if kv is not None else []
        chosen += inside + _sparse(sparse_prefill, inside)
    return core.install(model, chosen, family="llava", image_ids=_image_tokens(model.config, None),
                        hide=("mm_encoder_outputs",))


def qwen2_vl(model: torch.nn.Module, stages: Sequence[Stage] | None = None, *, keep: float | None = None,
             keep_tokens: int | None = None, kv: Any = None, fastv: FastV | None = None,
             image_token_id: int | list[int] | None = None, sparse_prefill: Any = None,
             visual_exit: VisualExit | None = None) -> torch.nn.Module:
    """Patch a Qwen2VLForConditionalGeneration / Qwen2_5_VLForConditionalGeneration in place and
    return it. keep: a ratio in (0, 1] (each image and video frame keeps max(1, round(keep * n)) of
    its n tokens, scored in the ViT, leaving at the LLM's input) or keep_tokens: a count per image /
    frame (at most the largest one's); kv: as `vtattn.patch.llm`; fastv: a `vtattn.patch.FastV`
    instead of keep (one pruning stage); visual_exit: a `vtattn.patch.VisualExit` (every image / video
    token leaves the LLM from its layer on; with keep, the kept ones); sparse_prefill: as
    `vtattn.patch.llm` (RegionRouting's regions: each image's and each video frame's merged token grid).
    Nothing to do (no keep below 1.0, kv, fastv, visual_exit or sparse_prefill): ValueError.
    stages: a list of stages instead of the keyword options. `vtattn.patch.unpatch` restores it."""
    from transformers import Qwen2_5_VLForConditionalGeneration, Qwen2VLForConditionalGeneration
    if not isinstance(model, (Qwen2VLForConditionalGeneration, Qwen2_5_VLForConditionalGeneration)):
        raise TypeError(f"vtattn.patch.qwen2_vl supports transformers' Qwen2-VL and Qwen2.5-VL "
                        f"(...ForConditionalGeneration), got {type(model).__name__}")
    chosen = _stages("qwen2_vl", stages, [keep, keep_tokens, kv, fastv, sparse_prefill, visual_exit] != [None] * 6)
    if chosen is None:
        budget = pruning.resolve_keep(keep, keep_tokens, default=1.0)
        pruned = not (budget == 1.0 and not isinstance(budget, int))
        inside = _inside(fastv, visual_exit)
        if not pruned and kv is None and not inside and sparse_prefill is None:
            raise ValueError("vtattn.patch.qwen2_vl: nothing to do: pass keep < 1.0 (or keep_tokens=), kv=, fastv=, "
                             "visual_exit= and/or sparse_prefill=")
        if pruned and fastv is not None:
            raise NotImplementedError("keep= and fastv= are two pruning stages; vtattn.patch.qwen2_vl runs one: "
                                      "pass keep (vision-side) or fastv")
        chosen = [VisionSelect(**({"keep": budget} if isinstance(budget, float) else {"keep_tokens": budget}))] \
            if pruned else []
        chosen += [KVCompress(kv)] if kv is not None else []
        chosen += inside + _sparse(sparse_prefill, inside)
    return core.install(model, chosen, family="qwen2_vl", image_ids=_image_tokens(model.config, image_token_id))


def llm(model: torch.nn.Module, stages: Sequence[Stage] | None = None, *, kv: Any = None,
        fastv: FastV | None = None, image_token_id: int | list[int] | None = None,
        sparse_prefill: Any = None, visual_exit: VisualExit | None = None) -> torch.nn.Module:
    """Patch a transformers causal LM or VLM whose language model attends through transformers'
    attention interface with full attention (Llama, Mistral, Qwen2, Qwen3, Qwen2-VL, LLaVA, ...) in
    place and return it. kv: a `vtattn.kv` policy (or one per decoder layer, None = keep a layer
    whole): every prefill's KV cache becomes a `vtattn.kv.CompressedCache(kv)`; fastv: a
    `vtattn.patch.FastV` pruning image tokens from its decoder layer on (then the pruned layers'
    cache holds, and compresses, FastV's kept tokens); visual_exit: a `vtattn.patch.VisualExit` (every
    image token leaves from its decoder layer on). image_token_id: the token id(s) of image
    tokens (FastV's candidates, VisualExit's; modality for the KV policies that need it: LookM, Modality,
    merging); default: the config's `image_token_id` (or `image_token_index`) and `video_token_id`.
    sparse_prefill: a `vtattn.sparse` policy (FlexPrefill, MoA, HiP, RegionRouting): prefill attention of
    its layers runs `vtattn.block_sparse_attention` over the lists it builds per input; decode stays
    dense (or compressed, with kv=). stages: a list of stages (KVCompress, FastV, VisualExit,
    SparsePrefillStage) instead. `vtattn.patch.unpatch(model)` restores it."""
    chosen = _stages("llm", stages, [kv, fastv, sparse_prefill, visual_exit] != [None] * 4)
    if chosen is None:
        inside = _inside(fastv, visual_exit)
        if kv is None and not inside and sparse_prefill is None:
            raise ValueError("vtattn.patch.llm needs kv= (a vtattn.kv policy) and/or fastv= (a vtattn.patch.FastV) "
                             "and/or visual_exit= (a vtattn.patch.VisualExit) and/or sparse_prefill= (a vtattn.sparse "
                             "policy)")
        chosen = ([KVCompress(kv)] if kv is not None else []) + inside + _sparse(sparse_prefill, inside)
    core.language_model(model)  # a decoder to patch, before reading its config
    return core.install(model, chosen, family="llm", image_ids=_image_tokens(model.config, image_token_id))


def vision_tower(tower: torch.nn.Module, stages: Sequence[Stage] | None = None, *, keep: float | None = None,
                 keep_tokens: int | None = None, method: str = "auto", feature_layer: int = -1,
                 drop_cls: bool | None = None, ensemble_layers: Any = None, merge: str | None = None,
                 alpha: float = 0.5) -> torch.nn.Module:
    """Patch a bare CLIPVisionModel / SiglipVisionModel in place: `tower(pixel_values)` then returns
    SelectedFeatures(features, selection) for `hidden_states[feature_layer]` (the [CLS] token left
    out when drop_cls, default: when the tower has one): `keep` of its tokens (a ratio in (0, 1]) or
    `keep_tokens` (a count). stages: [VisionSelect(...)] instead of the keyword options.
    `vtattn.patch.unpatch(tower)` restores it."""
    given = [keep, keep_tokens, drop_cls, ensemble_layers, merge] != [None] * 5 or (
        method, feature_layer, alpha) != ("auto", -1, 0.5)
    chosen = _stages("vision_tower", stages, given)
    if chosen is None:
        if keep is None and keep_tokens is None:
            raise TypeError("vtattn.patch.vision_tower needs keep= (a ratio in (0, 1]) or keep_tokens= (a count)")
        chosen = [_vision(keep, keep_tokens, method=method, feature_layer=feature_layer, drop_cls=drop_cls,
                          ensemble_layers=ensemble_layers, merge=merge, alpha=alpha)]
    return core.install(tower, chosen, family="tower", first="pixel_values")


FAMILIES: dict[str, Callable[..., torch.nn.Module]] = {
    "llava": llava, "llava_next": llava, "qwen2_vl": qwen2_vl, "qwen2_5_vl": qwen2_vl,
    "llama": llm, "mistral": llm, "qwen2": llm, "qwen3": llm,
    "clip_vision_model": vision_tower, "siglip_vision_model": vision_tower}
"""`config.model_type` -> the adapter `auto` runs (text LMs with full attention get `llm`)."""


def auto(model: torch.nn.Module, *args: Any, **options: Any) -> torch.nn.Module:
    """Patch `model` with its family's adapter (`FAMILIES`, by `config.model_type`), passing the
    arguments on: `auto(llava_model, keep=0.25)`, `auto(qwen2_vl_model, keep=0.25, kv=...)`,
    `auto(llama, kv=vtattn.kv.SnapKV(0.2))`. Returns the model."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    adapter = FAMILIES.get(model_type) if isinstance(model_type, str) else None
    if adapter is None:
        raise TypeError(f"vtattn.patch.auto: no adapter for model_type {model_type!r} ({type(model).__name__}); "
                        f"supported: {', '.join(sorted(FAMILIES))}")
    return adapter(model, *args, **options)


def _image_tokens(config: Any, given: int | list[int] | None) -> list[int]:
    """The image token ids: `given` (an int or a list of ints), else the config's."""
    if given is None:
        found = [getattr(config, n, None) for n in ("image_token_id", "image_token_index", "video_token_id")]
        return sorted({i for i in found if isinstance(i, int)})
    ids = [given] if isinstance(given, int) and not isinstance(given, bool) else given
    if not isinstance(ids, (list, tuple)) or not ids or not all(
            isinstance(i, int) and not isinstance(i, bool) for i in ids):
        raise TypeError(f"image_token_id must be an int or a list of ints, got {given!r}")
    return sorted(set(ids))
