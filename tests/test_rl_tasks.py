"""Tasks: deterministic sampling, disjoint held-out splits, parsers and verifiers, correct traces."""

from __future__ import annotations

from fractions import Fraction

import pytest

from workbench.tasks import (
    Example,
    get_task,
    parse_expression,
    parse_int,
    parse_roman,
    spell,
    split_of_key,
    task_names,
    to_roman,
)
from workbench.tasks.rewards import extract_answer


@pytest.mark.parametrize("name", task_names())
def test_sampling_is_deterministic_and_prefix_stable(name):
    task = get_task(name)
    a = task.sample(50, seed=3)
    assert a == task.sample(50, seed=3)
    assert task.sample(20, seed=3) == a[:20]
    assert a != task.sample(50, seed=4)
    assert len({ex.key for ex in a}) == 50  # distinct problems


@pytest.mark.parametrize("name", task_names())
def test_held_out_split_is_disjoint_from_train_for_any_seeds(name):
    task = get_task(name)
    train = {ex.key for seed in (0, 1) for ex in task.sample(300, seed=seed, split="train")}
    test = {ex.key for seed in (0, 1) for ex in task.sample(150, seed=seed, split="test")}
    assert train and test and not train & test
    assert all(task.split_of(ex) == "test" for ex in task.sample(30, seed=5, split="test"))


def test_split_fraction_is_roughly_right():
    keys = [f"{a}+{b}" for a in range(10, 100) for b in range(10, 100)]
    frac = sum(split_of_key(k, 0.2) == "test" for k in keys) / len(keys)
    assert 0.17 < frac < 0.23


@pytest.mark.parametrize("name", task_names())
def test_traces_are_verified_and_well_formed(name):
    task = get_task(name)
    for ex in task.sample(300, seed=0) + task.sample(100, seed=0, split="test"):
        trace = task.trace(ex)
        assert task.reward(trace, ex) == {"accuracy": 1.0, "format": 1.0}, (ex, trace)
        assert task.reward(task.direct(ex), ex) == {"accuracy": 1.0, "format": 0.0}
        assert task.prompt(ex).endswith("Assistant:")


def test_arithmetic_values_and_column_traces():
    task = get_task("arithmetic")
    for ex in task.sample(300, seed=2):
        a, b, op = ex.data["a"], ex.data["b"], ex.data["op"]
        value = a + b if op == "+" else a - b
        assert value >= 0 and parse_int(ex.answer) == value
        assert parse_int(extract_answer(task.trace(ex))) == value
    ex = next(e for e in task.sample(500, seed=0) if e.data["op"] == "-" and "borrow" in task.trace(e))
    assert "< 0" in task.trace(ex)


def test_parse_int_rules():
    assert parse_int("85") == 85
    assert parse_int(" 8 5 ") == 85  # digits may be written apart
    assert parse_int("-1 2") == -12
    assert parse_int("+7") == 7
    for bad in ("", " ", "8.5", "eighty", "8 5x", "--1", "1" * 31, "١٢"):
        assert parse_int(bad) is None, bad
    assert spell(405) == "4 0 5" and spell(-12) == "-1 2" and parse_int(spell(1087)) == 1087


def test_countdown_verifier_accepts_any_valid_expression():
    task = get_task("countdown")
    ex = next(e for e in task.sample(200, seed=0) if e.data["numbers"] == sorted(e.data["numbers"]))
    x, y, z = ex.data["numbers"]
    ok = task.is_correct
    assert ok(ex.answer, ex)
    # another correct expression for a hand-made problem
    from workbench.tasks import Example

    hand = Example(
        "countdown", "3,7,25->68", "Use 3, 7, 25 to make 68.", "(25 * 3) - 7", {"numbers": [3, 7, 25], "target": 68}
    )
    assert ok("(25 * 3) - 7", hand)
    assert ok("3 * 25 - 7", hand)
    assert ok("25*3-7 = 68", hand)  # a trailing "= N" is ignored
    assert not ok("25 * 3 - 7 + 0", hand)  # 0 is not a given number
    assert not ok("25 * 3 - 7 - 3 + 3", hand)  # numbers used once
    assert not ok("25 * 3", hand)  # every number must be used
    assert not ok("(25 - 7) * 3", hand)  # wrong value
    assert not ok("-7 + 25 * 3", hand)  # no unary minus
    assert not ok("25 ** 3", hand)
    assert not ok("import os", hand)
    assert not ok("", hand)


def test_parse_expression_is_exact_and_safe():
    assert parse_expression("(1 + 2) / 3") == (Fraction(1), [1, 2, 3])
    assert parse_expression("7 / 2") == (Fraction(7, 2), [7, 2])
    assert parse_expression("1 / 0") is None
    assert parse_expression("(" * 30 + "1" + ")" * 30) == (Fraction(1), [1])
    assert parse_expression("(" * 200 + "1" + ")" * 200) is None  # too long
    assert parse_expression("01 + 2") is None
    assert parse_expression("1 + 2 = 3 = 4") == (Fraction(3), [1, 2])


def test_get_task_rejects_unknown_names():
    with pytest.raises(ValueError, match="unknown task"):
        get_task("chess")
    with pytest.raises(ValueError, match="split"):
        get_task("add").sample(3, split="validation")


def test_roman_numerals_round_trip_and_canonical_parsing():
    assert [to_roman(n) for n in (4, 9, 14, 40, 90, 400, 944, 1994, 3999)] == [
        "IV", "IX", "XIV", "XL", "XC", "CD", "CMXLIV", "MCMXCIV", "MMMCMXCIX"]  # fmt: skip
    assert all(parse_roman(" ".join(to_roman(n))) == n for n in range(1, 4000))
    for bad in ("", "IIII", "IC", "VV", "xiv", "XIV?", "MMMM", None, 14):
        assert parse_roman(bad) is None, bad
    task = get_task("roman")
    ex = Example("roman", "305", "Write 305 in Roman numerals.", "C C C V", {"n": 305})
    trace = task.trace(ex)  # place by place, a zero place written empty
    assert trace == "<think> hundreds: 3 = C C C. tens: 0. ones: 5 = V.</think><answer>C C C V</answer>"
    assert task.trace(Example("roman", "40", "", "X L", {"n": 40})).startswith("<think> tens: 4 = X L. ones: 0.")
    assert task.reward(trace, ex) == {"accuracy": 1.0, "format": 1.0}
    assert task.reward("<think>x</think><answer>CCCV</answer>", ex)["accuracy"] == 1.0


def test_recall_copies_and_finds_records_by_key():
    from workbench.tasks.recall import parse_digits

    task = get_task("recall")
    exs = task.sample(400, seed=0)
    kinds = {ex.data["kind"] for ex in exs}
    assert kinds == {"copy", "recall"}
    for ex in exs:
        if ex.data["kind"] == "copy":
            assert ex.question == f"Repeat {ex.answer}."
        else:  # the answer is the value written after the asked key, and keys are distinct
            records = dict(r.split(": ") for r in ex.question.rsplit(". Find ", 1)[0].split("; "))
            assert len(records) == ex.question.count(":") and records[ex.data["key"]] == ex.answer
            assert ex.question.endswith(f"Find {ex.data['key']}.")
    assert parse_digits(" 0 4  7 ") == "0 4 7" and parse_digits("47") is None and parse_digits("") is None
    copy = next(ex for ex in exs if ex.data["kind"] == "copy")
    assert not task.is_correct(copy.answer + " 1", copy) and task.is_correct(f" {copy.answer} ", copy)
    # kept apart from the lookup vertical: other keys, another separator, another question
    lookup = get_task("lookup").sample(50, seed=0)
    assert all("=" not in ex.question and "What is" not in ex.question for ex in exs)
    assert all(" = " in ex.question and ":" not in ex.question for ex in lookup)
