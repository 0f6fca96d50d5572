"""The shared column arithmetic: the digits written under the columns spell the true result."""

import pytest
from hypothesis import given
from hypothesis import strategies as st

from workbench.data.arith import add_columns, digits, sub_columns
from workbench.data.corpus.arithmetic import _addition_steps, _subtraction_steps
from workbench.tasks import addition_steps, subtraction_steps


def spelled(columns, final_carry=0):
    return int("".join(str(c.digit) for c in reversed(columns))) + final_carry * 10 ** len(columns)


@given(st.integers(0, 10**9), st.integers(0, 10**9))
def test_columns_spell_the_result(a, b):
    cols = add_columns(a, b)
    assert spelled(cols, cols[-1].carry_out) == a + b
    hi, lo = max(a, b), min(a, b)
    cols = sub_columns(hi, lo)
    assert spelled(cols) == hi - lo and cols[-1].carry_out == 0
    for prev, nxt in zip(cols, cols[1:]):
        assert nxt.carry_in == prev.carry_out


def test_both_writers_use_the_same_carries():
    assert addition_steps(47, 38) == "7 + 8 = 15, carry 1. 4 + 3 + 1 = 8."
    assert _addition_steps(47, 38) == ["  ones: 7 + 8 = 15, write 5, carry 1", "  tens: 4 + 3 + 1 = 8, write 8"]
    assert subtraction_steps(43, 28) == "3 - 8 < 0, 13 - 8 = 5, borrow 1. 4 - 1 - 2 = 1."
    assert _subtraction_steps(43, 28)[0] == "  ones: 3 - 8 is negative, borrow 10: 13 - 8 = 5"


def test_bad_operands_are_refused():
    with pytest.raises(ValueError, match="a >= b"):
        sub_columns(3, 5)
    with pytest.raises(ValueError, match=">= 0"):
        digits(-1)
