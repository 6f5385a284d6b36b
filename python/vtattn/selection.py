"""Deprecated: `vtattn.selection` is now `vtattn.pruning` (a name `vtattn.Selection`, the result of
`vtattn.select_tokens`, cannot be confused with). This alias makes `import vtattn.selection` give that module."""
import sys
import warnings

from . import pruning

warnings.warn("vtattn.selection is renamed vtattn.pruning; the old name will be removed", DeprecationWarning,
              stacklevel=2)
sys.modules[__name__] = pruning
