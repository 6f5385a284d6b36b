"""Visual-token exit (DyVTE's exit, training-free with a fixed layer): from decoder layer K on, every
image (and video) token leaves the language model's sequence; layers >= K hold, and cache, the
text tokens only.

It is FastV's drop with nothing kept (`drop.Drop`, whose rule here keeps no image token), without
FastV's scoring layer: kept tokens keep their original positions, pruned layers attend with
`index_attention` (or hand their prefill to a `vtattn.kv.CompressedCache`). On Qwen2-VL it shares
the language model's exits with vision-side `VisionSelect` (layer 0), and it may follow FastV.
The release (DoubtedSteam/DyVTE) decides the exit per sample with trained routers; the rule and
every difference are in docs/selection.md."""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from . import core
from .drop import Drop, Step


@dataclass(frozen=True)
class VisualExit(core.Stage):
    """Every image token leaves the language model from decoder layer `layer` (K) on: layers < K see
    the whole sequence, layers >= K the text tokens only (K = 0: the LLM never sees the image; K = the
    number of decoder layers: the unpatched model)."""
    layer: int

    def __post_init__(self) -> None:
        if isinstance(self.layer, bool) or not isinstance(self.layer, int):
            raise TypeError(f"VisualExit layer must be an int, got {self.layer!r}")
        if self.layer < 0:
            raise ValueError(f"VisualExit layer must be >= 0, got {self.layer}")

    def install(self, patch: core.Patch) -> core.Installed:
        return _VisualExit(self, patch)


class _VisualExit(core.Installed):
    phase = core.LAYERS

    def __init__(self, options: VisualExit, patch: core.Patch) -> None:
        core.require_image_ids(patch, "visual-token exit")
        decoder = core.language_model(patch.model)
        layers = len(decoder.layers)
        if options.layer > layers:
            raise ValueError(f"VisualExit layer must be <= the {layers} decoder layers, got {options.layer}")
        self.options = options
        self.drop: Drop | None = None  # None: K = the number of layers, nothing leaves
        if options.layer < layers:
            core.check_full_attention(decoder.config)
            self.drop = Drop(patch, decoder, options.layer, "VisualExit")

    @property
    def kept(self) -> torch.Tensor | None:
        return None if self.drop is None else self.drop.kept

    def forward(self, call: core.Call, proceed: Callable[[core.Call], Any]) -> Any:
        if self.drop is None:
            return proceed(call)
        return self.drop.forward(call, proceed, _no_image)

    def uninstall(self) -> None:
        if self.drop is not None:
            self.drop.remove()


def _no_image(step: Step) -> torch.Tensor:
    assert step.images is not None  # an exit's choice runs in a prefill
    return torch.zeros_like(step.images)
