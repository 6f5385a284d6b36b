import torch

from . import _checks
from .select_tokens import Selection


def merge_tokens(x: torch.Tensor, selection: Selection, *, keys: torch.Tensor, mode: str = "mean") -> torch.Tensor:
    """The kept tokens of x [B, N, C], each with the pruned tokens most similar to it folded in.

    Every pruned token (selection.mask False) joins the kept token whose key has the highest
    cosine similarity with its own (keys [B, N, Ck]; ties to the lower kept index), VisionZip /
    PruMerge style, without an [N, K] similarity tensor. mode "mean": out_c = (x_c + sum x_i) /
    (1 + n_c); "weighted": out_c = (x_c + sum w_i x_i) / (1 + sum w_i), w_i = max(cos_i, 0).
    Returns [B, K] rows like `gather_tokens` (zero past counts[b]), in x's dtype (fp32 sums). The
    selection's values are checked eagerly (one host sync; skipped under torch.compile and on meta).
    NaN / inf in a token reaches only the slot it joins; a NaN similarity never wins the argmax (a
    token whose similarities are all NaN joins the lowest kept index, weight NaN when weighted).
    """
    if _checks.checking():
        float_dtypes = _checks.FLOAT_DTYPES + (torch.float64,)
        _checks.tensor("x", x, 3, float_dtypes)
        _checks.tensor("keys", keys, 3, float_dtypes)
        _checks.same_device({"x": x, "keys": keys})
        if keys.shape[:2] != x.shape[:2]:
            raise ValueError(f"keys must be [B, N, Ck] with x's B, N = {tuple(x.shape[:2])}, got {tuple(keys.shape)}")
        if mode not in ("mean", "weighted"):
            raise ValueError(f"mode must be 'mean' or 'weighted', got {mode!r}")
        _checks.selection(selection, x, "x")
    return torch.ops.vtattn.merge_tokens(x, keys, selection.indices, selection.mask, mode == "weighted")
