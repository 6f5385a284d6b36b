"""Backend order per device: fastest first, the pure-PyTorch reference ("torch") always last.
Rewritten by `python -m vtattn.bench --emit-dispatch` (vtattn/_dispatch_emit.py) from a benchmark
run: edit by re-running it, not by hand. Keys: "cpu", "cuda" (any GPU without its own entry), or a
CUDA architecture ("sm_90"); each maps op -> order, "*" being every op without its own row. An
architecture's row falls back to "cuda"'s; backends an op lacks are skipped."""

ORDER: dict[str, dict[str, tuple[str, ...]]] = {
    "cpu": {"*": ("cpp", "torch"), "attention": ("aten", "cpp", "torch")},
    "cuda": {"*": ("aten", "cuda", "triton", "torch")},
}

# Where each architecture's rows came from: {"sm_90": {"device": ..., "commit": ..., "date": ..., "cases": ...}}.
SOURCE: dict[str, dict[str, object]] = {}
