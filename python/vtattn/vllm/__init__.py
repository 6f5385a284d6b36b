"""vtattn's visual-token pruning inside vLLM, as a plugin (docs/vllm.md).

    from vllm import LLM
    llm = LLM(model=path, hf_overrides=vtattn.vllm.overrides(keep=0.25, method="cls"))
    # or: vllm serve PATH --hf-overrides '{"vtattn": {"keep": 0.25, "method": "cls"}}'

`overrides` returns the `hf_overrides` dict: the settings under the key "vtattn" of the model's HF
config. vLLM loads `register` through the `vllm.general_plugins` entry point in every process; it
registers a pruned variant of each supported model (`VARIANTS`) with its multimodal processor, and
a hook that swaps a config's architectures for their variants when, and only when, the config
carries vtattn settings: plain runs are untouched.

How a variant prunes (the same rules as `vtattn.patch.llava` / `vtattn.patch.qwen2_vl`,
docs/selection.md):
- the processor emits the pruned number of placeholder tokens per image (crop, frame), a fixed
  budget known before the encoder runs;
- the vision encoder runs on vtattn's attention, its score probes on `vtattn.key_importance`
  (never eager attention); under tensor parallelism the per-head score sums are all-reduced, so
  every rank selects the same tokens;
- the kept tokens are chosen with `vtattn.select_tokens` and gathered (`gather_tokens`) or merged
  (`merge_tokens`), and their count is checked against the placeholders (vLLM would silently
  truncate extra embeddings);
- Qwen2-VL / Qwen2.5-VL: the kept tokens keep their M-RoPE positions, through vLLM's
  multimodal-pruning path (`SupportsMultiModalPruning.recompute_mrope_positions`);
- the multimodal hashes (encoder cache, processor cache, prefix cache) include the settings.

Nothing here imports vLLM until `register` runs or a variant is built."""
from __future__ import annotations

import json
from typing import Any

from vtattn import pruning

KEY = "vtattn"
"""The HF config attribute that carries the settings (and selects the variants)."""

VARIANTS: dict[str, str] = {
    "LlavaForConditionalGeneration": "VtattnLlavaForConditionalGeneration",
    "LlavaNextForConditionalGeneration": "VtattnLlavaNextForConditionalGeneration",
    "Qwen2VLForConditionalGeneration": "VtattnQwen2VLForConditionalGeneration",
    "Qwen2_5_VLForConditionalGeneration": "VtattnQwen2_5_VLForConditionalGeneration",
}
"""vLLM architecture -> vtattn's pruned variant of it."""

MODEL_TYPES = ("llava", "llava_next", "qwen2_vl", "qwen2_5_vl")
"""HF `model_type`s whose architectures the plugin maps to the variants."""


def overrides(keep: float | None = None, method: str = "auto", *, keep_tokens: int | None = None,
              merge: str | None = None, alpha: float = 0.5, ensemble_layers: int | list[int] | None = None
              ) -> dict[str, Any]:
    """The `hf_overrides` that run a supported model (LLaVA-1.5 with a CLIP or SigLIP tower,
    LLaVA-NeXT, Qwen2-VL, Qwen2.5-VL) as vtattn's pruned variant, with these settings (the same
    meaning as `vtattn.patch.llava` / `vtattn.patch.qwen2_vl`): keep, a ratio in (0, 1] of each
    view's (crop's, frame's) tokens, or keep_tokens, a count; method: "auto", "cls" (FasterVLM),
    "cls_ensemble" (VTC-CLS), "hired" (HiRED), "mean_received", "rows" (Qwen: "auto" /
    "mean_received"); merge: None, "mean" or "weighted" (LLaVA); alpha: HiRED's base-view share;
    ensemble_layers: VTC-CLS's layers. JSON-serialisable: `json.dumps` of it is the value of
    `vllm serve --hf-overrides`."""
    budget = pruning.resolve_keep(keep, keep_tokens, default=None)
    if budget is None:
        raise ValueError("vtattn.vllm.overrides: pass keep= (the ratio of visual tokens to keep) or keep_tokens=")
    settings: dict[str, Any] = {"keep": budget} if isinstance(budget, float) else {"keep_tokens": budget}
    settings.update(method=method, merge=merge, alpha=alpha, ensemble_layers=ensemble_layers)
    check_settings(settings)
    return {KEY: settings}


def check_settings(settings: Any) -> dict[str, Any]:
    """The settings dict of a config (as `overrides` makes it), checked; raises ValueError/TypeError."""
    if not isinstance(settings, dict):
        raise TypeError(f"the '{KEY}' hf_overrides entry must be a dict (vtattn.vllm.overrides), got {settings!r}")
    unknown = set(settings) - {"keep", "keep_tokens", "method", "merge", "alpha", "ensemble_layers"}
    if unknown:
        raise ValueError(f"unknown vtattn settings {sorted(unknown)}; see vtattn.vllm.overrides")
    keep = settings.get("keep")
    if isinstance(keep, int) and not isinstance(keep, bool) and keep == 1:
        keep = 1.0  # JSON writes 1.0 as 1: a ratio here (counts are keep_tokens)
    budget = pruning.resolve_keep(keep, settings.get("keep_tokens"), default=None)
    if budget is None:
        raise ValueError("vtattn settings need keep (a ratio in (0, 1]) or keep_tokens (a count)")
    method = settings.get("method", "auto")
    if method not in pruning.METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {', '.join(map(repr, pruning.METHODS))}")
    pruning.check_merge(settings.get("merge"))
    alpha = settings.get("alpha", 0.5)
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be a number in [0, 1], got {alpha!r}")
    layers = settings.get("ensemble_layers")
    if layers is not None and not (isinstance(layers, int) or (
            isinstance(layers, list) and layers and all(isinstance(x, int) for x in layers))):
        raise TypeError(f"ensemble_layers must be an int or a non-empty list of ints, got {layers!r}")
    return {"keep": budget, "method": method, "merge": settings.get("merge"), "alpha": float(alpha),
            "ensemble_layers": layers}


def digest(settings: dict[str, Any]) -> str:
    """A short stable id of the settings: part of every multimodal hash of a pruned run."""
    import hashlib
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]


def register() -> None:
    """vLLM's general-plugin entry point (runs in every vLLM process; idempotent): registers the
    pruned variants, the architecture hook, the config hook of the Qwen variants and vtattn's
    vision-encoder attention (a pass-through outside the variants)."""
    from . import _plugin
    _plugin.register()


__all__ = ["overrides", "register", "check_settings", "KEY", "VARIANTS", "MODEL_TYPES"]
