"""R1-Zero, R1 and distillation end to end at a named scale; prints the before/after tables.

    python scripts/rl_pipeline.py --scale laptop --task add --out runs/rl

Writes OUT/report.json (every stage's held-out evaluation, the rejection-sampling and distillation
statistics, timings) and OUT/<run>/metrics.jsonl per training stage.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from workbench.io.hf import save_hf
from workbench.rl.pipeline import get_scale, make_base, run_distillation, run_r1, run_r1_zero, scale_dict, stage_table
from workbench.tasks import get_task


def _dump(out: Path, name: str, rows: list[dict]) -> None:
    (out / name).mkdir(parents=True, exist_ok=True)
    (out / name / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--scale", default="laptop")
    p.add_argument("--task", default="add")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="runs/rl")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: leave as is)")
    p.add_argument("--skip", nargs="*", default=[], choices=["r1_zero", "r1", "distill"])
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    task, scale = get_task(args.task), get_scale(args.scale)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    report: dict = {"task": task.name, "scale": args.scale, "settings": scale_dict(scale), "seconds": {}}

    def save() -> None:
        (out / "report.json").write_text(json.dumps(report, indent=2, default=str) + "\n")

    t = time.perf_counter()
    base = make_base(task, scale, seed=args.seed)
    report["seconds"]["base"] = time.perf_counter() - t
    save_hf(base, out / "base", overwrite=True)

    if "r1_zero" not in args.skip:
        z = run_r1_zero(task, base, scale, seed=args.seed)
        report["r1_zero"] = {"stages": z["stages"]}
        report["seconds"]["r1_zero"] = z["seconds"]
        _dump(out, "r1_zero_grpo", z["metrics"]["grpo"])
        save_hf(z["model"], out / "r1_zero_model", overwrite=True)
        print("R1-Zero\n" + stage_table(z["stages"]), flush=True)
        save()

    teacher = None
    if "r1" not in args.skip:
        r = run_r1(task, base, scale, seed=args.seed)
        report["r1"] = {"stages": r["stages"], "rejection_sampling": r["rejection_sampling"]}
        report["seconds"]["r1"] = r["seconds"]
        for name, rows in r["metrics"].items():
            _dump(out, f"r1_{name}", rows)
        save_hf(r["model"], out / "r1_model", overwrite=True)
        teacher = r["model"]
        print("R1\n" + stage_table(r["stages"]), flush=True)
        save()

    if "distill" not in args.skip and teacher is not None:
        t = time.perf_counter()
        d = run_distillation(task, teacher, scale, seed=args.seed)
        metrics = d.pop("metrics")
        d.pop("models"), d.pop("pairs")  # trained models and traces do not go into the JSON report
        for name, rows in metrics.items():
            _dump(out, f"distill_{name}", rows)
        report["distill"] = d
        report["seconds"]["distill"] = time.perf_counter() - t
        rows = [(k, d[k]) for k in ("teacher", "student_base", "sequence_distill", "logit_distill", "rl_only")]
        print("Distillation\n" + stage_table(rows), flush=True)
        save()
    save()
    print(f"report: {out / 'report.json'}")


if __name__ == "__main__":
    main()
