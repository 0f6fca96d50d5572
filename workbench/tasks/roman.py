"""Roman numerals: write 1..999 place by place (a vertical with nothing like it in the base corpus)."""

from __future__ import annotations

import random
import re
from typing import Any

from workbench.tasks.task import Example, _format_trace

_ROMAN_PLACES = (  # (place value, symbols for 1, 5 and 10 of that place)
    (100, "C", "D", "M"),
    (10, "X", "L", "C"),
    (1, "I", "V", "X"),
)
_ROMAN = re.compile(r"M{0,3}(CM|CD|D?C{0,3})(XC|XL|L?X{0,3})(IX|IV|V?I{0,3})")
_ROMAN_VALUE = {"I": 1, "V": 5, "X": 10, "L": 50, "C": 100, "D": 500, "M": 1000}


def roman_digit(d: int, one: str, five: str, ten: str) -> str:
    """One decimal digit in the symbols of its place: 4 -> one+five, 9 -> one+ten, 7 -> five+one+one."""
    return ["", one, one * 2, one * 3, one + five, five, five + one, five + one * 2, five + one * 3, one + ten][d]


def to_roman(n: int) -> str:
    """1..3999 as a Roman numeral: 347 -> ``CCCXLVII``."""
    if not 1 <= n <= 3999:
        raise ValueError(f"Roman numerals here cover 1..3999, got {n}")
    out = "M" * (n // 1000)
    for value, one, five, ten in _ROMAN_PLACES:
        out += roman_digit(n // value % 10, one, five, ten)
    return out


def parse_roman(text: str) -> int | None:
    """A Roman numeral in canonical form, letters may be spaced: ``"C C C X L V I I"`` -> 347; else None."""
    if not isinstance(text, str):
        return None
    text = re.sub(r"\s+", "", text)
    if not text or not _ROMAN.fullmatch(text):
        return None
    values = [_ROMAN_VALUE[c] for c in text]
    return sum(-v if i + 1 < len(values) and v < values[i + 1] else v for i, v in enumerate(values))


def make_roman(rng: random.Random) -> Example:
    n = rng.randint(1, 999)
    question = f"Write {n} in Roman numerals."
    return Example("roman", str(n), question, " ".join(to_roman(n)), {"n": n})


def roman_verify(value: Any, example: Example) -> bool:
    return value is not None and value == example.data["n"]


_PLACE_WORDS = ("hundreds", "tens", "ones")  # the words the base corpus's column arithmetic uses


def roman_trace(example: Example) -> str:
    """Place by place from the largest, like the corpus's column arithmetic, a zero place written empty:
    `` hundreds: 3 = C C C. tens: 0. ones: 7 = V I I.`` for 307."""
    n, steps = example.data["n"], []
    for name, (value, one, five, ten) in zip(_PLACE_WORDS, _ROMAN_PLACES):
        if n < value:
            continue
        d = n // value % 10
        steps.append(f" {name}: {d} = {' '.join(roman_digit(d, one, five, ten))}." if d else f" {name}: 0.")
    return _format_trace("".join(steps), example.answer)  # " hundreds" with its space: the corpus's token
