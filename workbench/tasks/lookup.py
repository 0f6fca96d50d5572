"""``lookup``: read one record out of the prompt, a vertical outside arithmetic.

``A = 4 7, F = 3 2, C = 9 1, H = 5 5. What is C?`` -> ``<think>C = 9 1.</think><answer>9 1</answer>``.

Four records ``letter = two-digit value`` in random order (letters from ``A``..``H``), then a question about
one of them. Solving it needs *content-based* reading: find the key named in the question among the
records, wherever it stands, and copy the two digits after it. A model pre-trained on addition never had
to do that (every addition prompt has the same layout, so it reads by position), which makes this the
vertical furthest from what the ``add`` base knows. The trace names the record it copied; the verifier
compares the integer in ``<answer>`` with the record's value.

Where it simplifies: real retrieval reads long documents with free-form keys; four short records are
the smallest version of the same skill (an induction-style copy keyed by content).
"""

from __future__ import annotations

import random
from typing import Any

from workbench.tasks.integers import parse_int, spell
from workbench.tasks.task import Example, _format_trace, chat_prompt

LETTERS = "ABCDEFGH"
N_RECORDS = 4


def make_lookup(rng: random.Random) -> Example:
    keys = rng.sample(LETTERS, N_RECORDS)
    values = [rng.randint(10, 99) for _ in keys]
    q = rng.randrange(N_RECORDS)
    records = ", ".join(f"{k} = {spell(v)}" for k, v in zip(keys, values, strict=True))
    question = f"{records}. What is {keys[q]}?"
    return Example("lookup", question, question, spell(values[q]), {"key": keys[q], "value": values[q]})


def lookup_prompt(example: Example) -> str:
    return chat_prompt(example.question)


def lookup_verify(value: Any, example: Example) -> bool:
    return value is not None and value == example.data["value"]


def lookup_trace(example: Example) -> str:
    return _format_trace(f"{example.data['key']} = {spell(example.data['value'])}.", example.answer)


__all__ = ["LETTERS", "lookup_prompt", "lookup_trace", "lookup_verify", "make_lookup", "parse_int"]
