"""The arithmetic domain of the generated corpus (see ``workbench.data.corpus``)."""

from __future__ import annotations

import random

from workbench.data.arith import add_columns, digits, sub_columns

_PLACES = ("ones", "tens", "hundreds", "thousands", "ten-thousands", "hundred-thousands", "millions")
_PROBLEM_OPENERS = ("Problem:", "Compute", "Work out", "Question:", "Calculate", "Find")


def _random_number(rng: random.Random, min_digits: int, max_digits: int) -> int:
    n_digits = rng.randint(min_digits, max_digits)
    return rng.randint(10 ** (n_digits - 1), 10**n_digits - 1)


def _addition_steps(a: int, b: int) -> list[str]:
    lines = []
    for i, col in enumerate(add_columns(a, b)):
        expr = f"{col.x} + {col.y} + {col.carry_in}" if col.carry_in else f"{col.x} + {col.y}"
        step = f"  {_PLACES[i]}: {expr} = {col.value}, write {col.digit}"
        lines.append(step + (", carry 1" if col.carry_out else ""))
    if col.carry_out:
        lines.append(f"  {_PLACES[len(lines)]}: the carry 1 is written as 1")
    return lines


def _subtraction_steps(a: int, b: int) -> list[str]:
    """Column subtraction of b from a (a >= b), with each borrow spelled out."""
    lines = []
    for i, col in enumerate(sub_columns(a, b)):
        expr = f"{col.x} - 1 - {col.y}" if col.carry_in else f"{col.x} - {col.y}"
        if not col.carry_out:
            lines.append(f"  {_PLACES[i]}: {expr} = {col.value}, write {col.value}")
        else:
            borrowed = f"1{col.x} - 1 - {col.y}" if col.carry_in else f"1{col.x} - {col.y}"
            lines.append(f"  {_PLACES[i]}: {expr} is negative, borrow 10: {borrowed} = {col.value}")
    return lines


def _multiplication_steps(a: int, b: int) -> list[str]:
    if b < 10:  # one-digit multiplier: digit by digit, with carries
        lines, carry = [], 0
        for i, x in enumerate(digits(a)):
            p = x * b + carry
            expr = f"{x} * {b} + {carry}" if carry else f"{x} * {b}"
            step = f"  {_PLACES[i]}: {expr} = {p}, write {p % 10}"
            carry = p // 10
            lines.append(step + (f", carry {carry}" if carry else ""))
        if carry:
            lines.append(f"  {_PLACES[len(lines)]}: the carry {carry} is written as {carry}")
        return lines
    # two-digit multiplier: one partial product per digit, then add them
    ones, tens = b % 10, b - b % 10
    return [
        f"  {a} * {ones} = {a * ones}",
        f"  {a} * {tens} = {a * tens}",
        f"  {a * ones} + {a * tens} = {a * b}",
    ]


def _arithmetic_problem(rng: random.Random) -> list[str]:
    kind = rng.choice(("add", "add", "sub", "sub", "mul"))
    if kind == "mul":
        a, b = _random_number(rng, 2, 4), _random_number(rng, 1, 2)
        op, result, steps = "*", a * b, _multiplication_steps(a, b)
    else:  # operands of similar length, so that most columns have real work
        n_digits = rng.randint(2, 5)
        a, b = _random_number(rng, n_digits, n_digits), _random_number(rng, n_digits - 1, n_digits)
        if kind == "add":
            op, result, steps = "+", a + b, _addition_steps(a, b)
        else:
            a, b = max(a, b), min(a, b)
            op, result, steps = "-", a - b, _subtraction_steps(a, b)
    lines = [f"{rng.choice(_PROBLEM_OPENERS)} {a} {op} {b}", *steps, f"Answer: {a} {op} {b} = {result}"]
    if kind == "sub" and rng.random() < 0.3:
        lines.append(f"Check: {result} + {b} = {a}")
    return lines


def arithmetic_document(rng: random.Random) -> str:
    """Two to four worked arithmetic problems."""
    problems = ["\n".join(_arithmetic_problem(rng)) for _ in range(rng.randint(2, 4))]
    return "\n\n".join(problems)
