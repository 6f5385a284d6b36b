import pytest

from vtattn.bench.cases import impl_ids

IDS = impl_ids("decode_attention")
PAGED_IDS = impl_ids("paged_decode_attention")


@pytest.mark.parametrize("case_name,impl_name", IDS, ids=[f"{c}-{i}" for c, i in IDS])
def test_decode_attention(run_bench, case_name, impl_name):
    run_bench("decode_attention", case_name, impl_name)


@pytest.mark.parametrize("case_name,impl_name", PAGED_IDS, ids=[f"{c}-{i}" for c, i in PAGED_IDS])
def test_paged_decode_attention(run_bench, case_name, impl_name):
    run_bench("paged_decode_attention", case_name, impl_name)
