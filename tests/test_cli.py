"""The command line: every command explains itself, trains, resumes, generates, and refuses bad input."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from workbench.cli import main


@pytest.mark.parametrize("command", ["train", "generate", "info", "demo"])
def test_help_explains_every_command(command, capsys):
    with pytest.raises(SystemExit) as exit_:
        main([command, "--help"])
    assert exit_.value.code == 0
    text = capsys.readouterr().out
    assert "--" in text and len(text) > 300


def test_module_entry_point_runs():
    out = subprocess.run([sys.executable, "-m", "workbench", "--help"], capture_output=True, text=True, check=True)
    assert "train" in out.stdout and "generate" in out.stdout


def test_info_reports_the_671b_model(capsys):
    assert main(["info", "--preset", "deepseek-v3"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert round(report["params"]["total"] / 1e9, 2) == 671.03


def test_train_then_resume_then_generate(tmp_path, capsys):
    run = tmp_path / "run"
    args = [
        "train",
        "--preset",
        "tiny",
        "--steps",
        "4",
        "--batch-size",
        "2",
        "--seq-len",
        "32",
        "--n-docs",
        "200",
        "--out",
        str(run),
        "--no-progress",
        "--device",
        "cpu",
        "--eval-every",
        "2",
    ]
    assert main([*args, "--stop-at", "2"]) == 0
    assert main([*args, "--resume", "--export", str(tmp_path / "hf")]) == 0
    lines = (run / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["step"] for x in lines] == [1, 2, 3, 4]
    assert (tmp_path / "hf" / "config.json").exists()
    capsys.readouterr()
    assert (
        main(
            [
                "generate",
                "--checkpoint",
                str(run),
                "--prompt",
                "Problem: 12 + 7",
                "--max-new-tokens",
                "5",
                "--device",
                "cpu",
                "--speculative",
            ]
        )
        == 0
    )
    assert capsys.readouterr().out.startswith("Problem: 12 + 7")


def test_bad_input_is_refused_with_a_clear_message(tmp_path, capsys):
    assert main(["train", "--out", str(tmp_path), "--set", "n_group=3", "--steps", "1"]) == 2
    err = capsys.readouterr().err
    assert "n_group" in err and "divisible" in err
    assert main(["train", "--out", str(tmp_path), "--set", "nonsense=1"]) == 2
    assert "unknown config field" in capsys.readouterr().err
    assert main(["generate", "--checkpoint", str(tmp_path / "missing"), "--prompt", "x"]) == 2
    assert "no model at" in capsys.readouterr().err
    assert not (tmp_path / "checkpoint").exists()


class _Captured(Exception):
    pass


@pytest.mark.parametrize(
    "argv",
    [["train", "--out", "{tmp}/t"], ["info", "--preset", "tiny"], ["grpo", "--out", "{tmp}/g"],
     ["sft", "--out", "{tmp}/s"], ["distill", "--out", "{tmp}/d", "--teacher", "data/tiny-model"]],
)  # fmt: skip
@pytest.mark.parametrize("spelling", ["True", "true", "1", "yes"])
def test_set_means_the_same_in_every_command(argv, spelling, tmp_path, monkeypatch):
    """--set fp8=True gives the boolean True to every command's model config (it once gave the string 'True')."""
    import workbench.rl.base as rl_base
    from workbench.config import ModelConfig

    seen = []
    real_preset = ModelConfig.from_preset.__func__

    def capture_preset(cls, name, **overrides):
        seen.append(overrides)
        raise _Captured

    def capture_rl(preset, **overrides):
        seen.append(overrides)
        raise _Captured

    monkeypatch.setattr(ModelConfig, "from_preset", classmethod(capture_preset))
    monkeypatch.setattr(rl_base, "rl_model_config", capture_rl)
    root = Path(__file__).resolve().parent.parent
    args = [
        a.replace("{tmp}", str(tmp_path)).replace("data/tiny-model", str(root / "data" / "tiny-model")) for a in argv
    ]
    with pytest.raises(_Captured):
        main([*args, "--set", f"fp8={spelling}", "--device", "cpu"] if args[0] != "info" else
             [*args, "--set", f"fp8={spelling}"])  # fmt: skip
    assert seen and seen[-1]["fp8"] is True
    assert real_preset(ModelConfig, "tiny", **seen[-1]).fp8 is True
