"""Multimodal hashes that include the pruning settings. vLLM keys its encoder cache, processor cache
and prefix cache (and the EC / KV connectors that share them between instances) by each item's hash,
which a client's multimodal uuid can replace outright: a pruned item's hash must differ from the same
item's unpruned (or differently pruned) one."""
from __future__ import annotations

from typing import Any

from . import KEY, check_settings, digest


class SettingsHash:
    """Mixin for a BaseMultiModalProcessor: every item hash gets a suffix naming the settings."""

    def _get_mm_hashes(self, inputs: Any) -> Any:
        hashes = super()._get_mm_hashes(inputs)  # type: ignore[misc]
        tag = "vtattn-" + digest(check_settings(getattr(self.info.get_hf_config(), KEY)))  # type: ignore[attr-defined]
        return {modality: [f"{h}-{tag}" for h in items] for modality, items in hashes.items()}
