"""Drop-in patches for transformers models: visual-token pruning for LLaVA / LLaVA-NeXT, Qwen2-VL /
Qwen2.5-VL and bare CLIP / SigLIP towers, FastV and KV-cache compression for any causal LM or VLM
(`llm`), and `attn_implementation="vtattn"`. transformers is imported on use only."""
from ._install import unpatch
from .fastv import FastV
from .hf_attention import register_hf_attention
from .llava import llava
from .llm import llm
from .qwen2_vl import qwen2_vl
from .vision import SelectedFeatures, vision_tower

__all__ = ["llava", "qwen2_vl", "llm", "FastV", "vision_tower", "unpatch", "register_hf_attention",
           "SelectedFeatures"]
