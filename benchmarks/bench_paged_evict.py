import pytest

from vtattn.bench.cases import impl_ids

IDS = impl_ids("paged_evict")


@pytest.mark.parametrize("case_name,impl_name", IDS, ids=[f"{c}-{i}" for c, i in IDS])
def test_paged_evict(run_bench, case_name, impl_name):
    run_bench("paged_evict", case_name, impl_name)
