"""Rule-based rewards: is the completion well formed, and is its answer right?

DeepSeek-R1-Zero was trained with two rewards computed by rules, not by a learned reward model
(which a policy learns to fool):

* **format**: the completion puts its reasoning between ``<think>`` and ``</think>`` and then its
  answer between ``<answer>`` and ``</answer>``;
* **accuracy**: the answer, read out by a parser the task owns, passes the task's verifier.

Both are functions of a string and return a float in [0, 1]. They must hold up against anything a
sampling policy can write: half-finished tags, tags twice, no tags, binary junk. So they never raise
(a property test throws arbitrary strings at them) and follow these documented rules:

Format (``format_reward``): 1.0 when the completion is exactly

    <whitespace> <think> T </think> <whitespace> <answer> A </answer> <whitespace>

where each of the four tags occurs exactly once, in this order, and the reasoning ``T`` is not blank
(an empty ``<think></think>`` does not count as thinking). ``A`` may be anything (its correctness is
the accuracy reward's business). Otherwise 0.0: a second ``<think>`` or ``<answer>``, text before
``<think>`` or after ``</answer>``, a missing tag, tags in the wrong order.

Answer extraction (``extract_answer``): the text between the *last* ``<answer>`` and the ``</answer>``
that follows it, stripped of surrounding whitespace; ``None`` when there is no complete pair. Taking
the last answer means a policy cannot hedge by writing several: only its final word counts. The
accuracy reward does not require the format: a bare ``<answer>85</answer>`` is graded on its answer.

Simplifications: DeepSeek-R1 also added a language-consistency reward (the fraction of the reasoning
in the target language) for its final RL stage; our tasks are monolingual, so there is none.
"""

from __future__ import annotations

import re
from collections.abc import Callable

THINK, THINK_END, ANSWER, ANSWER_END = "<think>", "</think>", "<answer>", "</answer>"
TAGS = (THINK, THINK_END, ANSWER, ANSWER_END)

_FORMAT = re.compile(
    r"\A\s*<think>(?P<think>.*?)</think>\s*<answer>(?P<answer>.*?)</answer>\s*\Z",
    re.DOTALL,
)


def format_reward(completion: str) -> float:
    """1.0 for ``<think>reasoning</think><answer>answer</answer>`` (whitespace around allowed), else 0.0."""
    if not isinstance(completion, str):
        return 0.0
    if any(completion.count(tag) != 1 for tag in TAGS):
        return 0.0
    match = _FORMAT.match(completion)
    if match is None or not match.group("think").strip():
        return 0.0
    return 1.0


def extract_answer(completion: str) -> str | None:
    """The stripped text of the last complete ``<answer>...</answer>`` block, or None."""
    if not isinstance(completion, str):
        return None
    end = completion.rfind(ANSWER_END)
    if end < 0:
        return None
    start = completion.rfind(ANSWER, 0, end)
    if start < 0:
        return None
    return completion[start + len(ANSWER) : end].strip()


def extract_think(completion: str) -> str | None:
    """The stripped reasoning of the first complete ``<think>...</think>`` block, or None (for reading)."""
    if not isinstance(completion, str):
        return None
    start = completion.find(THINK)
    if start < 0:
        return None
    end = completion.find(THINK_END, start)
    if end < 0:
        return None
    return completion[start + len(THINK) : end].strip()


def accuracy_reward(completion: str, is_correct: Callable[[str], bool]) -> float:
    """1.0 when the extracted answer passes ``is_correct`` (a task's parser + verifier), else 0.0.

    ``is_correct`` receives the answer text; if it raises (it should not), the answer counts as wrong.
    """
    answer = extract_answer(completion)
    if answer is None:
        return 0.0
    try:
        return 1.0 if is_correct(answer) else 0.0
    except Exception:  # a verifier bug must not crash an RL run; the property tests keep this unused
        return 0.0


def combine(rewards: dict[str, float], weights: dict[str, float]) -> float:
    """The scalar reward GRPO optimises: ``sum(weights[k] * rewards[k])`` over the weighted keys."""
    return float(sum(w * float(rewards.get(k, 0.0)) for k, w in weights.items()))


__all__ = [
    "ANSWER",
    "ANSWER_END",
    "TAGS",
    "THINK",
    "THINK_END",
    "accuracy_reward",
    "combine",
    "extract_answer",
    "extract_think",
    "format_reward",
]
