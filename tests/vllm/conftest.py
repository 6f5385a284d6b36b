"""The vLLM suite: runs in the vLLM environment (`bash scripts/vllm_env.sh`; scripts/test.sh runs
it there); collected elsewhere, it is skipped whole. vLLM runs in-process, one engine at a time."""
import gc
import importlib.util
import os

import pytest

_spec = importlib.util.find_spec("vllm")
if _spec is None or _spec.origin is None:  # not installed (tests/ on sys.path makes this folder a namespace "vllm")
    collect_ignore_glob = ["test_*.py"]
else:
    # in-process engine (a spawned engine core costs ~35 s more per LLM); quiet logs
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")


def pytest_runtest_setup(item):
    if item.get_closest_marker("gpu"):
        import torch
        if not torch.cuda.is_available():
            pytest.skip("needs a CUDA device")


@pytest.fixture(scope="session")
def engines():
    """start(path, **LLM options) -> a vLLM LLM (fp32, eager, small KV cache); the previous one is
    shut down first: in-process engines share the process's distributed state."""
    from vllm import LLM
    from vllm.distributed.parallel_state import cleanup_dist_env_and_memory
    held = []

    def close():
        while held:
            llm = held.pop()
            llm.llm_engine.engine_core.shutdown()
            del llm
            gc.collect()
            cleanup_dist_env_and_memory()

    def start(path, **options):
        close()
        options = dict(dict(dtype="float32", enforce_eager=True, max_model_len=1024, max_num_seqs=8,
                            gpu_memory_utilization=0.05, kv_cache_memory_bytes=64 << 20, seed=0), **options)
        held.append(LLM(model=str(path), **options))
        return held[-1]

    start.close = close  # for a test that starts its own engine
    yield start
    close()
