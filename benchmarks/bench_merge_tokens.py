"""merge_tokens: pruned tokens folded into their most similar kept token."""
import pytest

from vtattn.bench.cases import impl_ids

IDS = impl_ids("merge_tokens")


@pytest.mark.parametrize("case_name,impl_name", IDS, ids=[f"{c}-{i}" for c, i in IDS])
def test_merge_tokens(run_bench, case_name, impl_name):
    run_bench("merge_tokens", case_name, impl_name)
