"""The ``vertical`` command: grow a trained MoE by new experts and teach only them a new domain."""

from __future__ import annotations

import argparse
import json

from workbench.cli.args import finite_number, non_negative_int, positive_int


def cmd_vertical(args: argparse.Namespace) -> int:
    from workbench.vertical import run_vertical

    report = run_vertical(
        args.base,
        args.task,
        args.out,
        replay_task=None if args.replay_task == "corpus" else args.replay_task,
        scale=args.scale,
        n=args.n,
        layers=args.layers,
        init=args.init,
        old_rate=args.old_rate,
        steps=args.steps,
        replay=args.replay,
        lr=args.lr,
        grpo_steps=args.grpo_steps,
        seed=args.seed,
        device=args.device,
        overwrite=args.overwrite,
        progress=not args.no_progress,
    )
    print(json.dumps(report["summary"], indent=2))
    return 0


def add_subcommand(sub) -> None:
    v = sub.add_parser(
        "vertical",
        help="grow a trained MoE by new experts and train only them on a new domain",
        description=(
            "Add experts to every MoE layer of a trained model (workbench.vertical), wake them for the new domain, "
            "train only them (and their router rows, and the rows of tokens the base never saw) on the task's worked "
            "problems mixed with replay of the base corpus, then optionally GRPO restricted to the same parameters. "
            "Writes OUT/model (a Hugging Face folder with vertical.json) and OUT/report.json."
        ),
    )
    v.add_argument("--base", help="the trained model to grow (default: pre-train the R1 base of --replay-task)")
    v.add_argument("--task", default="sub", help="the new domain, a task of workbench.tasks (default: sub)")
    v.add_argument(
        "--replay-task",
        default="add",
        help="the task the base knows (its documents are replayed and its accuracy watched); 'corpus' for a "
        "five-domain model such as data/tiny-model (default: add)",
    )
    v.add_argument("--scale", default="laptop", help="scale of the base pre-training when --base is not given")
    v.add_argument("--out", default="runs/vertical", help="output folder (default: runs/vertical)")
    v.add_argument(
        "--n", type=positive_int, default=None, help="new experts per layer (default: 2 x n_group, two per group)"
    )
    v.add_argument(
        "--layers", type=non_negative_int, nargs="+", help="MoE layers to grow (default: all of the main model)"
    )
    v.add_argument("--init", default="copy", choices=["copy", "average", "random"], help="initialisation")
    v.add_argument("--old-rate", type=finite_number, default=0.05, help="forgetting budget at wake-up: the share of "
                   "old-domain tokens allowed onto the new experts (default: 0.05)")  # fmt: skip
    v.add_argument(
        "--steps", type=positive_int, default=3000, help="cold-start steps on the new domain (default: 3000)"
    )
    v.add_argument(
        "--replay", type=finite_number, default=0.75, help="share of replayed old-domain tokens (default: 0.75)"
    )
    v.add_argument("--lr", type=finite_number, default=3e-3, help="learning rate of the LM stage (default: 3e-3)")
    v.add_argument(
        "--grpo-steps", type=non_negative_int, default=20, help="GRPO steps after the cold start (default: 20)"
    )
    v.add_argument("--seed", type=int, default=0)
    v.add_argument("--device", default="auto", help="auto, cpu or cuda (default: auto)")
    v.add_argument("--overwrite", action="store_true", help="replace OUT/model if it exists")
    v.add_argument("--no-progress", action="store_true", help="no progress bar")
    v.set_defaults(func=cmd_vertical)
