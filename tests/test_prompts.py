"""Prompt sets (YAML/JSON) and ``python -m workbench ask``: validated up front, run, thinking and answer shown."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from workbench.cli import main
from workbench.io.hf import load_hf
from workbench.serve.prompts import PromptSetError, format_rows, load_prompt_set, run_prompt_set
from workbench.vertical import add_expert, save_vertical

ROOT = Path(__file__).resolve().parent.parent
TINY = ROOT / "data" / "tiny-model"
SUBTRACTION = ROOT / "data" / "prompts" / "subtraction.yaml"


def _write(tmp_path: Path, data, name: str = "set.json") -> Path:
    path = tmp_path / name
    path.write_text(json.dumps(data) if name.endswith(".json") else data)
    return path


def test_the_shipped_subtraction_set_loads_and_renders_digits():
    s = load_prompt_set(SUBTRACTION)
    assert s.name == "subtraction" and s.task == "sub" and s.defaults["temperature"] == 0.0
    (p,) = s.select(["subtract"])
    assert p.render({"a": 87, "b": 35}) == "What is 8 7 - 3 5?"  # exactly the task's own question
    assert [x["expect"] for x in p.inputs][:2] == [52, 45]
    assert s.check("5 2", 52) is True and s.check("52", 52) is True and s.check("5 3", 52) is False
    assert s.check(None, 52) is False and s.check("5 2", None) is None
    with pytest.raises(PromptSetError, match="no prompt named"):
        s.select(["divide"])


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ([], "top level must be a mapping"),
        ({"name": "x"}, "missing 'prompts'"),
        ({"name": "x", "prompts": [], "extra": 1}, "unknown key"),
        ({"name": "x", "prompts": []}, "non-empty list"),
        ({"name": "x", "task": "latin", "prompts": [{"name": "a", "template": "t"}]}, "unknown task 'latin'"),
        ({"name": "x", "prompts": [{"name": "a"}]}, "'name' and 'template' must both be strings"),
        ({"name": "x", "prompts": [{"name": "a", "template": "{n}", "inputs": [{"m": 1}]}]}, r"inputs\[0\] lacks"),
        ({"name": "x", "prompts": [{"name": "a", "template": "t"}, {"name": "a", "template": "u"}]}, "used twice"),
        ({"name": "x", "defaults": {"temperature": "hot"}, "prompts": [{"name": "a", "template": "t"}]}, "not a float"),
        ({"name": "x", "defaults": {"beam": 4}, "prompts": [{"name": "a", "template": "t"}]}, "unknown default"),
        ({"name": "x", "prompts": [{"name": "a", "template": "{n"}]}, "bad template"),
    ],
)
def test_bad_prompt_sets_are_refused_with_where_and_why(tmp_path, data, message):
    with pytest.raises(PromptSetError, match=message):
        load_prompt_set(_write(tmp_path, data))


def test_yaml_errors_and_wrong_suffix(tmp_path):
    with pytest.raises(PromptSetError, match="not valid YAML"):
        load_prompt_set(_write(tmp_path, "name: [unclosed", "bad.yaml"))
    with pytest.raises(PromptSetError, match=r"\.yaml, \.yml or \.json"):
        load_prompt_set(_write(tmp_path, "name: x", "set.txt"))
    with pytest.raises(FileNotFoundError):
        load_prompt_set(tmp_path / "missing.yaml")


def test_run_prompt_set_shows_thinking_and_answer():
    s = load_prompt_set(SUBTRACTION)
    model = load_hf(TINY)
    rows = run_prompt_set(model, s, max_new_tokens=8)
    assert [(r["prompt"], r["inputs"]["a"]) for r in rows] == [("subtract", a) for a in (87, 69, 93, 58, 44)] + [
        ("add", 47), ("add", 19)]  # fmt: skip
    for r in rows:
        assert r["question"].startswith("What is ") and r["correct"] in (True, False)
        assert r["answer"] is None or isinstance(r["answer"], str)
    one = run_prompt_set(model, s, names=["subtract"], overrides={"a": 71, "b": 28}, max_new_tokens=4)
    assert len(one) == 1 and one[0]["question"] == "What is 7 1 - 2 8?" and one[0]["correct"] is None
    text = format_rows(rows)
    assert "thinking:" in text and "answer:" in text and "[subtract a=87 b=35] What is 8 7 - 3 5?" in text


def test_ask_command_runs_a_grown_model(tmp_path, capsys):
    grown, added = add_expert(load_hf(TINY), n=2)
    save_vertical(grown, added, tmp_path / "model")
    data = {
        "name": "t",
        "model": "model",  # relative to the file
        "task": "sub",
        "defaults": {"max_new_tokens": 6},
        "prompts": [{"name": "subtract", "template": "What is {a:digits} - {b:digits}?", "inputs": [{"a": 9, "b": 5}]}],
    }
    path = _write(tmp_path, data)
    assert main(["ask", "--prompts", str(path)]) == 0
    out = capsys.readouterr().out
    assert "[subtract a=9 b=5] What is 9 - 5?" in out and "thinking:" in out
    assert main(["ask", "--prompts", str(path), "--set", "a=12", "--set", "b=3", "--json"]) == 0
    row = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert row["question"] == "What is 1 2 - 3?" and "thinking" in row
    assert main(["ask", "--prompts", str(path), "--name", "nope"]) == 2
    assert "no prompt named ['nope']" in capsys.readouterr().err
    del data["model"]
    assert main(["ask", "--prompts", str(_write(tmp_path, data))]) == 2
    assert "pass --model" in capsys.readouterr().err


# ---- hardening: what a server reading these files at start must survive ---------------------------------
PROMPT = {"name": "a", "template": "{n}", "inputs": [{"n": 1}]}


def test_only_regular_files_of_bounded_size_are_read(tmp_path):
    import os

    from workbench.serve import prompts as P

    folder = tmp_path / "set.yaml"
    folder.mkdir()
    with pytest.raises(PromptSetError, match="is a directory"):
        load_prompt_set(folder)
    fifo = tmp_path / "pipe.yaml"
    os.mkfifo(fifo)  # nobody writes to it: a blocking open would hang the test forever
    with pytest.raises(PromptSetError, match="not a regular file"):
        load_prompt_set(fifo)
    big = tmp_path / "big.json"
    big.write_text(json.dumps({"name": "x", "prompts": [PROMPT], "description": "d" * P.MAX_FILE_BYTES}))
    with pytest.raises(PromptSetError, match="bytes; a prompt set is at most"):
        load_prompt_set(big)


def test_yaml_alias_bombs_and_deep_nesting_are_refused(tmp_path):
    lines = ['a0: &a0 ["x", "x", "x", "x", "x", "x", "x", "x", "x", "x"]']
    lines += [f"a{i}: &a{i} [*a{i - 1}, *a{i - 1}, *a{i - 1}, *a{i - 1}, *a{i - 1}]" for i in range(1, 12)]
    bomb = "\n".join(lines) + "\nname: x\nprompts: [{name: a, template: t}]\n"
    with pytest.raises(PromptSetError, match="expands to more than"):
        load_prompt_set(_write(tmp_path, bomb, "bomb.yaml"))
    deep = "name: x\nprompts: [{name: a, template: t}]\ndescription: " + "[" * 200 + "]" * 200 + "\n"
    with pytest.raises(PromptSetError, match="nested deeper than"):
        load_prompt_set(_write(tmp_path, deep, "deep.yaml"))
    deep_json = '{"name": "x", "prompts": [], "description": ' + "[" * 100_000 + "]" * 100_000 + "}"
    (tmp_path / "deep.json").write_text(deep_json)
    with pytest.raises(PromptSetError, match="nested deeper than"):
        load_prompt_set(tmp_path / "deep.json")
    shallow_but_deep = '{"name": "x", "prompts": [], "description": ' + "[" * 40 + "]" * 40 + "}"
    (tmp_path / "deep40.json").write_text(shallow_but_deep)  # parses, then the depth check refuses it
    with pytest.raises(PromptSetError, match="nested deeper than"):
        load_prompt_set(tmp_path / "deep40.json")


@pytest.mark.parametrize(
    ("template", "message"),
    [
        ("What is {}?", "positional field"),
        ("What is {0}?", "positional field"),
        ("What is {n.real}?", "plain name"),
        ("What is {n[0]}?", "plain name"),
        ("What is {n:>999999999}?", "a width of 999999999 is too large"),
        ("What is {n:.100000f}?", "a precision of 100000 is too large"),
        ("What is {n:{w}}?", "nested fields"),
        ("What is {n!x}?", "conversion"),
        ("What is {n", "malformed braces"),
        ("What is {n:bogus}?", "is not a format spec"),
    ],
)
def test_templates_are_checked_at_load_naming_the_file_and_prompt(tmp_path, template, message):
    path = _write(tmp_path, {"name": "x", "prompts": [{"name": "ask", "template": template, "inputs": [{"n": 5}]}]})
    with pytest.raises(PromptSetError, match=message) as err:
        load_prompt_set(path)
    assert str(path) in str(err.value) and "(ask)" in str(err.value)


def test_values_the_template_cannot_take_are_found_at_load_and_in_requests(tmp_path):
    from workbench.serve.prompts import PromptInputError

    path = _write(
        tmp_path, {"name": "x", "prompts": [{"name": "ask", "template": "{n:digits}", "inputs": [{"n": "x"}]}]}
    )
    with pytest.raises(PromptSetError, match=r"inputs\[0\].*digits"):
        load_prompt_set(path)
    s = load_prompt_set(_write(tmp_path, {"name": "x", "prompts": [PROMPT]}))
    (p,) = s.prompts
    with pytest.raises(PromptInputError, match="remove") as err:
        p.render({"n": 1, "m": 2}, strict=True)
    assert err.value.field == "m"
    with pytest.raises(PromptInputError, match="needs") as err:
        p.render({}, strict=True)
    assert err.value.field == "n"
    with pytest.raises(PromptInputError, match="must be a string, a number or a boolean"):
        p.render({"n": [1, 2]}, strict=True)
    with pytest.raises(PromptInputError, match="characters"):
        p.render({"n": "y" * 20_000}, strict=True)
