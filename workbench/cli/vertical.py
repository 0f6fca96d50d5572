"""The ``vertical`` command: specialise a trained MoE for a new domain with one method of ``workbench.vertical``."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from workbench.util import SHIPPED_DATA


def cmd_vertical(args: argparse.Namespace) -> int:
    import torch

    from workbench.cli.args import config_from_args
    from workbench.io.hf import load_hf
    from workbench.util import resolve_device
    from workbench.vertical import Recipe, describe_row, specialise

    recipe = config_from_args(Recipe, args)  # bad recipes are refused here, before anything is loaded or written
    rows = Path(args.rows) if args.rows else None
    if rows is not None and rows.exists() and not rows.is_file():
        raise FileExistsError(f"--rows {rows} exists and is not a file; give a JSONL file to append to")
    if args.threads is not None:
        if args.threads < 1:
            raise ValueError(f"--threads must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    base = load_hf(args.base, device=resolve_device(recipe.device))
    row, _ = specialise(base, recipe, out=args.out, overwrite=args.overwrite, progress=not args.no_progress)
    row["base"] = str(args.base)
    if rows is not None:
        rows.parent.mkdir(parents=True, exist_ok=True)
        with open(rows, "a", encoding="utf-8") as f:  # one line per run: appending keeps earlier rows whole
            f.write(json.dumps(row, default=str) + "\n")
    print(describe_row(row))
    summary = {k: row[k] for k in ("method", "task", "trained_params", "optimizer_MB", "step_s", "delta_bytes")}
    summary["cold"] = {k: v for k, v in row["cold"].items() if k != "domain_loss"}
    if "grpo" in row:
        summary["grpo"] = {k: v for k, v in row["grpo"].items() if k not in ("domain_loss", "train_acc")}
    print(json.dumps(summary, indent=2))
    return 0


def add_subcommand(sub) -> None:
    from workbench.cli.args import add_config_flags
    from workbench.vertical import Recipe

    v = sub.add_parser(
        "vertical",
        help="specialise a trained MoE for a new domain: full FT, ESFT, new experts, LoRA, or combinations",
        description=(
            "Train one method of workbench.vertical (--method: full, esft_gate, esft_token, newexp, lora, lora_mlp, "
            "lora_exp, or parts joined by '+', e.g. lora+lora_mlp+newexp) on the task's worked problems mixed with "
            "replay of the old task, on the same budget for every method; measure new- and old-task accuracy "
            "(greedy, held out), behind the per-request gate too, and the costs. Writes OUT: a delta folder "
            "(delta.safetensors + delta.json) for every method but full, a model folder for full."
        ),
    )
    default_base = SHIPPED_DATA / "add-base"
    v.add_argument("--base", default=str(default_base), help="the trained model (default: data/add-base)")
    v.add_argument("--out", help="write the delta (or, for full, the model) to this folder (default: nothing)")
    v.add_argument("--overwrite", action="store_true", help="replace OUT if it holds a model or a delta")
    v.add_argument("--rows", help="append the result row (JSON) to this JSONL file (scripts/vertical_compare.py)")
    v.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    v.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_config_flags(v, Recipe, title="recipe (workbench.vertical.Recipe)")
    v.set_defaults(func=cmd_vertical)
