"""Rule-based rewards: never raise, always in [0, 1], and follow the documented rules."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from workbench.tasks import get_task, task_names
from workbench.tasks.rewards import TAGS, accuracy_reward, extract_answer, extract_think, format_reward

# strings built from the tags and the characters the tasks care about hit the interesting cases far
# more often than uniform text does
_pieces = st.sampled_from([*TAGS, " ", "\n", "\t", "8", "5", "-", "+", "*", "(", ")", "1 2", "=", "x", "<", ">", "/"])
tagged_text = st.lists(_pieces, max_size=30).map("".join)
any_text = st.one_of(st.text(max_size=200), tagged_text, st.binary(max_size=50).map(lambda b: b.decode("latin-1")))


@settings(max_examples=400, deadline=None)
@given(any_text)
def test_format_and_answer_never_raise(text):
    f = format_reward(text)
    assert f in (0.0, 1.0)
    answer = extract_answer(text)
    assert answer is None or isinstance(answer, str)
    extract_think(text)


@settings(max_examples=300, deadline=None)
@given(text=any_text, name=st.sampled_from(task_names()))
def test_task_rewards_in_unit_interval_for_any_string(text, name):
    task = get_task(name)
    example = task.sample(1, seed=1)[0]
    for completion in (text, f"<think>{text}</think><answer>{text}</answer>", f"<answer>{text}</answer>"):
        r = task.reward(completion, example)
        assert set(r) >= {"accuracy", "format"}
        assert all(isinstance(v, float) and 0.0 <= v <= 1.0 for v in r.values())


def test_format_accepts_the_r1_layout_with_whitespace():
    assert format_reward("<think>7 + 8 = 15</think><answer>15</answer>") == 1.0
    assert format_reward("  \n<think>\nsteps\n</think>\n\n<answer> 15 </answer>\n ") == 1.0
    assert format_reward("<think>a</think> \t <answer></answer>") == 1.0  # an empty answer is still well formed


@pytest.mark.parametrize(
    "text",
    [
        "",
        "15",
        "<answer>15</answer>",  # no reasoning
        "<think></think><answer>15</answer>",  # blank reasoning does not count
        "<think>   </think><answer>15</answer>",
        "<think>a</think>",  # no answer
        "<answer>15</answer><think>a</think>",  # wrong order
        "so <think>a</think><answer>15</answer>",  # text before
        "<think>a</think><answer>15</answer> and more",  # text after
        "<think>a</think>x<answer>15</answer>",  # text between
        "<think>a</think><answer>15</answer><answer>16</answer>",  # two answers
        "<think>a<think>b</think><answer>15</answer>",  # two thinks
        "<think>a</think></think><answer>15</answer>",
        "<think>a</think><answer>15",  # unclosed
        "<THINK>a</THINK><ANSWER>15</ANSWER>",  # tags are case-sensitive
    ],
)
def test_format_rejects(text):
    assert format_reward(text) == 0.0


def test_extract_answer_takes_the_last_complete_block_stripped():
    assert extract_answer("<answer> 8 5 \n</answer>") == "8 5"
    assert extract_answer("<answer>1</answer> then <answer>2</answer>") == "2"
    assert extract_answer("<answer>1</answer><answer>2") == "1"  # the unclosed one is not an answer
    assert extract_answer("<answer>1<answer>2</answer>") == "2"
    assert extract_answer("</answer><answer>") is None
    assert extract_answer("no tags") is None
    assert extract_answer("<answer></answer>") == ""


def test_accuracy_does_not_need_the_format_but_needs_an_answer():
    add = get_task("add")
    ex = add.sample(1, seed=0)[0]
    a, b = ex.data["a"], ex.data["b"]
    right = str(a + b)
    assert add.reward(f"<answer>{right}</answer>", ex) == {"accuracy": 1.0, "format": 0.0}
    assert add.reward(f"<think>x</think><answer>{right}</answer>", ex) == {"accuracy": 1.0, "format": 1.0}
    assert add.reward(f"<think>x</think><answer>{a + b + 1}</answer>", ex) == {"accuracy": 0.0, "format": 1.0}
    assert add.reward(right, ex)["accuracy"] == 0.0  # a bare number is not an answer
    # hedging does not pay: only the last answer counts
    assert add.reward(f"<answer>{right}</answer><answer>0</answer>", ex)["accuracy"] == 0.0


def test_accuracy_reward_survives_a_raising_verifier():
    def broken(_text: str) -> bool:
        raise RuntimeError("bug")

    assert accuracy_reward("<answer>1</answer>", broken) == 0.0
