"""The grpo / sft / distill commands: complete --help, and tiny end-to-end runs that write their files."""

from __future__ import annotations

import argparse
import json

import pytest

from workbench.cli.rl import add_subcommands


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m workbench")
    add_subcommands(p.add_subparsers(dest="command", required=True))
    return p


@pytest.mark.parametrize(
    ("command", "flags"),
    [
        (
            "grpo",
            [
                "--variant",
                "--group-size",
                "--inner-steps",
                "--beta",
                "--clip-eps-high",
                "--loss-agg",
                "--no-scale-rewards",
                "--drop-uniform-groups",
                "--checkpoint",
                "--think-fraction",
                "--eval-every",
            ],
        ),
        ("sft", ["--data", "--checkpoint", "--n-examples", "--samples-per-prompt", "--keep-per-prompt"]),
        ("distill", ["--teacher", "--student", "--mode", "--n-prompts", "--temperature", "--ce-weight"]),
    ],
)
def test_help_lists_every_flag(command, flags, capsys):
    with pytest.raises(SystemExit) as exit_info:
        _parser().parse_args([command, "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for flag in [*flags, "--task", "--out", "--seed", "--device", "--eval-temperature"]:
        assert flag in text, (command, flag)


def test_variant_flags_override_single_switches():
    args = _parser().parse_args(["grpo", "--out", "x", "--variant", "dapo", "--beta", "0.01", "--no-scale-rewards"])
    assert args.variant == "dapo" and args.beta == 0.01 and args.scale_rewards is False
    assert args.drop_uniform_groups is None  # not given: the variant decides


_TINY = ["--set", "hidden_size=32", "--set", "num_hidden_layers=1", "--set", "first_k_dense_replace=1",
         "--set", "intermediate_size=64", "--base-steps", "3", "--eval-problems", "4", "--eval-samples", "2",
         "--max-new-tokens", "8", "--no-progress", "--device", "cpu"]  # fmt: skip


def test_grpo_then_sft_then_distill_write_their_runs(tmp_path):
    p = _parser()
    g = tmp_path / "grpo"
    args = p.parse_args(
        ["grpo", "--out", str(g), "--steps", "2", "--prompts-per-step", "2", "--group-size", "2", *_TINY]
    )
    assert args.func(args) == 0
    report = json.loads((g / "report.json").read_text())
    assert {"before", "after", "config"} <= set(report)
    rows = [json.loads(line) for line in (g / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    for key in ("reward", "accuracy", "format", "response_length", "kl", "clip_frac", "entropy"):
        assert key in rows[0]
    assert (g / "model" / "config.json").exists() and (g / "base" / "config.json").exists()

    s = tmp_path / "sft"
    args = p.parse_args(["sft", "--out", str(s), "--checkpoint", str(g / "model"), "--n-examples", "8",
                         "--steps", "2", "--batch-size", "4", *_TINY])  # fmt: skip
    assert args.func(args) == 0
    assert json.loads((s / "report.json").read_text())["pairs"] == 8

    d = tmp_path / "distill"
    args = p.parse_args(["distill", "--out", str(d), "--teacher", str(s / "model"), "--student", str(g / "model"),
                         "--mode", "logits", "--n-prompts", "4", "--steps", "2", *_TINY])  # fmt: skip
    # an untrained teacher solves nothing: the command says so instead of training on nothing
    with pytest.raises(ValueError, match="teacher solved none"):
        args.func(args)


def test_rejection_sft_needs_a_checkpoint(tmp_path):
    args = _parser().parse_args(["sft", "--out", str(tmp_path), "--data", "rejection", *_TINY])
    with pytest.raises(ValueError, match="--checkpoint"):
        args.func(args)
