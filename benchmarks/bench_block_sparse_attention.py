import pytest

from vtattn.bench.cases import impl_ids

IDS = impl_ids("block_sparse_attention")


@pytest.mark.parametrize("case_name,impl_name", IDS, ids=[f"{c}-{i}" for c, i in IDS])
def test_block_sparse_attention(run_bench, case_name, impl_name):
    run_bench("block_sparse_attention", case_name, impl_name)
