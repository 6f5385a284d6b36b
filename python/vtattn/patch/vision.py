"""Vision towers (CLIP, SigLIP) run on vtattn attention with score probes, and token selection.

The tower runs with `attn_implementation="vtattn"` for the length of one call: fused attention
everywhere, exact scores (`key_importance` from the same call's LSE) only at the probed layers,
never eager attention and never `output_attentions`."""
import contextlib
import threading
from typing import NamedTuple

import torch

import vtattn
from vtattn import selection as policy

from . import _install
from .hf_attention import NAME, Probe, probing, register_hf_attention


# The swap below changes shared config state: calls from several threads take turns, or one
# could restore another's "vtattn" as the previous value and leave the tower on it.
_SWAP = threading.RLock()


@contextlib.contextmanager
def vtattn_attention(tower):
    """Run `tower` with attn_implementation "vtattn" inside the block, restoring it after."""
    register_hf_attention()
    config = tower.config
    with _SWAP:
        previous = config._attn_implementation
        config._attn_implementation = NAME
        try:
            yield
        finally:
            config._attn_implementation = previous


class Selector:
    """One tower's selection policy, checked once: which layers to probe, how to score, budgets.

    feature_layer: the hidden-states index of the features (LLaVA's vision_feature_layer).
    drop_cls: the features leave out the [CLS] token (LLaVA's "default" strategy)."""

    def __init__(self, tower, *, keep, method, feature_layer, drop_cls, ensemble_layers=None,
                 merge=None, alpha=0.5):
        policy.check_keep(keep)
        policy.check_merge(merge)
        if not all(hasattr(tower, name) for name in ("embeddings", "encoder", "config")):
            raise TypeError(f"expected a CLIPVisionModel / SiglipVisionModel-like tower, "
                            f"got {type(tower).__name__}")
        self.tower, self.keep, self.merge, self.alpha = tower, keep, merge, alpha
        self.run = tower  # what encode calls: a patched tower's own unpatched forward
        self.layers = tower.encoder.layers
        self.attn = [layer.self_attn for layer in self.layers]
        self.has_cls = hasattr(tower.embeddings, "class_embedding")
        self.grid = tower.config.image_size // tower.config.patch_size
        if drop_cls and not self.has_cls:
            raise ValueError("the features drop a [CLS] token (strategy 'default') but the tower has none")
        self.drop = int(drop_cls)
        self.method = policy.resolve_method(method, has_cls=self.has_cls)
        if self.method == "rows" and self.has_cls and not drop_cls:
            raise ValueError("method 'rows' keeps grid rows: the features must not include the [CLS] token")
        self.feature = policy.feature_layer(feature_layer, len(self.attn))
        self.ensemble = (policy.ensemble_layers(ensemble_layers, len(self.attn), self.feature)
                         if self.method == "cls_ensemble" else None)
        if self.method == "hired" and not 0.0 <= alpha <= 1.0:
            raise ValueError(f"alpha must be in [0, 1], got {alpha}")
        self.plan = policy.probes(self.method, has_cls=self.has_cls, feature=self.feature,
                                  ensemble=self.ensemble)

    def encode(self, pixel_values, **tower_kwargs):
        """Run the tower. Returns features [V, Nf, C] of the feature layer, their importance
        [V, Nf] (fp32), HiRED's layer-0 [CLS] row [V, Nf] (else None) and, when merging, the
        feature layer's attention keys head-concatenated [V, Nf, H*D] (else None)."""
        probes = {self.attn[layer]: Probe(rows, reduce) for layer, (rows, reduce) in self.plan.items()}
        if self.merge:
            probes.setdefault(self.attn[self.feature], Probe(rows=None)).keys = True
        # The feature layer's output is hidden_states[feature_layer]; a hook keeps just that one
        # instead of every layer's hidden states.
        out = []
        hook = self.layers[self.feature].register_forward_hook(
            lambda module, args, output: out.append(output[0] if isinstance(output, tuple) else output))
        try:
            with vtattn_attention(self.tower), probing(probes):
                self.run(pixel_values, return_dict=True, **tower_kwargs)
        finally:
            hook.remove()
        scores = {layer: probes[self.attn[layer]].scores for layer in self.plan}
        cut = slice(self.drop, None)
        features = out[0][:, cut]
        imp = policy.importance(self.method, scores, has_cls=self.has_cls, feature=self.feature,
                                ensemble=self.ensemble)[:, cut]
        early = scores[0][:, cut] if self.method == "hired" else None
        keys = probes[self.attn[self.feature]].key_states[:, cut] if self.merge else None
        return features, imp, early, keys

    def counts(self, view_tokens, early_base=None, crop_grid=None):
        """Per-view budgets of one image. view_tokens: tokens each view really has; for HiRED,
        early_base is the base view's layer-0 [CLS] row over its grid and crop_grid (nh, nw)."""
        full = self.grid ** 2 if self.drop or not self.has_cls else self.grid ** 2 + 1
        if self.method != "hired":
            return torch.tensor([policy.budget(self.keep, n, full) for n in view_tokens])
        mass = policy.region_mass(early_base, self.grid, *crop_grid) if crop_grid else []
        return policy.hired_budgets(self.keep, self.alpha, view_tokens, mass)

    def ranking(self, imp, counts):
        """The scores the top-k runs on: FoPru's row lift for "rows", else the importance."""
        return policy.rows_first(imp, self.grid, counts) if self.method == "rows" else imp

    def keep_tokens(self, x, scores, counts, keys=None, segments=None):
        """Top-k of `scores` [B, N] with per-(row, segment) `counts` ([B] or [B, S] int64), then
        the kept rows of x [B, N, C] (merged when configured). Returns ([B, K, C], Selection)."""
        uniform = counts.dim() == 1 and bool((counts == counts[0]).all())  # counts live on the host
        keep = int(counts[0]) if uniform else counts.to(scores.device)  # an int: no device sync
        sel = vtattn.select_tokens(scores, keep_tokens=keep, segments=segments)
        if self.merge:
            return vtattn.merge_tokens(x, sel, keys=keys, mode=self.merge), sel
        return vtattn.gather_tokens(x, sel), sel


class SelectedFeatures(NamedTuple):
    features: torch.Tensor  # [B, K, C] kept (or merged) tokens of the feature layer, original order
    selection: object       # vtattn Selection: indices [B, K] into the feature tokens, mask, counts


def vision_tower(tower, *, keep=None, keep_tokens=None, method="auto", feature_layer=-1, drop_cls=None,
                 ensemble_layers=None, merge=None, alpha=0.5):
    """Patch a bare CLIPVisionModel / SiglipVisionModel in place: `tower(pixel_values)` then returns
    SelectedFeatures(features, selection) for `hidden_states[feature_layer]` (the [CLS] token left
    out when drop_cls, default: when the tower has one): `keep` of its tokens (a ratio in (0, 1]) or
    `keep_tokens` (a count). `vtattn.patch.unpatch(tower)` restores it."""
    keep = policy.resolve_keep(keep, keep_tokens)
    if keep is None:
        raise TypeError("vtattn.patch.vision_tower needs keep= (a ratio in (0, 1]) or keep_tokens= (a count)")
    if drop_cls is None:
        drop_cls = hasattr(getattr(tower, "embeddings", None), "class_embedding")
    selector = Selector(tower, keep=keep, method=method, feature_layer=feature_layer, drop_cls=drop_cls,
                        ensemble_layers=ensemble_layers, merge=merge, alpha=alpha)

    def forward(pixel_values, **kwargs):
        x, imp, _, keys = selector.encode(pixel_values, **kwargs)
        counts = selector.counts([x.shape[1]]).expand(len(x))  # one view per image: one budget
        return SelectedFeatures(*selector.keep_tokens(x, selector.ranking(imp, counts), counts, keys))

    state = _install.State()
    _install.install(tower, forward, state)
    selector.run = state.original
    return tower
