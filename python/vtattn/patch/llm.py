"""In-LLM methods as a drop-in for any transformers causal LM or VLM whose language model attends
through transformers' attention interface with full attention (Llama, Mistral, Qwen2, Qwen2-VL,
Qwen2.5-VL, LLaVA, ...): `vtattn.patch.llm(model, kv=..., fastv=...)`, and `Compression`, the KV
part that `vtattn.patch.llava(kv=...)` shares.

KV compression: the language model runs attn_implementation="vtattn"; a prefill (a call with no
cache, or an empty one) gets a `vtattn.kv.CompressedCache` in place of its cache, whose modality
is the prompt's image (and video) tokens, and `generate` goes on with the cache the forward
returns. FastV: `fastv.Runner` on the language model's decoder layers."""
import weakref

from . import _install, fastv as _fastv
from .hf_attention import NAME, register_hf_attention


def llm(model, *, kv=None, fastv=None, image_token_id=None):
    """Patch a transformers model in place and return it. kv: a `vtattn.kv` policy (or one per
    decoder layer, None = keep a layer whole): every prefill's KV cache becomes a
    `vtattn.kv.CompressedCache(kv)`; fastv: a `vtattn.patch.FastV` pruning image tokens from its
    decoder layer on (then the pruned layers' cache holds, and compresses, FastV's kept tokens).
    image_token_id: the token id(s) of image tokens (FastV's candidates; modality for the KV
    policies that need it: LookM, Modality, merging); default: the config's `image_token_id` (or
    `image_token_index`) and `video_token_id`. `vtattn.patch.unpatch(model)` restores it."""
    if kv is None and fastv is None:
        raise ValueError("vtattn.patch.llm needs kv= (a vtattn.kv policy) and/or fastv= (a vtattn.patch.FastV)")
    if fastv is not None and not isinstance(fastv, _fastv.FastV):
        raise TypeError(f"fastv must be a vtattn.patch.FastV, got {type(fastv).__name__}")
    return install(model, kv, fastv, image_token_id)


def install(model, kv, stage, image_token_id, vision=None):
    """Patch `model`'s language model: KV compression with policy `kv` and/or a pruning `stage`
    (`fastv.Runner`'s options: a FastV, or layer 0 with `vision`, whose `scoring` gives each
    prefill its kept image tokens); None for none."""
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else None
    if decoder is None or not hasattr(decoder, "config") or not hasattr(decoder, "layers"):
        raise TypeError(f"vtattn.patch needs a transformers model with a decoder (get_decoder() with "
                        f"layers), got {type(model).__name__}")
    state = _LLM(_image_tokens(model.config, image_token_id), vision)
    if stage is not None and not state.image_ids:
        raise ValueError(f"pruning image tokens needs their ids: pass image_token_id= ({type(model).__name__}'s "
                         "config names none)")
    check_full_attention(decoder.config)
    if kv is not None:
        state.kv = Compression(decoder.config, kv)  # checks the policy now
    mount(model, state, decoder, stage)
    if vision is not None:
        _install.hide_parameter(model, "mm_encoder_outputs")
        vision.attach()
    return model


def mount(model, state, decoder, stage):
    """Put a patch `state` (a State whose `kv` is a Compression or None, called as the forward) on
    `model`. A previous patch comes off first: its uninstall restores the language model's
    attention implementation, which Compression.install must then record, not "vtattn". Then the
    KV compression, the FastV runner on `decoder` for `stage` (None for none), the forward."""
    _install.unpatch(model)
    try:
        if state.kv is not None:
            state.kv.install()
        state.fastv = _fastv.Runner(decoder, stage) if stage is not None else None
    except BaseException:
        state.uninstall()
        raise

    def forward(input_ids=None, **kwargs):
        return state(input_ids, **kwargs)

    _install.install(model, forward, state)


def check_full_attention(config):
    """Refuse a language model with sliding-window (or other non-full) attention layers: FastV's and
    the compressed cache's attention read every kept key."""
    window = getattr(config, "sliding_window", None)
    types = getattr(config, "layer_types", None)
    other = sorted({t for t in types or () if t != "full_attention"})
    if other or (window and types is None):
        raise NotImplementedError(f"FastV and KV compression need full attention in the language model; its config has "
                                  + (f"layer_types {other}" if other else f"sliding_window={window}"))


class Compression:
    """A patch's KV compression: `install` switches the language model (its `config`) to vtattn
    attention, `prepare` swaps a prefill's cache for a CompressedCache, `uninstall` restores."""

    def __init__(self, config, policy):
        from ..kv.cache import CompressedCache
        CompressedCache(policy)  # checks the policy now
        self.config, self.policy, self.previous, self.installed = config, policy, None, False
        self.replaced = weakref.WeakSet()  # caches a prefill replaced (generate goes on with the new one)

    def install(self):
        register_hf_attention()
        self.previous, self.config._attn_implementation = self.config._attn_implementation, NAME
        self.installed = True

    def uninstall(self):
        if self.installed:
            self.config._attn_implementation, self.installed = self.previous, False

    def prepare(self, input_ids, images, kwargs, cache_name):
        """Before the unpatched forward: on a prefill, put a CompressedCache (the caller's own, else
        a new one) in kwargs with `images` ([B, N] bool or None) as its modality."""
        from ..kv.cache import CompressedCache
        name, cache = _install.cache_arg(kwargs)
        if cache is not None and cache in self.replaced and cache.get_seq_length() == 0:
            mask = kwargs.get("attention_mask")
            new = (input_ids if input_ids is not None else kwargs["inputs_embeds"]).shape[1]
            if mask is None or mask.shape[-1] != new:  # not a new prompt: a continuation with no past
                raise ValueError("this cache was replaced by a vtattn.kv.CompressedCache at the prefill and "
                                 "holds nothing: continue with the cache the prefill returned "
                                 "(outputs.past_key_values; outputs.cache from transformers 5.25 on), or "
                                 "pass none / a new cache for a new prompt")
        if cache is None or cache.get_seq_length() == 0:  # a prefill
            compressed = cache if isinstance(cache, CompressedCache) else CompressedCache(self.policy)
            if cache is not None and compressed is not cache:
                self.replaced.add(cache)
            kwargs[name or cache_name] = compressed
            compressed.modality = images


class _LLM(_install.State):
    kv = fastv = None  # the Compression and the FastV Runner, each when configured

    def __init__(self, image_ids, vision):
        self.image_ids, self.vision = image_ids, vision

    def __call__(self, input_ids=None, **kwargs):
        images = None
        if input_ids is not None and self.image_ids:  # none: no modality (LookM then says it needs one)
            images = (input_ids[..., None] == input_ids.new_tensor(self.image_ids)).any(-1)
        if self.kv is not None:
            self.kv.prepare(input_ids, images, kwargs, self.cache_name)
        if self.fastv is None:
            return self.original(input_ids, **kwargs)
        if self.vision is None or not self.vision.prefill(images, kwargs):
            return self.fastv(self.original, input_ids, images, kwargs)
        with self.vision.scoring(input_ids, images, kwargs) as choose:
            return self.fastv(self.original, input_ids, images, kwargs, choose)

    def uninstall(self):
        if self.fastv is not None:
            self.fastv.remove()
        if self.kv is not None:
            self.kv.uninstall()
        if self.vision is not None:
            self.vision.detach()


def _image_tokens(config, given):
    """The image token ids: `given` (an int or a list of ints), else the config's."""
    if given is None:
        found = [getattr(config, n, None) for n in ("image_token_id", "image_token_index", "video_token_id")]
        return sorted({i for i in found if isinstance(i, int)})
    ids = [given] if isinstance(given, int) and not isinstance(given, bool) else given
    if not isinstance(ids, (list, tuple)) or not ids or not all(
            isinstance(i, int) and not isinstance(i, bool) for i in ids):
        raise TypeError(f"image_token_id must be an int or a list of ints, got {given!r}")
    return sorted(set(ids))
