import pytest

from vtattn.bench.cases import impl_ids

IDS = impl_ids("cmai_step")


@pytest.mark.parametrize("case_name,impl_name", IDS, ids=[f"{c}-{i}" for c, i in IDS])
def test_cmai_step(run_bench, case_name, impl_name):
    run_bench("cmai_step", case_name, impl_name)
