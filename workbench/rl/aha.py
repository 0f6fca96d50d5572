"""Looking for an "aha moment": does a policy check, retry or revise its own reasoning?

The claim
---------
The DeepSeek-R1 paper shows an intermediate R1-Zero checkpoint stopping in the middle of a solution
("Wait, wait. Wait. That's an aha moment I can flag here.") and re-deriving a step. It reports that
with reinforcement learning alone the model learned to re-evaluate its approach and to spend more
tokens doing so. Later work read base models' outputs more closely: Liu et al. ("Understanding
R1-Zero-like training", 2025) found such self-reflection in base models *before* any RL, and
Gandhi et al. ("Cognitive behaviors that enable self-improving reasoners", 2025) found that RL
improves a model's reasoning mainly when the base already shows verification and backtracking now
and then. RL amplifies what the base can already do.

The search
----------
``aha_search`` is a small, honest detector: it counts the completions in which each pattern occurs,
and keeps a few examples of each so that a reader can judge them (a pattern match is not an insight).

Words (case-insensitive, whole words, anywhere in the completion): ``wait``, ``check`` (also
*verify*, *recheck*), ``again``, ``let me``, ``hmm`` (also *aha*), ``mistake`` (also *wrong*,
*oops*).

Structure (steps are searched in the reasoning, i.e. the completion with its answers removed):

* ``recomputed step``: the same computation ``lhs = rhs`` written twice with the same result (the same
  column added twice, a check);
* ``changed step``: the same left-hand side with two *different* results (a step revised, or a
  mistake left standing);
* ``several thinks``: more than one ``<think>`` (reasoning started again);
* ``several answers``: more than one ``<answer>`` (the format reward gives such a completion 0, and
  only the last answer is graded);
* ``changed answer``: two answers with different contents. An answer is the text after ``<answer>`` up
  to the next tag or the end: sampling stops at the first ``</answer>``, so a second answer can only
  follow a first one that was never closed (``<answer>1 0 2.</think><answer>5 0</answer>``).

A step is a clause ``lhs = rhs`` between punctuation (``.``, ``,``, ``;``, ``:``, new lines, tags)
whose left side is numbers and ``+ - * / ( )`` and whose right side is a number: in ``7 + 3 = 10,
carry 1. 9 + 4 + 1 = 14.`` the steps are ``7+3 = 10`` and ``9+4+1 = 14`` (whitespace removed).

References. A correct trace may repeat a step by itself: ``11 + 11`` is ``1 + 1 = 2. 1 + 1 = 2.``.
Pass ``references`` (for each completion, the task's own worked trace of the same problem,
``task.trace(example)``) and a step counts as recomputed or changed only beyond what the reference
already does.

Where it simplifies: a keyword list and one structural rule are a crude stand-in for reading the
traces. They find the *form* of self-verification, not whether it helped; the examples are there to
read. A tiny model trained only on templated traces cannot write a word it has never seen, so for it
the word patterns are a check that RL did not invent them, not a search with a chance of success.
"""

from __future__ import annotations

import re
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field

from workbench.tasks.rewards import ANSWER, TAGS, THINK

WORD_PATTERNS: dict[str, str] = {
    "wait": r"\bwait\b",
    "check": r"\b(?:re-?|double-?)?check|\bverif",
    "again": r"\bagain\b",
    "let me": r"\blet me\b",
    "hmm": r"\b(?:hmm+|aha)\b",
    "mistake": r"\b(?:mistake|wrong|oops)\b",
}
STRUCTURE_PATTERNS = ("recomputed step", "changed step", "several thinks", "several answers", "changed answer")
PATTERNS: tuple[str, ...] = (*WORD_PATTERNS, *STRUCTURE_PATTERNS)

_WORDS = {name: re.compile(rx, re.IGNORECASE) for name, rx in WORD_PATTERNS.items()}
_ANSWER_TEXT = re.compile(re.escape(ANSWER) + r"(.*?)(?=" + "|".join(re.escape(t) for t in TAGS) + r"|\Z)", re.DOTALL)
_CLAUSE_SPLIT = re.compile(r"[.,;:\n]|" + "|".join(re.escape(t) for t in TAGS))
# the two sides of a step once whitespace is gone: each pattern has one way to match, so the scan is linear
_LHS = re.compile(r"[0-9(][0-9+\-*/()]*")
_RHS = re.compile(r"-?[0-9]+")


def _step(clause: str) -> tuple[str, str] | None:
    """``" 9 + 4 + 1 = 14 "`` -> ``("9+4+1", "14")``; None when the clause is not one computation.

    Linear in the clause: split at its one ``=``, drop the whitespace, match each side. (A single pattern
    with optional whitespace on both sides of ``=`` backtracks quadratically: 40,000 spaces took 20 s.)"""
    lhs, eq, rhs = clause.partition("=")
    if not eq or "=" in rhs:
        return None
    lhs, rhs = "".join(lhs.split()), "".join(rhs.split())
    if _LHS.fullmatch(lhs) and _RHS.fullmatch(rhs) and any(op in lhs for op in "+-*/"):
        return lhs, rhs
    return None


def steps_of(text: str) -> list[tuple[str, str]]:
    """The computations ``lhs = rhs`` of a text, in order, whitespace removed: ``[("7+3", "10"), ...]``."""
    _check_text(text)
    return [step for clause in _CLAUSE_SPLIT.split(text) if (step := _step(clause)) is not None]


def _check_text(text: object, what: str = "text") -> None:
    if not isinstance(text, str):
        raise TypeError(f"{what} must be a string (a decoded completion), got {type(text).__name__}")


def _reasoning(text: str) -> str:
    """The completion without its answers (an answer like ``8 + 5 = 13`` is not a step)."""
    return _ANSWER_TEXT.sub(" ", text)


def _step_patterns(text: str, reference: str | None) -> set[str]:
    steps = steps_of(_reasoning(text))
    allowed = Counter(steps_of(_reasoning(reference))) if reference else Counter()
    found = set()
    if any(n > max(1, allowed[s]) for s, n in Counter(steps).items()):
        found.add("recomputed step")
    results: dict[str, set[str]] = defaultdict(set)
    for lhs, rhs in steps:
        results[lhs].add(rhs)
    ref_results: dict[str, set[str]] = defaultdict(set)
    for lhs, rhs in allowed:
        ref_results[lhs].add(rhs)
    if any(len(r) > max(1, len(ref_results[lhs])) for lhs, r in results.items()):
        found.add("changed step")
    return found


def patterns_in(text: str, reference: str | None = None) -> set[str]:
    """The names of the patterns (``PATTERNS``) that occur in one completion."""
    _check_text(text, "a completion")
    if reference is not None:
        _check_text(reference, "a reference")
    found = {name for name, rx in _WORDS.items() if rx.search(text)}
    found |= _step_patterns(text, reference)
    if text.count(THINK) > 1:
        found.add("several thinks")
    answers = [a.strip() for a in _ANSWER_TEXT.findall(text)]
    if text.count(ANSWER) > 1:
        found.add("several answers")
    if len(set(answers)) > 1:
        found.add("changed answer")
    return found


@dataclass
class AhaReport:
    """What ``aha_search`` found in ``n`` completions."""

    n: int
    counts: dict[str, int]  # pattern -> number of completions in which it occurs
    examples: dict[str, list[str]] = field(default_factory=dict)  # pattern -> a few of those completions

    @property
    def found(self) -> list[str]:
        """The patterns that occur at least once."""
        return [p for p, c in self.counts.items() if c > 0]

    def rate(self, pattern: str) -> float:
        """Share of the completions in which ``pattern`` occurs."""
        return self.counts[pattern] / max(1, self.n)


def aha_search(
    completions: Sequence[str], references: Sequence[str | None] | None = None, *, max_examples: int = 3
) -> AhaReport:
    """Count, per pattern, the completions that show it, and keep up to ``max_examples`` of each.

    references: optional, one per completion: the task's correct trace of the same problem; repeated
    steps that the reference itself contains are not counted (see the module docstring).
    """
    if isinstance(completions, str):
        raise TypeError("completions must be a list of strings, got one string; wrap it: aha_search([text])")
    if isinstance(max_examples, bool) or not isinstance(max_examples, int) or max_examples < 0:
        raise ValueError(f"max_examples must be an integer >= 0, got {max_examples!r}")
    if references is not None and len(references) != len(completions):
        raise ValueError(f"{len(references)} references for {len(completions)} completions")
    counts = dict.fromkeys(PATTERNS, 0)
    examples: dict[str, list[str]] = {p: [] for p in PATTERNS}
    for i, text in enumerate(completions):
        for p in patterns_in(text, references[i] if references is not None else None):
            counts[p] += 1
            if len(examples[p]) < max_examples:
                examples[p].append(text)
    return AhaReport(n=len(completions), counts=counts, examples=examples)


def aha_table(reports: dict[str, AhaReport]) -> str:
    """A plain-text table: one row per pattern, one column per report (completions showing it)."""
    names = list(reports)
    width = max(12, *(len(n) for n in names))
    lines = [f"{'pattern':<16}" + "".join(f"{n:>{width + 1}}" for n in names)]
    for p in PATTERNS:
        lines.append(f"{p:<16}" + "".join(f"{reports[n].counts[p]:>{width + 1}}" for n in names))
    lines.append(f"{'completions':<16}" + "".join(f"{reports[n].n:>{width + 1}}" for n in names))
    return "\n".join(lines)


__all__ = [
    "PATTERNS",
    "STRUCTURE_PATTERNS",
    "WORD_PATTERNS",
    "AhaReport",
    "aha_search",
    "aha_table",
    "patterns_in",
    "steps_of",
]
