"""pytest-benchmark over the cases of `python -m vtattn.bench` (vtattn.bench.cases).

Real shapes on a GPU; tiny ones on CPU, where this is CI's smoke test
(`pytest benchmarks --benchmark-disable`). Nothing touches CUDA at collection."""
import fnmatch
from itertools import cycle

import pytest
import torch

def pytest_collect_file(file_path, parent):
    """Collect bench_*.py as test modules, unless pytest already does: files named on the
    command line, or matched by the ini's python_files."""
    if file_path.suffix != ".py" or not file_path.name.startswith("bench_") or parent.session.isinitpath(file_path):
        return None
    if any(fnmatch.fnmatch(file_path.name, p) for p in parent.config.getini("python_files")):
        return None
    return pytest.Module.from_parent(parent, path=file_path)


@pytest.fixture
def run_bench(benchmark):
    """run_bench(op, case_name, impl_name): time one implementation with device sync,
    the L2 flushed and the next input copy picked in pedantic's (untimed) setup."""
    import vtattn
    from vtattn.bench.cases import ALL_BACKENDS, DTYPE_NAMES, Skip, build_cases, input_bytes, n_copies
    from vtattn.bench.timing import cpu_threads, flush_l2

    def run(op, case_name, impl_name):
        cuda = torch.cuda.is_available()
        device = torch.device("cuda" if cuda else "cpu")
        dtype = torch.bfloat16 if cuda else torch.float32
        case = next(c for c in build_cases(device, backends=ALL_BACKENDS, level="full" if cuda else "tiny", ops=[op])
                    if c.name == case_name)
        impl = next(i for i in case.impls if i.name == impl_name)
        first = case.make_inputs(device, dtype, 0)
        copies = [first] + [case.make_inputs(device, dtype, s) for s in range(1, n_copies(device, input_bytes(first)))]
        sync = torch.cuda.synchronize if cuda else (lambda: None)
        # Model-level rows (their own timer) take up to seconds a call; the probe warms them up.
        rounds, warmup = (3, 0) if impl.timer is not None else (50, 5) if cuda else (5, 1)
        try:
            # inference is what is timed (the models' weights require grad); CPU: one thread, as the runner
            with torch.no_grad(), cpu_threads(device), impl.ctx():
                try:
                    xs = cycle([impl.prep(x) if impl.prep else x for x in copies])
                    impl.call(next(xs))  # refusals, compilation and autotuning: untimed
                except vtattn.BackendUnavailable as e:
                    pytest.skip(str(e))
                except RuntimeError as e:
                    if impl.role == "vtattn":
                        raise
                    pytest.skip(f"baseline cannot run here: {str(e).splitlines()[0]}")

                def setup():
                    flush_l2(device)
                    sync()
                    return (next(xs),), {}

                def target(x):
                    impl.call(x)
                    sync()

                benchmark.group = f"{op}/{case_name}"
                benchmark.extra_info.update(shape=case.shape, dtype=DTYPE_NAMES[dtype], device=str(device),
                                            flops=case.flops, role=impl.role,
                                            bytes=case.bytes_fn(dtype.itemsize) if case.bytes_fn else None)
                benchmark.pedantic(target, setup=setup, rounds=rounds, warmup_rounds=warmup)
        except Skip as e:  # a variant this vtattn does not have yet
            pytest.skip(str(e))

    return run
