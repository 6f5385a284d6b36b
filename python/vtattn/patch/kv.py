"""KV-cache compression as a drop-in: `vtattn.patch.kv(model, policy)` for any transformers causal LM
or VLM whose language model attends through transformers' attention interface with full
attention (Llama, Mistral, Qwen2, Qwen2-VL, Qwen2.5-VL, LLaVA, ...), and `Compression`, the same
for `vtattn.patch.llava(kv=...)`.

The language model runs attn_implementation="vtattn"; a prefill (a call with no cache, or an
empty one) gets a `vtattn.kv.CompressedCache` in place of its cache, whose modality is the
prompt's image (and video) tokens, and `generate` goes on with the cache the forward returns."""
import weakref

from . import _install
from .hf_attention import NAME, register_hf_attention


def kv(model, policy, *, image_token_id=None):
    """Patch a transformers model in place and return it: every prefill's KV cache becomes a
    `vtattn.kv.CompressedCache(policy)` (a `vtattn.kv` policy, or one per decoder layer, None =
    keep a layer whole). image_token_id: the token id(s) that mark image tokens, for the policies
    that need modality (LookM, Modality, merging); default: the config's `image_token_id` (or
    `image_token_index`) and `video_token_id`. `vtattn.patch.unpatch(model)` restores it."""
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else None
    if decoder is None or not hasattr(decoder, "config"):
        raise TypeError(f"vtattn.patch.kv needs a transformers model with a decoder (get_decoder()), got "
                        f"{type(model).__name__}")
    ids = _image_tokens(model.config, image_token_id)
    compression = Compression(decoder.config, policy)
    state = _KV(compression, ids)
    _install.unpatch(model)  # first: a previous patch restores the attention implementation it set
    compression.install()

    def forward(input_ids=None, **kwargs):
        return state(input_ids, **kwargs)

    return _install.install(model, forward, state)


def check_full_attention(config):
    """Refuse a language model with sliding-window (or other non-full) attention layers: the
    compressed cache's attention reads every kept key."""
    window = getattr(config, "sliding_window", None)
    types = getattr(config, "layer_types", None)
    other = sorted({t for t in types or () if t != "full_attention"})
    if other or (window and types is None):
        raise NotImplementedError(f"KV compression needs full attention in the language model; its config has "
                                  + (f"layer_types {other}" if other else f"sliding_window={window}"))


class Compression:
    """A patch's KV compression: `install` switches the language model (its `config`) to vtattn
    attention, `prepare` swaps a prefill's cache for a CompressedCache, `uninstall` restores."""

    def __init__(self, config, policy):
        from ..kv.cache import CompressedCache
        CompressedCache(policy)  # checks the policy now
        check_full_attention(config)
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


class _KV(_install.State):
    def __init__(self, compression, image_ids):
        self.compression, self.image_ids = compression, image_ids

    def __call__(self, input_ids=None, **kwargs):
        images = None
        if input_ids is not None and self.image_ids:
            images = (input_ids[..., None] == input_ids.new_tensor(self.image_ids)).any(-1)
        self.compression.prepare(input_ids, images, kwargs, self.cache_name)
        return self.original(input_ids, **kwargs)

    def uninstall(self):
        self.compression.uninstall()


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
