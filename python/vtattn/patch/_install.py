"""Installing a patch as an instance-level `forward` and taking it off again exactly."""
import functools

_ATTR = "_vtattn_patch"


class State:
    """Per-model patch state: `original` is the forward the patch wraps (bound, unpatched) and
    `previous` the instance-level forward it replaced, if any."""
    original = previous = None

    def uninstall(self):
        """Undo what the patch set up besides `forward` (hooks, attention implementations)."""


def install(module, forward, state):
    """Make `module(...)` (and so `generate`) call `forward`; the class's forward stays untouched.
    functools.wraps keeps the original signature visible to transformers' introspection (generate
    only builds position_ids for a forward that declares them)."""
    unpatch(module)
    state.previous = module.__dict__.get("forward")  # e.g. an accelerate hook's own wrapper
    state.original = module.forward
    module.forward = functools.wraps(module.forward)(forward)
    setattr(module, _ATTR, state)
    return module


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
