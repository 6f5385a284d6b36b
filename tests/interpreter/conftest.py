"""Triton kernels on CPU under the interpreter. This folder runs in its own pytest process
(`pytest tests/interpreter`): TRITON_INTERPRET must be set before anything imports triton."""
import os

os.environ["TRITON_INTERPRET"] = "1"

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

HERE = Path(__file__).resolve().parent


def pytest_collection_modifyitems(config, items):
    for item in items:
        if HERE in Path(str(item.path)).resolve().parents:
            item.add_marker(pytest.mark.interpreter)


def pytest_sessionstart(session):
    """One clear stop instead of every test failing where this triton's interpreter cannot run our
    kernels: triton 3.6's converts a loop bound computed in the kernel with int(), which numpy >= 2.3
    refuses for its 1-element arrays (the compiled GPU path is unaffected)."""
    import numpy
    import torch
    import triton
    import triton.language as tl

    @triton.jit
    def bound(out, n):
        total = 0
        for i in range(0, tl.minimum(n, 8), 4):
            total += i
        tl.store(out, total)

    out = torch.zeros(1, dtype=torch.int32)
    try:
        bound[(1,)](out, 9)
    except Exception as e:
        pytest.exit(f"triton {triton.__version__}'s interpreter cannot run loops with computed bounds under numpy "
                    f"{numpy.__version__} ({e}); use numpy<2.3 or a newer triton", returncode=3)
