"""Every scan of untrusted text is linear: ten times the input costs about ten times the time, not a hundred.

No absolute time is asserted (machines differ): each check times the same scan on an input of n and of
10 n characters in one run, takes the best of a few repeats, and requires the ratio to stay below
``BOUND`` = 35 (linear: about 10; quadratic: about 100). The large input runs under a timer, so a
quadratic regression fails in seconds instead of hanging. The hostile shapes are those that made the
earlier step pattern of ``rl.aha`` backtrack (40,000 spaces took 20 s there).
"""

from __future__ import annotations

import re
import time

import pytest
from bad_input_sweep import Hung, time_limit
from hypothesis import given, settings
from hypothesis import strategies as st

from workbench.data.text_files import _chunk_text
from workbench.rl.aha import _CLAUSE_SPLIT, patterns_in, steps_of
from workbench.tasks import parse_expression, parse_int, parse_roman
from workbench.tasks.rewards import extract_answer, format_reward

BOUND = 35.0


def _best(fn, text: str, repeats: int) -> float:
    """The fastest of up to ``repeats`` runs (fewer once a second has been spent)."""
    best, spent = float("inf"), 0.0
    for _ in range(repeats):
        start = time.perf_counter()
        fn(text)
        took = time.perf_counter() - start
        best, spent = min(best, took), spent + took
        if spent > 1.0:
            break
    return best


def assert_linear(fn, make, n: int) -> None:
    small, large = make(n), make(10 * n)
    try:
        with time_limit(10.0):  # a linear scan of n characters takes milliseconds
            fn(small)  # warm up (compiled patterns, caches)
            t_small = max(_best(fn, small, 5), 1e-4)
        with time_limit(min(60.0, max(3.0, 3 * BOUND * t_small))):  # the large run may take 3x the bound
            t_large = _best(fn, large, 3)
    except Hung as e:
        pytest.fail(f"not linear: {e}")
    assert t_large / t_small < BOUND, f"{t_small:.4f}s -> {t_large:.4f}s for 10x the input"


AHA_SHAPES = {
    "'1+1 =' then spaces": lambda n: "1+1 =" + " " * n + "x",
    "'1', spaces, '='": lambda n: "1" + " " * n + "=",
    "'1+' then spaces": lambda n: "1+" + " " * n + "x",
    "'(' repeated, then '= 1'": lambda n: "(" * n + "= 1",
    "'1 + ' repeated": lambda n: "1 + " * (n // 4) + "= x",
    "'<answer>' repeated": lambda n: "<answer>" * (n // 8),
    "'= 1 ' repeated": lambda n: "= 1 " * (n // 4),
    "steps separated by commas": lambda n: "1 + 1 = 2, " * (n // 11),
}


@pytest.mark.parametrize("shape", list(AHA_SHAPES))
def test_the_aha_search_is_linear(shape):
    make = AHA_SHAPES[shape]
    assert_linear(lambda s: patterns_in(s, s), make, 20_000)


_OLD_STEP = re.compile(r"(?P<lhs>[0-9(][0-9\s+\-*/()]*?)\s*=\s*(?P<rhs>-?\s*[0-9][0-9\s]*)")  # quadratic


def _old_steps_of(text: str) -> list[tuple[str, str]]:
    """The earlier, backtracking implementation (fine on short strings): the reference for the rewrite."""
    out = []
    for clause in _CLAUSE_SPLIT.split(text):
        m = _OLD_STEP.fullmatch(clause.strip())
        if m and any(op in m["lhs"] for op in "+-*/"):
            out.append((re.sub(r"\s+", "", m["lhs"]), re.sub(r"\s+", "", m["rhs"])))
    return out


@settings(max_examples=400, deadline=None)
@given(st.text(alphabet="0123456789 +-*/()=.,;:\n\tx\u00a0", max_size=60))
def test_the_linear_steps_of_reads_what_the_backtracking_one_read(text):
    assert steps_of(text) == _old_steps_of(text)


def test_steps_of_reads_every_computation_with_any_whitespace():
    text = "7 +\t3 =  10, carry 1.\n9 + 4 + 1 = 14. (2 + 3) * 4 = 20; 12 = 12. 5 = - 3"
    assert steps_of(text) == [("7+3", "10"), ("9+4+1", "14"), ("(2+3)*4", "20")]
    assert steps_of("1 + 1 = 2 = 2") == [] and steps_of("= 3") == [] and steps_of("a + 1 = 2") == []


def test_splitting_a_long_paragraph_is_linear():
    """One paragraph without blank lines (a log, a minified file) is cut into chunks walking an index; the
    earlier loop copied the rest of the paragraph for every chunk."""
    assert_linear(lambda s: _chunk_text(s, 2000), lambda n: "word " * (n // 5), 1_000_000)
    assert_linear(lambda s: _chunk_text(s, 2000), lambda n: "x" * n, 1_000_000)  # no space to cut at


@pytest.mark.parametrize(
    "fn, make",
    [(format_reward, lambda n: "<think>a</think><answer>1</answer>" + " " * n + "x"),
     (format_reward, lambda n: "<think>" + " " * n),
     (extract_answer, lambda n: "<answer>" * (n // 8) + "</answer>"),
     (parse_int, lambda n: " 1" * (n // 2)),
     (parse_roman, lambda n: "M " * (n // 2)),
     (parse_expression, lambda n: "(" * n)],
    ids=["format_reward trailing spaces", "format_reward open think", "extract_answer", "parse_int", "parse_roman",
         "parse_expression"],
)  # fmt: skip
def test_rewards_and_parsers_are_linear(fn, make):
    assert_linear(fn, make, 100_000)
