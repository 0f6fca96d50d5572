"""The verticals' tasks: borrow (a new procedure) and lookup (reading by content), their traces, verifiers,
held-out splits and prompt sets."""

from __future__ import annotations

from pathlib import Path

import pytest

from workbench.serve.prompts import load_prompt_set
from workbench.tasks import Example, get_task

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("name", ["borrow", "lookup"])
def test_traces_verify_and_held_out_split_is_large_and_disjoint(name):
    task = get_task(name)
    train = task.sample(400, seed=0, split="train")
    test = task.sample(200, seed=0, split="test")
    assert len({ex.key for ex in test}) == 200  # at least 200 distinct held-out problems
    assert not {ex.key for ex in train} & {ex.key for ex in test}
    for ex in train[:50] + test[:50]:
        assert task.reward(task.trace(ex), ex) == {"accuracy": 1.0, "format": 1.0}
        wrong = task.trace(ex).replace(ex.answer, "1 0 0")
        assert task.reward(wrong, ex)["accuracy"] == 0.0


def test_borrow_always_borrows_in_the_ones_column():
    task = get_task("borrow")
    for ex in task.sample(300, seed=1):
        a, b = ex.data["a"], ex.data["b"]
        assert a % 10 < b % 10 and a // 10 > b // 10 and a - b >= 1
    ex = Example("borrow", "52-27", "What is 5 2 - 2 7?", "2 5", {"a": 52, "b": 27, "op": "-"})
    assert task.prompt(ex) == "User: What is 5 2 - 2 7?\nAssistant:"
    assert task.trace(ex) == "<think>2 - 7 < 0, 12 - 7 = 5, borrow 1. 5 - 1 - 2 = 2.</think><answer>2 5</answer>"


def test_lookup_reads_the_named_record():
    task = get_task("lookup")
    for ex in task.sample(100, seed=2):
        records = dict(r.split(" = ") for r in ex.question.split(". What is")[0].split(", "))
        key = ex.question.rsplit(" ", 1)[1].rstrip("?")
        assert len(records) == 4 and records[key] == ex.answer and ex.data["key"] == key
        assert task.trace(ex) == f"<think>{key} = {ex.answer}.</think><answer>{ex.answer}</answer>"


@pytest.mark.parametrize(("path", "task"), [("borrowing.yaml", "borrow"), ("lookup.yaml", "lookup")])
def test_prompt_sets_render_the_tasks_questions_and_their_expectations_are_right(path, task):
    s = load_prompt_set(ROOT / "data" / "prompts" / path)
    assert s.task == task
    t = get_task(task)
    for p in s.prompts:
        for values in p.inputs:
            question = p.render(values)
            if p.name == "add":
                continue
            if task == "borrow":
                a, b = values["a"], values["b"]
                assert a % 10 < b % 10 and values["expect"] == a - b
            else:
                records = dict(r.split(" = ") for r in question.split(". What is")[0].split(", "))
                assert int(records[values["key"]].replace(" ", "")) == values["expect"]
            assert s.check(" ".join(str(values["expect"])), values["expect"])
            assert t.parse_answer(" ".join(str(values["expect"]))) == values["expect"]
