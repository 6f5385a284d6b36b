"""The hand-off from a CompressedCache layer's `update` to vtattn's attention function (kept free
of transformers, which `vtattn.patch.hf_attention` must not import eagerly)."""
import contextvars

# (layer, keys) of the latest `update`: the attention function claims the layer by identity.
LAST = contextvars.ContextVar("vtattn_kv_last", default=None)


def claim(key):
    """The CompressedLayer whose latest update returned `key`, else None."""
    last = LAST.get()
    if last is None or last[1] is not key:
        return None
    LAST.set(None)
    return last[0]
