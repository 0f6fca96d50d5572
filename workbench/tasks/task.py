"""What a task is: a problem, its prompt, parser, verifier and traces, and a split that never leaks.

A task for R1-style reinforcement learning needs an answer a program can check, so that the reward is
a rule and not a learned model. Each task here is a handful of small pure functions:

* ``make(rng) -> Example``: draw one problem (with its reference answer) from a ``random.Random``;
* ``prompt(example) -> str``: the text the model continues;
* ``parse_answer(text) -> value | None``: read an answer out of the text inside ``<answer>``;
* ``verify(value, example) -> bool``: is that answer right (for countdown: *any* valid expression
  that reaches the target, not only the reference one);
* ``trace(example) -> str``: a correct worked solution in the R1 format,
  ``<think>steps</think><answer>answer</answer>`` (cold-start data, and the base corpus);
* ``direct(example) -> str``: the answer alone, ``<answer>answer</answer>``, with no reasoning.

``Task`` bundles them and adds ``sample(n, seed=..., split=...)`` and ``reward(completion, example)``,
which returns ``{"accuracy": a, "format": f}`` with both in [0, 1] (rules in ``rewards.py``).

Held-out splits. Every problem has a *key* (for countdown: its sorted numbers and target), and a
stable hash of the key puts it in ``"train"`` or ``"test"`` (``test_fraction`` of the keys). The split
is a property of the problem, not of the draw, so ``sample(..., split="train")`` and
``sample(..., split="test")`` are disjoint for every pair of seeds: a test problem is never trained on.

Numbers digit by digit. The integer tasks write every number with its digits apart (``4 7``, answer
``8 5``), so that each digit is one token. Our byte-level BPE, like GPT-2's, cuts numbers into irregular
pieces (``347`` -> ``34`` ``7``), and a tiny model then spends most of its training learning which
digits hide in which piece; LLaMA's tokenizer splits numbers into single digits for the same reason.
``parse_int`` ignores the spaces, so ``85`` and ``8 5`` are the same answer.

Where it simplifies: DeepSeek-R1 was trained on competition mathematics and code with test cases;
ours are grade-school problems that a model with a hundred thousand parameters can learn. R1-Zero's
prompt *told* the model, in words, to think in tags; a tiny model cannot read instructions, so our
prompt is only ``User: <question>\\nAssistant:`` and the tags must come from what the model has seen
(the base corpus, or cold-start data).
"""

from __future__ import annotations

import random
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from workbench.tasks.rewards import ANSWER, ANSWER_END, THINK, THINK_END, accuracy_reward, format_reward

PROBLEM_SPLITS = ("train", "test")

PROMPT_TEMPLATE = "User: {question}\nAssistant:"


@dataclass(frozen=True)
class Example:
    """One problem: the task's name, its key (decides the split), the question and the reference answer.

    ``data`` holds the task's own fields (the operands, the numbers and target), for verifiers and traces.
    """

    task: str
    key: str
    question: str
    answer: str
    data: dict[str, Any] = field(default_factory=dict, hash=False, compare=False)


def chat_prompt(question: str) -> str:
    """The prompt every task uses: ``User: <question>\\nAssistant:`` (the completion starts after it)."""
    return PROMPT_TEMPLATE.format(question=question)


def split_of_key(key: str, test_fraction: float) -> str:
    """``"test"`` for a stable ``test_fraction`` of keys (CRC-32 of the key), ``"train"`` for the rest."""
    return "test" if zlib.crc32(key.encode("utf-8")) % 10_000 < round(test_fraction * 10_000) else "train"


def _format_trace(steps: str, answer: str) -> str:
    return f"{THINK}{steps}{THINK_END}{ANSWER}{answer}{ANSWER_END}"


def _direct(example: Example) -> str:
    return f"{ANSWER}{example.answer}{ANSWER_END}"


@dataclass(frozen=True)
class Task:
    """A task: its pure functions, plus sampling with held-out splits and the reward."""

    name: str
    description: str
    make: Callable[[random.Random], Example]
    prompt: Callable[[Example], str]
    parse_answer: Callable[[str], Any]
    verify: Callable[[Any, Example], bool]
    trace: Callable[[Example], str]
    direct: Callable[[Example], str] = _direct
    test_fraction: float = 0.2

    def split_of(self, example: Example) -> str:
        return split_of_key(example.key, self.test_fraction)

    def sample(self, n: int, seed: int = 0, split: str = "train") -> list[Example]:
        """``n`` distinct problems of ``split``, the same for the same (n, seed, split).

        Drawn one by one from ``random.Random(seed)``, so a smaller ``n`` gives a prefix of a larger one.
        """
        if split not in PROBLEM_SPLITS:
            raise ValueError(f"split must be one of {PROBLEM_SPLITS}, got {split!r}")
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise ValueError(f"n (the number of problems) must be an integer >= 0, got {n!r}")
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ValueError(f"seed must be an integer, got {seed!r}")
        rng = random.Random(f"{self.name}/{split}/{seed}")
        out: list[Example] = []
        seen: set[str] = set()
        misses = 0  # draws in a row that found nothing new
        while len(out) < n:
            ex = self.make(rng)
            if ex.key in seen or self.split_of(ex) != split:
                misses += 1
                if misses > 10 * len(seen) + 10_000:  # a pool of P problems misses one in P draws: exhausted
                    raise ValueError(
                        f"task {self.name!r} has only about {len(out)} distinct {split} problems, fewer than the "
                        f"{n} asked for; ask for at most {len(out)}"
                    )
                continue
            misses = 0
            seen.add(ex.key)
            out.append(ex)
        return out

    def is_correct(self, answer_text: str, example: Example) -> bool:
        """Parse and verify the text of an answer (what is inside ``<answer>``)."""
        return bool(self.verify(self.parse_answer(answer_text), example))

    def reward(self, completion: str, example: Example) -> dict[str, float]:
        """``{"accuracy": 0 or 1, "format": 0 or 1}`` for a completion (the text after the prompt)."""
        return {
            "accuracy": accuracy_reward(completion, lambda text: self.is_correct(text, example)),
            "format": format_reward(completion),
        }
