import os

import pytest
import torch

# Autotuning compiles every config of a Triton kernel for each new shape: minutes of a GPU run.
# Tests launch the first config; test_triton_configs.py proves every config right.
os.environ.setdefault("VTATTN_TRITON_AUTOTUNE", "0")
# tests/interpreter sets TRITON_INTERPRET=1 for its whole process when collected: it runs alone
# (`TRITON_INTERPRET=1 pytest tests/interpreter`), else every Triton test of `pytest tests` (the
# GPU run too) would run under the interpreter instead of on the device.
if os.environ.get("TRITON_INTERPRET") != "1":
    collect_ignore = ["interpreter"]


def pytest_runtest_setup(item):
    # Checked when a test runs, never at collection: collecting touches no GPU.
    if item.get_closest_marker("gpu") and not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")


@pytest.fixture(autouse=True)
def _automatic_backend():
    """Every test starts with automatic backend choice, whatever the last one forced."""
    import vtattn
    with vtattn.use_backend(None):
        yield
