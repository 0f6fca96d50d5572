"""The CI-scale R1-Zero run, for one or more seeds: pre-train the base, run GRPO, print held-out accuracy.

    python scripts/rl_ci_check.py --seeds 0 1 2

This is what ``tests/test_rl_grpo.py`` asserts on; run it to measure the run-to-run noise of the margin.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import torch

from workbench.io.hf import load_hf, save_hf
from workbench.rl.grpo import grpo_train
from workbench.rl.pipeline import get_scale, make_base
from workbench.tasks import get_task


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--task", default="add")
    p.add_argument("--scale", default="ci")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: leave as is)")
    p.add_argument("--out", help="write the results as JSON here")
    p.add_argument("--base-steps", type=int, help="override the scale's base pre-training steps")
    p.add_argument("--think-fraction", type=float, help="override the scale's think fraction")
    p.add_argument("--base-dir", help="cache the pre-trained bases here (base_<seed>/), reuse them when present")
    p.add_argument("--grpo", default="{}", help="GRPOConfig overrides as JSON, e.g. '{\"steps\": 40}'")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    task, scale = get_task(args.task), dataclasses.replace(get_scale(args.scale))
    if args.base_steps:
        scale.base_steps = args.base_steps
    if args.think_fraction is not None:
        scale.think_fraction = args.think_fraction
    scale.grpo = {**scale.grpo, **json.loads(args.grpo)}
    rows = []
    for seed in args.seeds:
        t0 = time.perf_counter()
        cached = Path(args.base_dir) / f"base_{seed}" if args.base_dir else None
        if cached is not None and (cached / "config.json").exists():
            base = load_hf(cached)
        else:
            base = make_base(task, scale, seed=seed, progress=False)
            if cached is not None:
                save_hf(base, cached)
        t1 = time.perf_counter()
        res = grpo_train(base, task, scale.grpo_config(seed=seed), progress=False)
        t2 = time.perf_counter()
        row = {
            "seed": seed,
            "before": res.before["accuracy"],
            "after": res.after["accuracy"],
            "format_before": res.before["format"],
            "format_after": res.after["format"],
            "length_before": res.before["length"],
            "length_after": res.after["length"],
            "reward_first5": sum(r["reward"] for r in res.metrics[:5]) / 5,
            "reward_last5": sum(r["reward"] for r in res.metrics[-5:]) / 5,
            "pretrain_s": round(t1 - t0, 1),
            "grpo_s": round(t2 - t1, 1),
        }
        rows.append(row)
        print(json.dumps(row), flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
