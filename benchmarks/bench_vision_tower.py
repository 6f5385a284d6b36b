"""Vision towers with token selection (vtattn.patch.vision_tower; tiny random-weight towers on CPU).
The LLaVA end-to-end scenarios: bench_e2e.py."""
import pytest

from vtattn.bench.cases import impl_ids

IDS = impl_ids("vision_tower")


@pytest.mark.parametrize("case_name,impl_name", IDS, ids=[f"{c}-{i}" for c, i in IDS])
def test_vision_tower(run_bench, case_name, impl_name):
    run_bench("vision_tower", case_name, impl_name)
