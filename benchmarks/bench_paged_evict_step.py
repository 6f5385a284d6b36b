import pytest

from vtattn.bench.cases import impl_ids

IDS = impl_ids("paged_evict_step")


@pytest.mark.parametrize("case_name,impl_name", IDS, ids=[f"{c}-{i}" for c, i in IDS])
def test_paged_evict_step(run_bench, case_name, impl_name):
    run_bench("paged_evict_step", case_name, impl_name)
