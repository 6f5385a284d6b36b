"""What `vtattn.vllm.register` does in each vLLM process (vLLM is imported here). Idempotent."""
from __future__ import annotations

import logging
from typing import Any

from . import KEY, MODEL_TYPES, VARIANTS, check_settings

log = logging.getLogger("vtattn")

_MODULE = {"VtattnLlavaForConditionalGeneration": "llava", "VtattnLlavaNextForConditionalGeneration": "llava",
           "VtattnQwen2VLForConditionalGeneration": "qwen2_vl",
           "VtattnQwen2_5_VLForConditionalGeneration": "qwen2_vl"}
PRUNING_PATH_RATE = 1e-6
"""What the Qwen variants set `video_pruning_rate` to: vLLM's model runner recomputes M-RoPE positions
after the encoder (`recompute_mrope_positions`) only when that rate is > 0. vtattn's budgets apply;
this rate is not used by anything the variants run."""

PRUNING_PATH_VARIANTS = ("VtattnQwen2VLForConditionalGeneration", "VtattnQwen2_5_VLForConditionalGeneration")

_done = False


def register() -> None:
    global _done
    if _done:
        return
    from vllm import ModelRegistry
    from vllm.model_executor.custom_op import op_registry_oot
    from vllm.model_executor.layers.attention import MMEncoderAttention
    from vllm.model_executor.models.config import MODELS_CONFIG_MAP
    from vllm.transformers_utils import model_arch_config_convertor as convertors

    for variant, module in _MODULE.items():  # lazily imported: plain runs never load them
        ModelRegistry.register_model(variant, f"vtattn.vllm.{module}:{variant}")
    table = convertors.MODEL_ARCH_CONFIG_CONVERTORS
    for model_type in MODEL_TYPES:
        base = table.get(model_type, convertors.ModelArchConfigConvertorBase)
        if not getattr(base, "vtattn_selects", False):
            table[model_type] = _selecting(base)
    for variant in PRUNING_PATH_VARIANTS:
        MODELS_CONFIG_MAP[variant] = _pruning_path()

    _cpu_pruning_path()
    from .encoder import EncoderAttention
    current = op_registry_oot.get(MMEncoderAttention.__name__)
    if current is None:
        MMEncoderAttention.register_oot(EncoderAttention)
    elif current is not EncoderAttention:
        log.warning("vtattn.vllm: another plugin replaced MMEncoderAttention (%s); vtattn's pruned variants "
                    "will refuse to start", current.__name__)
    _done = True


def _selecting(base: type) -> type:
    """`base` (vLLM's architecture convertor of a model type) that maps a config's architectures to
    vtattn's variants when the config carries vtattn settings, and changes nothing otherwise. vLLM
    reads the architectures here, right after applying hf_overrides and before resolving the model
    class; its model loader reads `hf_config.architectures`, which is set to match."""

    class Selecting(base):
        vtattn_selects = True

        def get_architectures(self) -> list[str]:
            architectures = super().get_architectures()
            settings = getattr(self.hf_config, KEY, None)
            if settings is None:
                return architectures
            check_settings(settings)
            chosen = [VARIANTS.get(a, a) for a in architectures]
            if not set(chosen) & set(VARIANTS.values()):
                # a variant's language model (Qwen's text config carries the settings too): unchanged
                return architectures
            self.hf_config.architectures = chosen
            return chosen

    Selecting.__name__ = Selecting.__qualname__ = f"Vtattn{base.__name__}"
    return Selecting


def _pruning_path() -> type:
    from vllm.model_executor.models.config import VerifyAndUpdateConfig

    class PruningPath(VerifyAndUpdateConfig):
        """Turns on vLLM's multimodal-pruning path for a Qwen variant (see PRUNING_PATH_RATE)."""

        @staticmethod
        def verify_and_update_config(vllm_config: Any) -> None:
            mm = vllm_config.model_config.multimodal_config
            if mm is None:
                return
            if mm.video_pruning_rate not in (None, 0.0, PRUNING_PATH_RATE):
                raise ValueError("vtattn pruning and vLLM's video pruning (video_pruning_rate) are two pruning "
                                 "stages: use one")
            mm.video_pruning_rate = PRUNING_PATH_RATE

    return PruningPath


def _cpu_pruning_path() -> None:
    """vLLM's CPU model runner (0.32) never turns on the multimodal-pruning path that its GPU runner
    turns on after loading a model that supports it: turn it on there for the Qwen variants only."""
    from vllm.platforms import current_platform
    if not current_platform.is_cpu():
        return
    from vllm.v1.worker.cpu_model_runner import CPUModelRunner
    load = CPUModelRunner.load_model
    if getattr(load, "vtattn", False):
        return

    def load_model(self: Any, *args: Any, **kwargs: Any) -> None:
        load(self, *args, **kwargs)
        if type(self.model).__name__ in PRUNING_PATH_VARIANTS:
            self.is_multimodal_pruning_enabled = True

    load_model.vtattn = True  # type: ignore[attr-defined]
    CPUModelRunner.load_model = load_model
