"""Exercises a lesson can check: the student writes an answer into a variable, the lesson computes the
right one from the library and says whether they agree.

``check(label, answer, expected, rel_tol)`` displays one line: not answered yet (``answer`` is None, as
in a headless run), right, or not quite, with the direction of the miss for numbers. The expected value
is computed in the lesson from library calls, never typed, so a check stays right when the configs change.
"""

from __future__ import annotations

import math
from typing import Any


def _agree(answer: Any, expected: Any, rel_tol: float) -> bool:
    if isinstance(expected, (int, float)) and not isinstance(expected, bool):
        try:
            a = float(answer)
        except (TypeError, ValueError):
            return False
        return math.isclose(a, float(expected), rel_tol=rel_tol, abs_tol=rel_tol)
    if isinstance(expected, str):
        return str(answer).strip().lower() == expected.strip().lower()
    return answer == expected


def check(label: str, answer: Any, expected: Any, rel_tol: float = 1e-3, hint: str = "") -> bool | None:
    """Display whether ``answer`` matches ``expected``; returns True/False, or None when not answered."""
    from IPython.display import Markdown, display

    if not 0 <= rel_tol < 1:
        raise ValueError(f"rel_tol must be in [0, 1), got {rel_tol}")
    if answer is None:
        display(Markdown(f"*{label}*: not answered yet. Set the answer above and run this cell again."))
        return None
    ok = _agree(answer, expected, rel_tol)
    if ok:
        display(Markdown(f"*{label}*: **right**."))
        return True
    direction = ""
    if isinstance(expected, (int, float)) and not isinstance(expected, bool):
        try:
            direction = " (too high)" if float(answer) > float(expected) else " (too low)"
        except (TypeError, ValueError):
            direction = ""
    display(Markdown(f"*{label}*: **not quite**{direction}." + (f" Hint: {hint}" if hint else "")))
    return False


__all__ = ["check"]
