"""Column arithmetic, computed once: the columns of an addition or a subtraction, ones first.

The generated corpus (``data.corpus.arithmetic``) and the arithmetic tasks (``tasks.integers``) both
write sums out column by column, each in its own words; this module does the arithmetic they share,
so the two can never disagree about a carry or a borrow.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Column:
    """One column of a written sum: digits ``x`` (top) and ``y`` (bottom), what the column before
    carried or borrowed into it (0 or 1), the column's value and what it passes on to the next."""

    x: int
    y: int
    carry_in: int  # addition: the carry into this column; subtraction: the borrow from it
    value: int  # addition: x + y + carry_in; subtraction: x - carry_in - y, plus 10 when it borrows
    carry_out: int  # 1 when this column carries into (addition) or borrows from (subtraction) the next

    @property
    def digit(self) -> int:
        """The digit written under this column."""
        return self.value % 10


def digits(n: int) -> list[int]:
    """Decimal digits of n >= 0, least significant first: 472 -> [2, 7, 4]."""
    if n < 0:
        raise ValueError(f"digits() takes a number >= 0, got {n}")
    return [int(c) for c in reversed(str(n))]


def add_columns(a: int, b: int) -> list[Column]:
    """The columns of a + b (a, b >= 0), ones first; the last column's carry_out is the final carry."""
    da, db = digits(a), digits(b)
    columns, carry = [], 0
    for i in range(max(len(da), len(db))):
        x = da[i] if i < len(da) else 0
        y = db[i] if i < len(db) else 0
        s = x + y + carry
        columns.append(Column(x, y, carry, s, s // 10))
        carry = s // 10
    return columns


def sub_columns(a: int, b: int) -> list[Column]:
    """The columns of a - b (a >= b >= 0), ones first. A column whose x - borrow - y is negative borrows
    10 from the next one: its value is then 10 + x - borrow - y and its carry_out 1."""
    if a < b or b < 0:
        raise ValueError(f"sub_columns needs a >= b >= 0, got {a} - {b}")
    da, db = digits(a), digits(b)
    columns, borrow = [], 0
    for i in range(len(da)):
        x = da[i]
        y = db[i] if i < len(db) else 0
        value = x - borrow - y
        out = 1 if value < 0 else 0
        columns.append(Column(x, y, borrow, value + 10 * out, out))
        borrow = out
    return columns


__all__ = ["Column", "add_columns", "digits", "sub_columns"]
