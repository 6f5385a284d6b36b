import pytest

from vtattn.bench.cases import impl_ids

IDS = impl_ids("group_attention")


@pytest.mark.parametrize("case_name,impl_name", IDS, ids=[f"{c}-{i}" for c, i in IDS])
def test_group_attention(run_bench, case_name, impl_name):
    run_bench("group_attention", case_name, impl_name)
