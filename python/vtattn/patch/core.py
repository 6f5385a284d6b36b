"""How a patch sits on a model: the stages it runs, the one route from attention modules to vtattn,
and the per-forward context the attention calls read.

- `Patch` is what `vtattn.patch.*` puts on a model (or a bare tower), stored as
  `model._vtattn_patch`: the installed stages in phase order, run around the unpatched forward by
  an instance-level `forward`; `unpatch` takes it off exactly.
- `Patch.route(modules)` is the only place attention modules are sent to vtattn: at install time,
  each module's `config` becomes a view of its own config that names vtattn's attention entry point
  (`hf_attention.attention_forward`, registered as "vtattn"); the model's config, and so the masks
  the model builds, stay as they are. Never a per-call swap, never a lock.
- `Context`: one object per forward of a patched model, in a thread-local slot (each thread has its
  own), carrying what stages hand to the attention calls inside that forward: score probes,
  per-module attention hooks, per-stage state, and the compressed cache's pending layer. Read it
  through `current()` only.
"""
from __future__ import annotations

import contextlib
import functools
import inspect
import sys
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

import torch

from .filled import Filled

NAME = "vtattn"  # the attention implementation routed modules name (hf_attention.attention_forward)
_ATTR = "_vtattn_patch"
# transformers 5.25 renamed forward's `past_key_values` (and its outputs' field) to `cache`; the old
# name is still accepted there, deprecated. A caller may use either.
CACHE_NAMES = ("cache", "past_key_values")

# Stage phases, the order stages see a forward in: rewrite the model's inputs (vision-side pruning
# before the projector), choose the cache, act inside the language model's layers.
INPUT, CACHE, LAYERS = 0, 1, 2

# An attention hook: (module, query, key, value, attention_mask, scaling, kwargs) -> the call's
# output [B, N, H, D], or None to let the call go on (to the next hook, then vtattn's attention).
Hook = Callable[..., "torch.Tensor | None"]


# ---- the per-forward context --------------------------------------------------------------------

class Context:
    """What one forward hands to the attention calls inside it. probes: {module: hf_attention.Probe}
    (scores recorded by vtattn's attention); hooks: {module: [Hook]} (stages acting on a module's
    attention, tried in order); state: per installed stage, its state for this forward; pending: the
    (layer, keys) of the latest `vtattn.kv.CompressedCache` update, until its attention claims it;
    open: inside a forward (`forward_context`), not a thread's leftover from `publish`."""
    __slots__ = ("probes", "hooks", "state", "pending", "open")

    def __init__(self, open: bool = True) -> None:
        self.open = open
        self.probes: dict[torch.nn.Module, Any] = {}
        self.hooks: dict[torch.nn.Module, list[Hook]] = {}
        self.state: dict[object, Any] = {}
        self.pending: tuple[Any, torch.Tensor] | None = None

    def hook(self, module: torch.nn.Module, fn: Hook, first: bool = False) -> None:
        """Have `fn` see `module`'s attention calls for the rest of this forward. first: before the
        hooks already there (an observer that returns None, ahead of a pruned layer's own attention)."""
        hooks = self.hooks.setdefault(module, [])
        hooks.insert(0 if first else len(hooks), fn)


# The open context of each thread, in a plain threading.local: dynamo traces its reads on every
# supported torch (2.11's cannot trace ContextVar.get: a compiled patched model would break its graph
# at every routed attention layer) and guards them per thread. A forward runs without yielding, so
# a thread's contexts nest as its forwards do.
_THREAD = threading.local()


def current() -> Context | None:
    """The context of the patched forward running in this thread, or None."""
    return getattr(_THREAD, "ctx", None)


@contextlib.contextmanager
def forward_context() -> Iterator[Context]:
    """A fresh Context for the block (one forward); inside another patched forward (a patched model
    called by a patched model), that forward's, so the stages of both see each other's state."""
    outer = current()
    if outer is not None and outer.open:
        yield outer
        return
    ctx = _THREAD.ctx = Context()
    try:
        yield ctx
    finally:  # (a publication nobody claimed ends with its forward)
        _THREAD.ctx = outer


# Under torch.compile a publication goes through this slot, never the context (a compiled decode step
# of a static CompressedCache publishes in every layer: dynamo then records no context mutations). A
# compiled step runs in one thread, and each layer's attention claims right after its update.
_TRACED: list[Any] = [None]


def publish(layer: Any, keys: torch.Tensor) -> None:
    """A CompressedCache layer's `update` returned `keys`: the attention call that receives these very
    tensors is that layer's, and must let the layer attend (`claim`). Outside a patched forward (a
    model run with attn_implementation="vtattn" and a cache of its own) the thread keeps a context for
    the publications from then on."""
    if torch.compiler.is_compiling():
        _TRACED[0] = (layer, keys)
        return
    ctx = current()
    if ctx is None:
        ctx = _THREAD.ctx = Context(open=False)
    ctx.pending = (layer, keys)


def pending() -> Any:
    """The CompressedCache layer whose update no attention call has claimed yet, or None."""
    if torch.compiler.is_compiling():
        return None if _TRACED[0] is None else _TRACED[0][0]
    ctx = current()
    return None if ctx is None or ctx.pending is None else ctx.pending[0]


def claim(keys: torch.Tensor) -> Any:
    """The layer whose pending update returned `keys` (by identity: the keys this call attends over
    are exactly the cache's), taken off the context; None for any other keys."""
    if torch.compiler.is_compiling():
        last = _TRACED[0]
        if last is None or last[1] is not keys:
            return None
        _TRACED[0] = None
        return last[0]
    ctx = current()
    if ctx is None or ctx.pending is None or ctx.pending[1] is not keys:
        return None
    layer, ctx.pending = ctx.pending[0], None
    return layer


def static_room(cache: Any, prompt: int) -> int | None:
    """The new tokens a static cache (fixed capacity: generate's cache_implementation="static", a static
    CompressedCache) takes after a `prompt`-token prefill (the caller's tokens, `Call.given`: a
    StaticCache's capacity is in the caller's frame, not a shortened one's); None for a cache that
    grows. What a stage keeps for decode steps is sized by it at the prefill: a compiled step (a CUDA
    graph) then allocates nothing it keeps, whose memory a later replay would overwrite."""
    room = getattr(cache, "max_new_tokens", None)  # a static CompressedCache's (no layers, so not
    if room is not None:                           # is_compileable, before its prefill)
        return int(room)
    if cache is None or not getattr(cache, "is_compileable", False):
        return None
    limit = cache.get_max_length()
    return None if limit is None or limit < 0 else max(int(limit) - prompt, 0)


def static_width(prompt: int, room: int | None) -> int | None:
    """A static cache's capacity from `static_room(cache, prompt)` (None for a growing cache): the keys
    its decode steps attend over, as many after a prefill a stage shortened (their frame is the
    caller's)."""
    return None if room is None else prompt + room


def needs_grad(*tensors: torch.Tensor) -> bool:
    """Whether autograd records an op on these tensors: a stage then runs the differentiable
    reference of an op that has no gradient (index_attention, merge_tokens), and scores detach."""
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


# ---- routing ------------------------------------------------------------------------------------

class _Routed:
    """A routed module's config: its own config in every attribute (reads and writes), except the
    attention implementation, which names vtattn's. Shared by the patches that route the module."""

    def __init__(self, config: Any) -> None:
        self.__dict__.update(_vtattn_config=config, _vtattn_holders=1, _attn_implementation=NAME)

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_vtattn_"):  # not set yet (copy / pickle build the object without __init__)
            raise AttributeError(name)
        return getattr(self._vtattn_config, name)

    def __setattr__(self, name: str, value: Any) -> None:
        setattr(self._vtattn_config, name, value)


class Routes:
    """The attention modules one patch routed (`add`), unrouted by `remove`. A module routed by two
    patches (a model and its inner model) stays routed until both are off."""

    def __init__(self) -> None:
        self.modules: list[torch.nn.Module] = []

    def add(self, modules: Iterable[torch.nn.Module]) -> None:
        from .hf_attention import register_attention
        register_attention()
        for module in modules:
            if any(module is m for m in self.modules):
                continue
            config = module.config
            if isinstance(config, _Routed):
                config.__dict__["_vtattn_holders"] += 1
            else:
                module.config = _Routed(config)  # type: ignore[assignment]  # stubs: a Tensor or Module
            self.modules.append(module)

    def remove(self) -> None:
        for module in reversed(self.modules):
            config = module.config
            if isinstance(config, _Routed):
                config.__dict__["_vtattn_holders"] -= 1
                if config._vtattn_holders == 0:
                    module.config = config._vtattn_config
        self.modules = []


def routed(module: torch.nn.Module) -> bool:
    """Whether a patch routes `module` to vtattn's attention."""
    return isinstance(getattr(module, "config", None), _Routed)


def native(module: torch.nn.Module) -> Callable[..., Any] | None:
    """The attention function a routed module runs unrouted (its own config's implementation, its
    modeling file's eager one for "eager"); None for a module that is not routed or whose own
    implementation is vtattn's."""
    config = getattr(module, "config", None)
    if not isinstance(config, _Routed) or config._vtattn_config._attn_implementation in (NAME, None):
        return None
    from transformers import AttentionInterface
    impl, interface = config._vtattn_config._attn_implementation, AttentionInterface()
    return interface[impl] if impl in interface else getattr(sys.modules[type(module).__module__],
                                                               "eager_attention_forward", None)


# ---- stages and patches -------------------------------------------------------------------------

class Call:
    """One forward as the stages see it. input_ids: the language model input's token ids (None when
    embeddings are given); images: [B, N] bool, its image (and video) tokens (None without input_ids
    or image token ids); kwargs: the forward's other arguments; cache_name: the name the forward takes
    its cache by (for a cache a stage adds). find: computes images from input_ids on first read
    instead (a decode step's stages usually read none: ~35 us a step saved on CPU); given: the
    tokens the caller gave (a stage that shortens the sequence leaves it)."""
    __slots__ = ("input_ids", "_images", "_find", "kwargs", "cache_name", "given")

    def __init__(self, input_ids: torch.Tensor | None, images: torch.Tensor | None, kwargs: dict[str, Any],
                 cache_name: str, find: Callable[[], torch.Tensor | None] | None = None) -> None:
        self.input_ids, self._images, self._find, self.kwargs, self.cache_name = (input_ids, images, find, kwargs,
                                                                                   cache_name)
        tokens = input_ids if input_ids is not None else kwargs.get("inputs_embeds")
        self.given = tokens.shape[1] if isinstance(tokens, torch.Tensor) and tokens.dim() >= 2 else 0

    @property
    def images(self) -> torch.Tensor | None:
        if self._find is not None:
            self._images, self._find = self._find(), None
        return self._images

    @images.setter
    def images(self, images: torch.Tensor | None) -> None:
        self._images, self._find = images, None

    def cache(self) -> tuple[str | None, Any]:
        """(name, cache) of the cache in kwargs, (None, None) without one."""
        return cache_arg(self.kwargs)

    def new_tokens(self) -> int:
        """Tokens this forward adds to the sequence."""
        return (self.input_ids if self.input_ids is not None else self.kwargs["inputs_embeds"]).shape[1]


class Installed:
    """A stage on one model. `phase` places it in the forward (INPUT, CACHE, LAYERS); `forward(call,
    proceed)` runs one forward (`proceed(call)` runs the later stages and the unpatched forward);
    `uninstall()` undoes what the stage's install did besides routing (the patch unroutes)."""
    phase = LAYERS
    options: Stage  # the stage it installs

    @property
    def kept(self) -> torch.Tensor | None:
        """Stages that drop tokens inside the LLM: the input tokens [B, N] the last prefill kept."""
        return None

    def forward(self, call: Call, proceed: Callable[[Call], Any]) -> Any:
        return proceed(call)

    def uninstall(self) -> None:
        """Undo the install (hooks, overrides); routes are the patch's to undo."""


class Stage:
    """A method a patch composes (VisionSelect, FastV, KVCompress). A stage object holds options only
    and may be given to several models; `install(patch)` puts it on one patched model (checking it
    against the model first, routing the attention modules it needs with `patch.route`) and returns
    what runs there: one Installed, or one per phase it acts in (AIM: a merge at the input, cuts in
    the layers); a part installed before a later one refuses is the stage's to uninstall."""

    def install(self, patch: Patch) -> Installed | Sequence[Installed]:
        raise NotImplementedError


class Patch:
    """A patch on one model (`model._vtattn_patch`). family: the adapter's ("llava", "qwen2_vl", "llm",
    "tower"); image_ids: the token ids of image and video tokens ([] for none); first: the name the
    forward's first positional argument stands for; stages: the installed stages in phase order."""

    def __init__(self, model: torch.nn.Module, family: str, image_ids: Sequence[int] = (),
                 first: str = "input_ids") -> None:
        self.model, self.family, self.image_ids, self.first = model, family, list(image_ids), first
        self.stages: list[Installed] = []
        self.routes = Routes()
        self.hidden: list[str] = []
        self.original = model.forward  # the unpatched forward, bound
        self.previous = model.__dict__.get("forward")  # an instance-level forward it replaced (accelerate's)
        self.cache_name = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"

    def route(self, modules: Iterable[torch.nn.Module]) -> None:
        """Send these attention modules to vtattn's attention while the patch is on."""
        self.routes.add(modules)

    def hide(self, name: str) -> None:
        """Leave `name` out of the patched forward's visible signature. generate (transformers >= 5.23)
        encodes the images itself, unpruned, before the prefill when forward declares
        `mm_encoder_outputs`; without it generate hands pixel_values to the prefill forward."""
        self.hidden.append(name)

    @property
    def kept(self) -> torch.Tensor | None:
        """[B, N] bool: the language model input tokens the last prefill kept inside the LLM (FastV,
        Qwen2-VL's VisionSelect), None without such a stage."""
        return next((s.kept for s in self.stages if s.kept is not None), None)

    def images(self, input_ids: torch.Tensor | None) -> torch.Tensor | None:
        if input_ids is None or not self.image_ids:
            return None
        return (input_ids[..., None] == input_ids.new_tensor(self.image_ids)).any(-1)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if len(args) > 1 or (args and self.first in kwargs):
            raise TypeError(f"the patched forward takes one positional argument ({self.first}), then keywords")
        if args:
            kwargs[self.first] = args[0]
        input_ids = kwargs.pop("input_ids", None)
        with forward_context():
            return self._proceed(0, Call(input_ids, None, kwargs, self.cache_name,
                                         functools.partial(self.images, input_ids)))

    def _proceed(self, index: int, call: Call) -> Any:
        if index == len(self.stages):
            return self.original(call.input_ids, **call.kwargs)
        return self.stages[index].forward(call, functools.partial(self._proceed, index + 1))

    def uninstall(self) -> None:
        for stage in reversed(self.stages):
            stage.uninstall()
        self.stages = []
        self.routes.remove()


def install(model: torch.nn.Module, stages: Sequence[Stage], *, family: str, image_ids: Sequence[int] = (),
            first: str = "input_ids", hide: Sequence[str] = ()) -> torch.nn.Module:
    """Put `stages` on `model` (a previous patch comes off first) and return it: `model(...)` (and so
    `generate`) runs them; the class's forward stays untouched. hide: forward parameters to leave out
    of its visible signature (`Patch.hide`). A stage that refuses the model leaves it unpatched."""
    unpatch(model)
    patch = Patch(model, family, image_ids, first)
    for name in hide:
        patch.hide(name)
    try:
        for stage in stages:
            parts = stage.install(patch)
            patch.stages.extend([parts] if isinstance(parts, Installed) else parts)
    except BaseException:
        patch.uninstall()
        raise
    patch.stages.sort(key=lambda s: s.phase)
    for i, part in enumerate(patch.stages):  # (see Filled: keys a new patch of these stages shares)
        for attr, value in getattr(part, "__dict__", {}).items():
            if isinstance(value, Filled):
                value.key = f"{i}:{type(part).__qualname__}.{attr}"

    def forward(*args: Any, **kwargs: Any) -> Any:
        return patch(*args, **kwargs)

    # functools.wraps keeps the original signature visible to transformers' introspection (generate
    # only builds position_ids for a forward that declares them).
    model.forward = functools.wraps(model.forward)(forward)
    if patch.hidden:
        signature = inspect.signature(model.forward)
        model.forward.__signature__ = signature.replace(  # type: ignore[attr-defined]
            parameters=[p for p in signature.parameters.values() if p.name not in patch.hidden])
    setattr(model, _ATTR, patch)
    return model


def unpatch(module: torch.nn.Module) -> torch.nn.Module:
    """Restore a model (or tower) patched by vtattn.patch; a no-op on an unpatched one."""
    patch = module.__dict__.pop(_ATTR, None)
    if patch is None:
        return module
    patch.uninstall()
    if patch.previous is None:
        del module.forward
    else:
        module.forward = patch.previous
    return module


# ---- helpers the stages share -------------------------------------------------------------------

def cache_arg(kwargs: dict[str, Any]) -> tuple[str | None, Any]:
    """(name, cache) of the cache in a forward's keyword arguments, (None, None) without one."""
    for name in CACHE_NAMES:
        if kwargs.get(name) is not None:
            return name, kwargs[name]
    return None, None


def output_cache(out: Any) -> Any:
    """The cache a forward returned (None for none or a tuple output)."""
    if not isinstance(out, dict):  # ModelOutput is a dict of its non-None fields
        return None
    return out["cache"] if "cache" in out else out.get("past_key_values")  # the old name warns on 5.25


if TYPE_CHECKING:
    class Decoder(torch.nn.Module):
        """A transformers decoder as the stages read it (for mypy only): its config and its layers (an
        nn.ModuleList of decoder layers, each with `self_attn`). transformers is not followed: both Any."""
        config: Any
        layers: Any


def language_model(model: torch.nn.Module) -> Decoder:
    """The decoder (with `layers` and `config`) of a transformers causal LM or VLM."""
    found: Any = model  # a transformers model: get_decoder is its own (Module's stubs: Tensor | Module)
    decoder: Decoder | None = found.get_decoder() if hasattr(model, "get_decoder") else None
    if decoder is None or not hasattr(decoder, "config") or not hasattr(decoder, "layers"):
        raise TypeError(f"vtattn.patch needs a transformers model with a decoder (get_decoder() with "
                        f"layers), got {type(model).__name__}")
    return decoder


# generate's masks for a static cache (cache_implementation="static"): a 4-D mask in the full
# sequence's frame ([B, 1, q, capacity]; bool: True attends, float: 0 attends; a dict per layer type
# for some configs). Stages that shorten the sequence read the padding back from it.

def full_attention_mask(mask: Any) -> Any:
    """The full-attention mask of generate's per-layer-type dict, else the mask itself."""
    return mask.get("full_attention") if isinstance(mask, dict) else mask


def is_static_mask(mask: Any) -> bool:
    mask = full_attention_mask(mask)
    return isinstance(mask, torch.Tensor) and mask.dim() == 4


def prompt_padding(mask: Any, length: int) -> torch.Tensor:
    """The 2-D padding mask [B, length] (long) of a prompt's 4-D mask: what its last query row sees
    among the first `length` columns (a left-padded prompt's last token is real and causal)."""
    row: torch.Tensor = full_attention_mask(mask)[:, 0, -1, :length]
    return (row if row.dtype == torch.bool else row == 0).long()


_OPS: dict[str, Any] = {}


def op(name: str) -> Any:
    """The stages' handle on the registered op `torch.ops.vtattn.<name>` (`_dispatch.Direct`): their
    arguments are valid by construction, so the public function's checks (host reads) are skipped."""
    if name not in _OPS:
        from .._dispatch import Direct
        _OPS[name] = Direct(name)
    return _OPS[name]


def select(scores: torch.Tensor, budgets: torch.Tensor, segments: Sequence[int] | None = None) -> Any:
    """`vtattn.select_tokens(scores, keep_tokens=budgets, segments=segments)` for valid budgets:
    int64 [B, S] (or [B]) counts, each in [1, its segment's length], on the host or scores' device
    (the output width is read from them: on the host, no sync). Returns a `vtattn.Selection`."""
    from ..ops.select_tokens import Selection, _Uniform
    B, N = scores.shape
    segments = [N] if segments is None else [int(n) for n in segments]
    budgets = budgets.to(torch.int64).reshape(B, len(segments))
    counts = budgets.sum(1).tolist() if B else [0]
    indices, mask, total = op("select_tokens")(scores, budgets.to(scores.device), segments, max(counts), True)
    cu = torch.nn.functional.pad(total.cumsum(0, dtype=torch.int32), (1, 0))
    return (_Uniform if min(counts) == max(counts) else Selection)(indices, mask, total, cu)


def require_image_ids(patch: Patch, stage: str) -> None:
    """Refuse a stage that finds the image tokens by id on a patch that knows none."""
    if not patch.image_ids:
        raise ValueError(f"{stage} needs the image token ids: pass image_token_id= "
                         f"({type(patch.model).__name__}'s config names none)")


def check_full_attention(config: Any) -> None:
    """Refuse a language model with sliding-window (or other non-full) attention layers: FastV's and
    the compressed cache's attention read every kept key."""
    window = getattr(config, "sliding_window", None)
    types = getattr(config, "layer_types", None)
    other = sorted({t for t in types or () if t != "full_attention"})
    if other or (window and types is None):
        raise NotImplementedError("FastV and KV compression need full attention in the language model; its config "
                                  "has " + (f"layer_types {other}" if other else f"sliding_window={window}"))
