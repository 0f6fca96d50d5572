"""``recall``: reading drills for a base that must read its context, not only compute on it.

Two kinds of problem, drawn half and half:

* copy: ``Repeat 4 7 1 9.`` -> ``4 7 1 9`` (three to six digits);
* recall: ``k: 4 7; m: 3 2; p: 9 1. Find m.`` -> ``3 2`` (two to six records, lowercase keys from
  ``a``..``z``, values of one to three digits, the question naming any of them).

Why a base needs them. A model pre-trained only on addition reads by *position*: every addition prompt has
the same layout, so "the tens digit of the first number" is always the same offset back. Looking a record
up by its key needs *content-based* attention (an induction-style head: find the earlier occurrence of the
key named in the question, copy what follows it), and no method of specialising the add base learnt that
in a thousand steps (the ``lookup`` vertical stayed near chance, 3%, full fine-tuning included). Mixed
into the base's corpus, these drills make the base form such heads during pre-training
(``scripts/make_vertical_base.py --read``), so that a vertical can *use* reading instead of having to
invent it.

The trace names the record it reads (``<think>m: 3 2.</think>``): writing the key first turns finding its
value into copying what follows an earlier occurrence of that key, the induction pattern a three-layer
model can form; half of the base's documents carry it, as half of its addition documents carry theirs.
The drills are kept apart from the ``lookup`` vertical on purpose: lowercase keys and ``:`` here,
uppercase ``A``..``H`` and ``=`` there, another question, so the vertical still has its own format to
learn. Where it simplifies: real pre-training teaches reading from natural text; two drills are the
smallest corpus that forms the same mechanism in a model of a hundred thousand parameters.
"""

from __future__ import annotations

import random
import string
from typing import Any

from workbench.tasks.integers import spell
from workbench.tasks.task import Example, _format_trace, chat_prompt

KEYS = string.ascii_lowercase


def make_recall(rng: random.Random) -> Example:
    if rng.random() < 0.5:
        digits = [rng.randrange(10) for _ in range(rng.randint(3, 6))]
        value = " ".join(map(str, digits))
        question = f"Repeat {value}."
        return Example("recall", question, question, value, {"kind": "copy", "value": value})
    n = rng.randint(2, 6)
    keys = rng.sample(KEYS, n)
    values = [rng.randint(0, 999) for _ in keys]
    q = rng.randrange(n)
    records = "; ".join(f"{k}: {spell(v)}" for k, v in zip(keys, values, strict=True))
    question = f"{records}. Find {keys[q]}."
    value = spell(values[q])
    return Example("recall", question, question, value, {"kind": "recall", "key": keys[q], "value": value})


def recall_prompt(example: Example) -> str:
    return chat_prompt(example.question)


def parse_digits(text: str) -> str | None:
    """The digits of an answer, one space apart (``" 4 7 "`` -> ``"4 7"``); None when anything else is there."""
    if not isinstance(text, str):
        return None
    parts = text.split()
    return " ".join(parts) if parts and all(len(p) == 1 and p.isdigit() for p in parts) else None


def recall_verify(value: Any, example: Example) -> bool:
    # compared as a digit string: a copy keeps its leading zeros (``0 4 7`` is not ``4 7``)
    return value is not None and value == example.data["value"]


def recall_trace(example: Example) -> str:
    d = example.data
    steps = f"{d['key']}: {d['value']}." if d["kind"] == "recall" else f"copy {d['value']}."
    return _format_trace(steps, example.answer)


__all__ = ["KEYS", "make_recall", "parse_digits", "recall_prompt", "recall_trace", "recall_verify"]
