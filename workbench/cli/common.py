"""What every command shares: finding a model folder, the run-folder flags and their guard, reports."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from workbench.cli.args import parse_sets
from workbench.config import ModelConfig

FORMATTER = argparse.RawDescriptionHelpFormatter


def model_dir(path: str | Path) -> Path:
    """A Hugging Face folder, or a run folder holding one as ``model/`` or ``checkpoint/model``."""
    p = Path(path)
    for candidate in (p, p / "model", p / "checkpoint" / "model"):
        if (candidate / "config.json").is_file():
            return candidate
    if p.exists() and not p.is_dir():
        raise FileNotFoundError(f"{path} is a file, not a model folder; give the folder that holds config.json")
    raise FileNotFoundError(f"no model at {path}: expected config.json there, in model/ or in checkpoint/model/")


def load_model(path: str | Path, device: str = "auto"):
    from workbench.io.hf import load_hf
    from workbench.util import resolve_device

    return load_hf(model_dir(path), device=resolve_device(device))


def add_run_flags(p: argparse.ArgumentParser, *, out_required: bool = True, out_default: str | None = None) -> None:
    """``--out``, ``--resume``, ``--overwrite``, ``--no-progress``: the run folder and how it may be used."""
    p.add_argument(
        "--out",
        required=out_required,
        default=out_default,
        help="run folder" + (f" (default: {out_default})" if out_default else ""),
    )
    g = p.add_mutually_exclusive_group()
    g.add_argument("--resume", action="store_true", help="continue the run in OUT from its newest checkpoint, exactly")
    g.add_argument("--overwrite", action="store_true", help="start afresh in OUT, replacing the run it holds")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def claim_out(args: argparse.Namespace, command: str) -> str:
    """Check, before any work, that OUT may be used as asked (``train.run.RunFolder.claim``), then mark it
    as a run of ours so that the command's other outputs (a base model, a report) may be written there."""
    from workbench.train.run import RunFolder

    run = RunFolder(args.out)
    plan = run.claim(resume=args.resume, overwrite=args.overwrite)
    if plan == "fresh":
        run.open()
        run.mark({"command": command})
    return plan


def add_model_flags(p: argparse.ArgumentParser, *, default_preset: str = "tiny", what: str = "the model") -> None:
    presets = ", ".join(ModelConfig.preset_names())
    p.add_argument("--preset", default=default_preset, help=f"size of {what}: {presets} (default: %(default)s)")
    example = "e.g. --set n_routed_experts=16 (repeatable)"
    p.add_argument("--set", action="append", metavar="FIELD=VALUE", help=f"a ModelConfig field of {what}, {example}")


def model_config_from(args: argparse.Namespace, **extra: Any) -> ModelConfig:
    return ModelConfig.from_preset(args.preset, **{**parse_sets(args.set, ModelConfig), **extra})


def write_report(out: str | Path, report: dict[str, Any]) -> Path:
    from workbench.atomic import atomic_write_text

    path = Path(out) / "report.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(report, indent=2, default=str) + "\n")
    return path


__all__ = [
    "FORMATTER",
    "add_model_flags",
    "add_run_flags",
    "claim_out",
    "load_model",
    "model_config_from",
    "model_dir",
    "write_report",
]
