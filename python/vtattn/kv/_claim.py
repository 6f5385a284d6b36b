"""The hand-off from a CompressedCache layer's `update` to vtattn's attention function (kept free
of transformers, which `vtattn.patch.hf_attention` must not import eagerly)."""
import contextvars
import threading

import torch

# (layer, keys) of the latest `update`: the attention function claims the layer by identity.
LAST = contextvars.ContextVar("vtattn_kv_last", default=None)
# How many contexts hold an unclaimed update (an upper bound: a thread that ends with one keeps it
# counted). Under torch.compile a zero skips reading LAST, which torch 2.11's dynamo cannot trace.
_pending = [0]
_lock = threading.Lock()


def publish(layer, keys):
    """A layer's update returned `keys`: the attention call that receives them claims `layer`."""
    if LAST.get() is None and not torch.compiler.is_compiling():
        with _lock:
            _pending[0] += 1
    LAST.set((layer, keys))


def claim(key):
    """The CompressedLayer whose latest update returned `key`, else None."""
    if torch.compiler.is_compiling() and not _pending[0]:
        return None
    last = LAST.get()
    if last is None or last[1] is not key:
        return None
    LAST.set(None)
    if not torch.compiler.is_compiling():
        with _lock:
            _pending[0] = max(_pending[0] - 1, 0)
    return last[0]
