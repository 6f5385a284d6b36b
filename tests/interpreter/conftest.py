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
