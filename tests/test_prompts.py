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
