"""Token selection: select_tokens + gather_tokens, merge_tokens and vision towers with selection
(tiny random-weight towers on CPU). The LLaVA end-to-end scenarios: bench_e2e.py."""
import pytest

from vtattn.bench.cases import impl_ids

IDS = [(op, c, i) for op in ("select_tokens", "merge_tokens", "vision_tower") for c, i in impl_ids(op)]


@pytest.mark.parametrize("op,case_name,impl_name", IDS, ids=[f"{op}-{c}-{i}" for op, c, i in IDS])
def test_select(run_bench, op, case_name, impl_name):
    run_bench(op, case_name, impl_name)
