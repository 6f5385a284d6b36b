"""The bad-input suite of tests/test_bad_input.py with the Triton backend forced, under TRITON_INTERPRET=1:
the same tables (errors naming the argument, odd but valid inputs equal to the reference, the NaN rules of
docs/internals.md), the caller's tensors never modified."""
import pytest

import test_bad_input as bad
from vtattn import _registry

# NaN inputs are the point here: the interpreter's numpy says so for every one.
pytestmark = pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")


def _triton_ops(table):
    return [name for name in table if "triton" in _registry.OPS[bad.op_of(name)]]


@pytest.mark.parametrize("name", _triton_ops(bad.ERRORS))
def test_bad_input_raises_naming_the_argument(name):
    bad.test_bad_input_raises_naming_the_argument(name, "triton")


@pytest.mark.parametrize("name", _triton_ops(bad.RESULTS))
def test_odd_valid_input_equals_the_reference(name):
    bad.test_odd_valid_input_equals_the_reference(name, "cpu", "triton")


NAN_TESTS = [bad.test_attention_nan_reaches_only_the_rows_that_read_it,
             bad.test_key_importance_nan_reaches_only_the_heads_of_selected_rows,
             bad.test_decode_attention_reads_nothing_past_the_lengths,
             bad.test_paged_decode_attention_reads_only_used_pages_up_to_the_lengths,
             bad.test_index_attention_reads_only_listed_keys,
             bad.test_block_sparse_attention_reads_only_listed_blocks,
             bad.test_varlen_attention_nan_stays_in_its_sequence,
             bad.test_gather_tokens_nan_travels_with_its_row]


@pytest.mark.parametrize("test", NAN_TESTS, ids=lambda t: t.__name__[5:])
def test_nan_rules(test):
    test("cpu", "triton")


@pytest.mark.parametrize("mode", ["mean", "weighted"])
def test_merge_tokens_nan_reaches_only_its_slot(mode):
    bad.test_merge_tokens_nan_reaches_only_its_slot("cpu", "triton", mode)
