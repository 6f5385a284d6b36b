"""LLaVA end-to-end scenarios (vtattn.bench.scenarios_llm): time to first token and generate, per
variant (unpatched, keep ratios, FastV, LOOK-M budgets); tiny random-weight models on CPU. A
decode row here times the whole generate call (`python -m vtattn.bench` times its decode steps)."""
import pytest

from vtattn.bench.cases import impl_ids

IDS = impl_ids("e2e")


@pytest.mark.parametrize("case_name,impl_name", IDS, ids=[f"{c}-{i}" for c, i in IDS])
def test_e2e(run_bench, case_name, impl_name):
    run_bench("e2e", case_name, impl_name)
