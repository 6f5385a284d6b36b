"""select_tokens, then gather_tokens of what it kept (the select_tokens cases time both)."""
import pytest

from vtattn.bench.cases import impl_ids

IDS = impl_ids("select_tokens")


@pytest.mark.parametrize("case_name,impl_name", IDS, ids=[f"{c}-{i}" for c, i in IDS])
def test_select_tokens(run_bench, case_name, impl_name):
    run_bench("select_tokens", case_name, impl_name)
