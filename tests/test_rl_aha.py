"""The "aha moment" search: each pattern on hand-written completions, references, and the task's own traces."""

from __future__ import annotations

import pytest

from workbench.rl.aha import PATTERNS, aha_search, aha_table, patterns_in, steps_of
from workbench.tasks import Example, get_task, spell

TRACE = "<think>7 + 3 = 10, carry 1. 9 + 4 + 1 = 14.</think><answer>1 4 0</answer>"


def test_steps_of_reads_every_computation():
    assert steps_of(TRACE) == [("7+3", "10"), ("9+4+1", "14")]
    sub = "<think>3 - 8 < 0, 13 - 8 = 5, borrow 1. 4 - 1 - 2 = 1.</think>"
    assert steps_of(sub) == [("13-8", "5"), ("4-1-2", "1")]
    assert steps_of("<think>17 + 6 = 23. 23 * 11 = 253.</think>") == [("17+6", "23"), ("23*11", "253")]
    assert steps_of("no numbers here = 5, and 12 = 12.") == []  # no operator on the left: not a step


def test_a_clean_trace_shows_nothing():
    assert patterns_in(TRACE) == set()


@pytest.mark.parametrize(
    "text, expected",
    [
        ("<think>7 + 3 = 10. Wait, 9 + 4 + 1 = 14.</think><answer>1 4 0</answer>", {"wait"}),
        ("<think>Let me check: 7 + 3 = 10.</think><answer>1 0</answer>", {"let me", "check"}),
        ("<think>I verified it.</think>", {"check"}),
        ("<think>Hmm, again.</think>", {"hmm", "again"}),
        ("<think>Oops, that was wrong.</think>", {"mistake"}),
        ("<think>7 + 3 = 10. 7 + 3 = 10.</think><answer>1 0</answer>", {"recomputed step"}),
        ("<think>7 + 3 = 11. 7 + 3 = 10.</think><answer>1 0</answer>", {"changed step"}),
        ("<think>7 + 3 = 10.</think><think>again</think><answer>1 0</answer>", {"several thinks", "again"}),
        ("<think>x</think><answer>1 0</answer><answer>1 0</answer>", {"several answers"}),
        ("<think>x</think><answer>1 1</answer><answer>1 0</answer>", {"several answers", "changed answer"}),
        # sampling stops at the first </answer>: a second answer follows an unclosed first one
        ("<think>x</think><answer>1 0 2.</think><answer>5 0</answer>", {"several answers", "changed answer"}),
        ("<think>x</think><answer>5 0<answer> 5 0</answer>", {"several answers"}),
        ("<think>waiter checkout</think>", {"check"}),  # "check" is a prefix match; "wait" needs the whole word
    ],
)
def test_each_pattern(text, expected):
    assert patterns_in(text) == expected


def test_an_answer_is_not_a_step():
    assert steps_of("<answer>8 + 5 = 13</answer>") == [("8+5", "13")]
    assert patterns_in("<think>8 + 5 = 13.</think><answer>8 + 5 = 13</answer>") == set()


def test_references_discount_the_templates_own_repeats():
    task = get_task("add")
    ex = Example("add", "11+11", "What is 1 1 + 1 1?", spell(22), {"a": 11, "b": 11, "op": "+"})
    trace = task.trace(ex)  # e.g. 11 + 11: "1 + 1 = 2. 1 + 1 = 2."
    assert len(steps_of(trace)) == 2 and steps_of(trace)[0] == steps_of(trace)[1]
    assert "recomputed step" in patterns_in(trace)  # without a reference the template looks like a check
    assert patterns_in(trace, reference=trace) == set()
    report = aha_search([trace, trace + trace.replace("<think>", "")], references=[trace, trace])
    assert report.counts["recomputed step"] == 1


def test_the_tasks_own_traces_show_nothing_against_themselves():
    for name in ("add", "arithmetic", "countdown"):
        task = get_task(name)
        traces = [task.trace(ex) for ex in task.sample(200, seed=1)]
        report = aha_search(traces, references=traces)
        assert report.found == [], (name, report.found)


def test_aha_search_counts_and_examples():
    texts = [TRACE, "<think>wait</think>", "<think>Wait. wait!</think>", "<think>WAIT</think>", TRACE]
    report = aha_search(texts, max_examples=2)
    assert report.n == 5 and list(report.counts) == list(PATTERNS)
    assert report.counts["wait"] == 3  # completions, not occurrences
    assert report.examples["wait"] == texts[1:3]
    assert report.rate("wait") == pytest.approx(0.6)
    assert report.found == ["wait"]
    assert aha_search([]).found == [] and aha_search([]).rate("wait") == 0.0
    with pytest.raises(ValueError):
        aha_search(texts, references=[TRACE])
    table = aha_table({"base": report, "trained": aha_search([TRACE])})
    assert "wait" in table and table.splitlines()[0].split() == ["pattern", "base", "trained"]
