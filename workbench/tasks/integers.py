"""Integer tasks: ``add``, ``sub``, ``borrow`` and ``arithmetic``, with column-by-column worked traces."""

from __future__ import annotations

import random
import re
from typing import Any

from workbench.data.arith import add_columns, sub_columns
from workbench.tasks.task import Example, _format_trace, chat_prompt

_INT = re.compile(r"[+-]?[0-9]{1,30}")  # 30 digits: far more than any answer, far below int()'s limit


def spell(n: int) -> str:
    """An integer digit by digit, one token per digit: 405 -> ``"4 0 5"``, -12 -> ``"-1 2"``."""
    return ("-" if n < 0 else "") + " ".join(str(abs(n)))


def parse_int(text: str) -> int | None:
    """An integer: optional sign and digits; whitespace around and *between* digits is ignored.

    So ``"85"``, ``" 8 5 "`` and ``"-1 2"`` parse (to 85, 85, -12); ``"8.5"``, ``"eighty"``, ``""``, a
    number of more than 30 digits do not (None).
    """
    if not isinstance(text, str):
        return None
    text = re.sub(r"\s+", "", text)
    return int(text) if _INT.fullmatch(text) else None


def addition_steps(a: int, b: int) -> str:
    """Column addition, ones first: ``7 + 8 = 15, carry 1. 4 + 3 + 1 = 8.`` (the last column in full)."""
    columns = add_columns(a, b)
    parts = []
    for i, col in enumerate(columns):
        expr = f"{col.x} + {col.y} + 1" if col.carry_in else f"{col.x} + {col.y}"
        carry = col.carry_out and i < len(columns) - 1  # the last column is written in full
        parts.append(f"{expr} = {col.value}" + (", carry 1." if carry else "."))
    return " ".join(parts)


def subtraction_steps(a: int, b: int) -> str:
    """Column subtraction of b from a >= b, ones first: ``3 - 8 < 0, 13 - 8 = 5, borrow 1. 4 - 1 - 2 = 1.``"""
    parts = []
    for col in sub_columns(a, b):
        expr = f"{col.x} - 1 - {col.y}" if col.carry_in else f"{col.x} - {col.y}"
        if not col.carry_out:
            parts.append(f"{expr} = {col.value}.")
        else:
            wide = f"1{col.x} - 1 - {col.y}" if col.carry_in else f"1{col.x} - {col.y}"
            parts.append(f"{expr} < 0, {wide} = {col.value}, borrow 1.")
    return " ".join(parts)


def make_add(rng: random.Random) -> Example:
    a, b = rng.randint(10, 99), rng.randint(10, 99)
    question = f"What is {spell(a)} + {spell(b)}?"
    return Example("add", f"{a}+{b}", question, spell(a + b), {"a": a, "b": b, "op": "+"})


def make_sub(rng: random.Random) -> Example:
    """Two-digit subtraction without borrowing: every digit of a is at least b's (``8 7 - 3 5``)."""
    b1, b0 = rng.randint(1, 9), rng.randint(0, 9)
    a1, a0 = rng.randint(b1, 9), rng.randint(b0, 9)
    a, b = 10 * a1 + a0, 10 * b1 + b0
    question = f"What is {spell(a)} - {spell(b)}?"
    return Example("sub", f"{a}-{b}", question, spell(a - b), {"a": a, "b": b, "op": "-"})


def make_borrow(rng: random.Random) -> Example:
    """Two-digit subtraction that always borrows in the ones column (a0 < b0, a1 > b1): ``5 2 - 2 7``.

    A new procedure for a model that adds: the ones column forms a number it never wrote (``12 - 7``) and
    the tens column must carry the borrow (``5 - 1 - 2``). 1620 distinct problems, about a fifth held out.
    """
    a1 = rng.randint(2, 9)
    b1 = rng.randint(1, a1 - 1)
    b0 = rng.randint(1, 9)
    a0 = rng.randint(0, b0 - 1)
    a, b = 10 * a1 + a0, 10 * b1 + b0
    question = f"What is {spell(a)} - {spell(b)}?"
    return Example("borrow", f"{a}-{b}", question, spell(a - b), {"a": a, "b": b, "op": "-"})


def make_arithmetic(rng: random.Random) -> Example:
    a = rng.randint(10, 999) if rng.random() < 0.5 else rng.randint(100, 999)
    b = rng.randint(10, 999) if rng.random() < 0.5 else rng.randint(10, 99)
    op = rng.choice("+-")
    if op == "-" and a < b:
        a, b = b, a
    value = a + b if op == "+" else a - b
    question = f"What is {spell(a)} {op} {spell(b)}?"
    return Example("arithmetic", f"{a}{op}{b}", question, spell(value), {"a": a, "b": b, "op": op})


def integer_prompt(example: Example) -> str:
    return chat_prompt(example.question)


def integer_verify(value: Any, example: Example) -> bool:
    return value is not None and value == parse_int(example.answer)


def integer_trace(example: Example) -> str:
    a, b, op = example.data["a"], example.data["b"], example.data["op"]
    steps = addition_steps(a, b) if op == "+" else subtraction_steps(a, b)
    return _format_trace(steps, example.answer)
