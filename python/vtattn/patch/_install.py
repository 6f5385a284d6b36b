"""Installing a patch as an instance-level `forward` and taking it off again exactly, and reading
the cache a forward is given or returns under either of its transformers names."""
import functools
import inspect

_ATTR = "_vtattn_patch"
# transformers 5.25 renamed forward's `past_key_values` (and its outputs' field) to `cache`; the old
# name is still accepted there, deprecated. A caller may use either.
CACHE_NAMES = ("cache", "past_key_values")


def cache_arg(kwargs):
    """(name, cache) of the cache in a forward's keyword arguments, (None, None) without one."""
    for name in CACHE_NAMES:
        if kwargs.get(name) is not None:
            return name, kwargs[name]
    return None, None


def output_cache(out):
    """The cache a forward returned (None for none or a tuple output)."""
    if not isinstance(out, dict):  # ModelOutput is a dict of its non-None fields
        return None
    return out["cache"] if "cache" in out else out.get("past_key_values")  # the old name warns on 5.25


class State:
    """Per-model patch state: `original` is the forward the patch wraps (bound, unpatched),
    `previous` the instance-level forward it replaced, if any, and `cache_name` the name that
    forward takes its cache by."""
    original = previous = None
    cache_name = "past_key_values"

    def uninstall(self):
        """Undo what the patch set up besides `forward` (hooks, attention implementations)."""


def install(module, forward, state):
    """Make `module(...)` (and so `generate`) call `forward`; the class's forward stays untouched.
    functools.wraps keeps the original signature visible to transformers' introspection (generate
    only builds position_ids for a forward that declares them)."""
    unpatch(module)
    state.previous = module.__dict__.get("forward")  # e.g. an accelerate hook's own wrapper
    state.original = module.forward
    if "cache" in inspect.signature(module.forward).parameters:
        state.cache_name = "cache"
    module.forward = functools.wraps(module.forward)(forward)
    setattr(module, _ATTR, state)
    return module


def hide_parameter(module, name):
    """Leave `name` out of the patched forward's visible signature. generate (transformers >= 5.23)
    encodes the images itself, unpruned, before the prefill when forward declares
    `mm_encoder_outputs`; without it generate hands pixel_values to the prefill forward (as 5.17
    always does), where the vision-side pruning happens."""
    signature = inspect.signature(module.forward)
    module.forward.__signature__ = signature.replace(
        parameters=[p for p in signature.parameters.values() if p.name != name])


def unpatch(module):
    """Restore a model (or tower) patched by vtattn.patch; a no-op on an unpatched one."""
    state = module.__dict__.pop(_ATTR, None)
    if state is None:
        return module
    state.uninstall()
    if state.previous is None:
        del module.forward
    else:
        module.forward = state.previous
    return module
