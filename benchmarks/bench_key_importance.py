import pytest

from vtattn.bench.cases import impl_ids

IDS = impl_ids("key_importance")


@pytest.mark.parametrize("case_name,impl_name", IDS, ids=[f"{c}-{i}" for c, i in IDS])
def test_key_importance(run_bench, case_name, impl_name):
    run_bench("key_importance", case_name, impl_name)
