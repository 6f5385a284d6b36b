import pytest
import torch


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
