"""Drop-in patches for transformers models: visual-token pruning for LLaVA / LLaVA-NeXT and bare
CLIP / SigLIP towers, KV-cache compression for any causal LM or VLM (`kv`), and
`attn_implementation="vtattn"`. transformers is imported on use only."""
from ._install import unpatch
from .fastv import FastV
from .hf_attention import register_hf_attention
from .kv import kv
from .llava import llava
from .vision import SelectedFeatures, vision_tower

__all__ = ["llava", "kv", "FastV", "vision_tower", "unpatch", "register_hf_attention", "SelectedFeatures"]
