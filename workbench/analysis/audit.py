"""Audit a lesson: does any printed conclusion disagree with its own numbers, and is any number typed?

A lesson contradicts itself in two ways. A verdict cell prints "A beats B" (or explains why A beat B)
while the interval of its own measurement includes zero; or the prose carries a number from an
earlier run that the code no longer produces. This module finds both, so that ``tests/test_notebooks.py``
can run it on every lesson and any lesson's author can run it on their own notebook:

    from workbench.analysis.audit import verdict_problems, typed_number_cells
    problems = verdict_problems(json.load(open("book/lessons/04_multi_token_prediction.ipynb")))
    typed = typed_number_cells(json.load(open("notebooks/04_multi_token_prediction.ipynb")))

``verdict_problems(executed_notebook)`` reads every output a ``stats.Verdict.show()`` or a
``claims.Finding.show()`` displayed (their numbers travel in the output's metadata) and checks, from
those numbers alone and without trusting the library's own decision:

* the outcome follows from the interval: below the power threshold (``n < min_n``) or with no finite
  interval it is ``unclear``; inside the margin ``same``; wholly above zero ``a``; wholly below ``b``;
* the sentence says what the outcome says ("beats" / "is higher than" in the right order for a
  winner, "equal within" for ``same``, "Cannot tell" and the knob to raise for ``unclear``);
* the explanation printed beside it is the one written for that outcome (an unclear one is offered as
  a hypothesis), and the displayed text is exactly sentence + explanation;
* a ledger finding's label follows from its rule (``claims.expected_label``) and is the label shown;
* no other output states a verdict-shaped sentence ("beats", "Cannot tell", "equal within") without
  the numbers behind it.

``typed_numbers(markdown)`` lists the digits of a markdown cell that code did not produce. A number in
a lesson's prose must come from ``display(Markdown(f"..."))`` in a code cell. Not counted: code spans
(`kv_lora_rank=512`) and math (``$...$``), link targets, names that start with a letter
(DeepSeek-V3, FP8, E4M3, top-2, bf16, H800; but 1.5x and 37B count), file names, heading and list
numbering, and references to lessons, sections, exercises and steps by number ("lesson 4",
"sections 1-4"). Where it simplifies: a number spelled out in words ("eight groups") is not caught;
write it from code all the same.
"""

from __future__ import annotations

import math
import re
from typing import Any

from workbench.analysis.claims import CLAIM_KEY, expected_label
from workbench.analysis.stats import OUTCOMES, VERDICT_KEY

VERDICT_WORDS = ("beats **", "**Cannot tell**", "are **equal within", "is higher than **")


# Verdicts ------------------------------------------------------------------------------------------
def _text(value: Any) -> str:
    return "".join(value) if isinstance(value, list) else str(value or "")


def _output_text(out: dict[str, Any]) -> str:
    if out.get("output_type") == "stream":
        return _text(out.get("text"))
    data = out.get("data", {})
    return _text(data.get("text/markdown") or data.get("text/plain"))


def expected_outcome(rec: dict[str, Any]) -> str:
    """The outcome a verdict's numbers call for, re-derived from its record (not from the library's decision)."""
    lo, hi, n, min_n, margin = rec["lo"], rec["hi"], rec["n"], rec["min_n"], rec.get("margin")
    if lo is None or hi is None or not (math.isfinite(lo) and math.isfinite(hi)) or n < min_n:
        return "unclear"
    if margin is not None and -margin <= lo and hi <= margin:
        return "same"
    if lo > 0:
        return "a"
    if hi < 0:
        return "b"
    return "unclear"


def record_problems(rec: dict[str, Any], shown: str | None = None) -> list[str]:
    """What is wrong with one verdict record (and the text it displayed, when given); empty when it agrees."""
    name = f"verdict {rec.get('a')!r} vs {rec.get('b')!r} ({rec.get('metric')})"
    problems = []
    want = expected_outcome(rec)
    if rec["outcome"] != want:
        problems.append(f"{name}: outcome {rec['outcome']!r}, but its interval and n call for {want!r}")
    o, text = rec["outcome"], rec["text"]
    if o in ("a", "b"):
        larger, smaller = (rec["a"], rec["b"]) if o == "a" else (rec["b"], rec["a"])
        if rec.get("better") is None:
            order = f"**{larger}** is higher than **{smaller}**"
        else:
            win, lose = (larger, smaller) if rec["better"] == "higher" else (smaller, larger)
            order = f"**{win}** beats **{lose}**"
            if rec.get("winner") != win:
                problems.append(f"{name}: winner {rec.get('winner')!r}, but the numbers make {win!r} the better")
        if not text.startswith(order):
            problems.append(f"{name}: outcome {o!r} should read {order!r}, the sentence reads {text[:80]!r}")
    elif o == "same" and "**equal within" not in text:
        problems.append(f"{name}: outcome 'same' but the sentence does not say equal within the margin")
    elif o == "unclear" and not (text.startswith("**Cannot tell**") and f"`{rec['knob']}`" in text):
        problems.append(f"{name}: outcome 'unclear' but the sentence does not say it cannot tell and name the knob")
    explanations = rec.get("explanations")
    if explanations is not None:
        chosen = explanations.get(o, "")
        expected = (f"*Hypothesis to test:* {chosen}" if o == "unclear" else chosen) if chosen else ""
        if rec.get("explanation", "") != expected:
            problems.append(f"{name}: the explanation printed is not the one written for outcome {o!r}")
        if shown is not None and shown.strip() != (text + (f" {expected}" if expected else "")).strip():
            problems.append(f"{name}: the displayed text is not the verdict's sentence and its explanation")
    return problems


def verdict_problems(notebook: dict[str, Any]) -> list[str]:
    """Every disagreement between a printed conclusion and its numbers in an executed notebook."""
    problems = []
    for i, cell in enumerate(notebook.get("cells", [])):
        if cell.get("cell_type") != "code":
            continue
        for out in cell.get("outputs", []):
            meta = out.get("metadata", {}) or {}
            shown = _output_text(out)
            if VERDICT_KEY in meta:
                problems += [f"cell {i}: {p}" for p in record_problems(meta[VERDICT_KEY], shown)]
            elif CLAIM_KEY in meta:
                rec = meta[CLAIM_KEY]
                want = expected_label(rec["rule"])
                if rec["label"] != want:
                    problems.append(
                        f"cell {i}: ledger {rec['claim']!r} labelled {rec['label']!r}, its rule gives {want!r}"
                    )
                if f"**{rec['label']}**" not in shown:
                    problems.append(f"cell {i}: ledger {rec['claim']!r} does not display its label")
                for v in rec.get("verdicts", []):
                    problems += [f"cell {i}: ledger {rec['claim']!r}: {p}" for p in record_problems(v)]
            elif any(w in shown for w in VERDICT_WORDS):
                problems.append(f"cell {i}: a verdict-shaped sentence without its numbers: {shown[:100]!r}")
    return problems


def verdict_records(notebook: dict[str, Any]) -> list[dict[str, Any]]:
    """The verdict records an executed notebook displayed, in order (for reports and the ledger)."""
    return [
        out["metadata"][VERDICT_KEY]
        for cell in notebook.get("cells", [])
        for out in cell.get("outputs", [])
        if VERDICT_KEY in (out.get("metadata") or {})
    ]


# Typed numbers -------------------------------------------------------------------------------------
_CODE = re.compile(r"`[^`]*`")
_MATH = re.compile(r"\$\$.*?\$\$|\$[^$\n]+\$", re.S)
_LINK = re.compile(r"\]\([^)]*\)")
_HEADING = re.compile(r"^\s*#+\s*\d+(\.\d+)*\.?\s", re.M)
_LIST = re.compile(r"^\s*\d+[.)]\s", re.M)
_REFS = re.compile(
    r"\b(lessons?|sections?|chapters?|exercises?|steps?|parts?)\s+\d+(\s*(-|–|and|,|or|to)\s*\d+)*", re.I
)
# names start with a letter (DeepSeek-V3, FP8, E4M3, top-2, bf16, H800) or are file names (02_mla_kv_cache);
# a token that starts with a digit is a number, units and all (1.5x, 37B, 64%)
_NAMES = re.compile(r"(?<![\w.])[A-Za-z][\w.-]*|\b\d\w*_[\w.-]*")
_NUMBER = re.compile(r"\d[\d,.]*")


def typed_numbers(markdown: str) -> list[str]:
    """The numbers in a markdown cell's prose (see the module docstring for what is not counted)."""
    t = _CODE.sub(" ", markdown)
    t = _MATH.sub(" ", t)
    t = _LINK.sub("]", t)
    t = _HEADING.sub("", t)
    t = _LIST.sub("", t)
    t = _REFS.sub(" ", t)
    t = _NAMES.sub(" ", t)
    return [m.rstrip(".,") for m in _NUMBER.findall(t)]


def typed_number_cells(notebook: dict[str, Any]) -> dict[int, list[str]]:
    """Markdown cells (by index) whose prose carries numbers code did not produce."""
    found = {}
    for i, cell in enumerate(notebook.get("cells", [])):
        if cell.get("cell_type") == "markdown":
            nums = typed_numbers(_text(cell.get("source")))
            if nums:
                found[i] = nums
    return found


__all__ = [
    "OUTCOMES",
    "VERDICT_WORDS",
    "expected_outcome",
    "record_problems",
    "typed_number_cells",
    "typed_numbers",
    "verdict_problems",
    "verdict_records",
]
