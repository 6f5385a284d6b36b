"""FastV inside a VLM's language model: from decoder layer K on, the image tokens that the last
prompt token attended to least at layer K-1 (mean over heads) leave the sequence.

The stage routes layer K-1 to vtattn's attention and, in a prefill, hooks its call: the last prompt
token's probabilities over the keys it sees come from `vtattn.key_importance` (left-padding keys
left out), then the call goes on. The tokens then leave at layer K with `drop.Drop`'s mechanics
(kept tokens keep their positions; pruned layers attend with `index_attention`)."""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from vtattn import pruning

from . import core, hf_attention
from .drop import Drop, Step


@dataclass(frozen=True)
class FastV(core.Stage):
    """FastV's options, and its stage. From decoder layer `layer` (K >= 1) on, each sample keeps some
    of its image tokens, ranked by layer K-1's attention of the last prompt token (mean over heads):
    `keep`, a ratio in [0, 1] (max(1, round(keep * n)) of n tokens, none for 0; default 0.5), or
    `keep_tokens`, an int count (at most n; 0 drops every image token from layer K on)."""
    layer: int = 2
    keep: float | None = None
    keep_tokens: int | None = None

    def __post_init__(self) -> None:
        if isinstance(self.layer, bool) or not isinstance(self.layer, int):
            raise TypeError(f"FastV layer must be an int, got {self.layer!r}")
        if self.layer < 1:
            raise ValueError(f"FastV layer must be >= 1 (layer K-1 scores the tokens), got {self.layer}")
        keep = pruning.resolve_keep(self.keep, self.keep_tokens, zero=True, default=0.5, stacklevel=4)
        object.__setattr__(self, "keep", keep if isinstance(keep, float) else None)  # frozen: normalised once
        object.__setattr__(self, "keep_tokens", keep if isinstance(keep, int) else None)

    def budget(self, n: int) -> int:
        """Image tokens kept out of a sample's n."""
        if self.keep_tokens is not None:
            return min(self.keep_tokens, n)
        assert self.keep is not None  # __post_init__ sets one of the two
        return 0 if n == 0 or self.keep == 0 else pruning.budget(self.keep, n)

    def install(self, patch: core.Patch) -> core.Installed:
        return _FastV(self, patch)


class _FastV(core.Installed):
    phase = core.LAYERS
    options: FastV

    def __init__(self, options: FastV, patch: core.Patch) -> None:
        core.require_image_ids(patch, "FastV")
        decoder = core.language_model(patch.model)
        core.check_full_attention(decoder.config)
        self.options = options
        self.drop = Drop(patch, decoder, options.layer, "FastV", first=True)  # layer K-1 scores the whole sequence
        self.probe = self.drop.attn[options.layer - 1]
        patch.route([self.probe])

    @property
    def kept(self) -> torch.Tensor | None:
        return self.drop.kept

    def forward(self, call: core.Call, proceed: Callable[[core.Call], Any]) -> Any:
        def scored(call: core.Call) -> Any:
            step = self.drop.step()  # None: a text-only prompt, run unpatched
            if step is not None and step.images is not None:  # a prefill: layer K-1 records the scores
                ctx = core.current()
                assert ctx is not None  # inside the patched forward
                ctx.hook(self.probe, self._score)
            return proceed(call)
        return self.drop.forward(call, scored, self._choose)

    def uninstall(self) -> None:
        self.drop.remove()

    def _score(self, module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
               mask: Any, scaling: float | None, kwargs: dict[str, Any]) -> None:
        """Layer K-1's attention hook in a prefill: the last prompt token's attention probabilities,
        mean over heads, over the keys it sees ([B, N] fp32; one key_importance call per left-padding
        amount; padding columns stay 0). The call then goes on as usual."""
        step = self.drop.step()
        assert step is not None and step.images is not None and step.pads is not None  # a prefill
        B, N = step.images.shape
        scores = torch.zeros(B, N, dtype=torch.float32, device=query.device)
        pads = step.pads
        groups = [(slice(None), pads[0])] if len(set(pads)) == 1 else [(slice(b, b + 1), p) for b, p in enumerate(pads)]
        query, key = query.detach(), key[:, :, :N].detach()  # no gradient through scores; a StaticCache's
        # keys are its capacity, the prompt's N first
        scale = query.shape[-1] ** -0.5 if scaling is None else float(scaling)
        for rows, pad in groups:
            scores[rows, pad:] = hf_attention.scores(query[rows, :, -1:], key[rows, :, pad:], 0, None, scale, False)
        step.scores = scores
        return None

    def _choose(self, step: Step) -> torch.Tensor:
        """FastV's rule: each sample's top image tokens by the recorded scores."""
        images = step.images
        assert images is not None  # a prefill
        counts = torch.tensor([self.options.budget(n) for n in images.sum(1).tolist()])  # host: no sync
        chosen = torch.zeros_like(images)
        if bool(counts.any()):  # select_tokens keeps >= 1 per sample: a zero budget is masked after
            assert step.scores is not None  # recorded by layer K-1 (_score)
            scores = step.scores.masked_fill(~images, -1.0)  # probabilities are >= 0: images first
            chosen = (core.select(scores, counts.clamp(min=1)).mask & images
                      & (counts > 0).to(images.device)[:, None])
        return chosen
