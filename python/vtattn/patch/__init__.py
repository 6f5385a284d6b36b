"""Drop-in patches for transformers models: visual-token pruning for LLaVA / LLaVA-NeXT and bare
CLIP / SigLIP towers, FastV and KV-cache compression for any causal LM or VLM (`llm`), and
`attn_implementation="vtattn"`. transformers is imported on use only."""
from ._install import unpatch
from .fastv import FastV
from .hf_attention import register_hf_attention
from .llm import llm
from .llava import llava
from .vision import SelectedFeatures, vision_tower

__all__ = ["llava", "llm", "FastV", "vision_tower", "unpatch", "register_hf_attention", "SelectedFeatures"]
