"""The countdown task: reach a target with three given numbers, each used exactly once, and + - * (/)."""

from __future__ import annotations

import ast
import random
import re
from fractions import Fraction
from typing import Any

from workbench.tasks.task import Example, _format_trace, chat_prompt

_EXPR_CHARS = re.compile(r"[0-9 \t\n+\-*/()]{1,80}")
_OPS = {ast.Add: "+", ast.Sub: "-", ast.Mult: "*", ast.Div: "/"}


def parse_expression(text: str) -> tuple[Fraction, list[int]] | None:
    """Evaluate an expression of integers, ``+ - * /`` and parentheses exactly.

    Returns (value, the integers used, in order), or None for anything else: other characters, more
    than 80 characters, unary minus, division by zero, syntax errors. An optional ``= N`` at the end
    is ignored (models like to write it); the left side is what is checked.
    """
    if not isinstance(text, str):
        return None
    text = text.strip()
    if "=" in text:
        text = text.split("=", 1)[0].strip()
    if not _EXPR_CHARS.fullmatch(text):
        return None
    try:
        tree = ast.parse(text, mode="eval")
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        return None
    numbers: list[int] = []

    def ev(node: ast.AST) -> Fraction | None:
        if isinstance(node, ast.Constant) and type(node.value) is int:
            numbers.append(node.value)
            return Fraction(node.value)
        if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
            left, right = ev(node.left), ev(node.right)
            if left is None or right is None:
                return None
            if isinstance(node.op, ast.Add):
                return left + right
            if isinstance(node.op, ast.Sub):
                return left - right
            if isinstance(node.op, ast.Mult):
                return left * right
            return None if right == 0 else left / right
        return None

    try:
        value = ev(tree.body)
    except RecursionError:
        return None
    return None if value is None else (value, numbers)


def make_countdown(rng: random.Random) -> Example:
    """Three numbers in 1..20 and a target made from all of them, left to right: ((x o y) o z)."""
    while True:
        numbers = [rng.randint(1, 20) for _ in range(3)]
        x, y, z = rng.sample(numbers, 3)
        o1, o2 = rng.choice("+-*"), rng.choice("+-*")
        first = _apply(x, o1, y)
        target = _apply(first, o2, z)
        if first > 0 and 0 < target <= 400 and target not in numbers:
            break
    shown = sorted(numbers)
    key = ",".join(map(str, shown)) + f"->{target}"
    question = f"Use {', '.join(map(str, shown))} to make {target}."
    data = {"numbers": shown, "target": target, "steps": [(x, o1, y, first), (first, o2, z, target)]}
    return Example("countdown", key, question, f"({x} {o1} {y}) {o2} {z}", data)


def _apply(a: int, op: str, b: int) -> int:
    return a + b if op == "+" else a - b if op == "-" else a * b


def countdown_prompt(example: Example) -> str:
    return chat_prompt(example.question)


def countdown_verify(value: Any, example: Example) -> bool:
    """The expression reaches the target and uses exactly the given numbers (each once)."""
    if value is None:
        return False
    result, used = value
    return result == example.data["target"] and sorted(used) == sorted(example.data["numbers"])


def countdown_trace(example: Example) -> str:
    steps = " ".join(f"{a} {op} {b} = {c}." for a, op, b, c in example.data["steps"])
    return _format_trace(steps, example.answer)
