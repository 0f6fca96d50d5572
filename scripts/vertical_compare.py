"""Compare specialisation methods on one budget: run a plan of recipes x seeds, collect JSONL rows, print the table.

    # run the plan (one process, one run at a time; rows are appended as each run ends, and rows already in
    # the file are skipped, so an interrupted comparison continues where it stopped)
    PYTHONHASHSEED=0 OMP_NUM_THREADS=1 python scripts/vertical_compare.py run --plan reduced --rows runs/compare.jsonl
    # print the table (mean +- std over seeds) of one or more row files
    python scripts/vertical_compare.py table runs/compare.jsonl

Every run is ``workbench.vertical.specialise`` on the shipped base (``data/add-base``), so the rows are what
``python -m workbench vertical --method ... --rows FILE`` writes too. The columns: new-task accuracy (greedy,
held out), old-task accuracy ungated and behind the per-request gate, the old task's completion loss,
trained parameters, optimiser state, step time, delta bytes.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# name -> (recipe fields, seeds). The same budget for every method (Recipe's steps, batch, sequence length).
VSTAR = "lora+lora_mlp+newexp"
# The reduced plan measures old-task accuracy on 500 held-out problems (the base adds ~99.8%: a 0.2-point std).
PLANS: dict[str, list[tuple[dict, list[int]]]] = {
    "reduced": [
        ({"task": "borrow", "method": VSTAR, "lr": 1e-2, "replay": 0.0}, [0, 1, 2]),
        ({"task": "borrow", "method": "full", "lr": 1e-3, "replay": 0.5}, [0, 1, 2]),
        ({"task": "borrow", "method": "full", "lr": 1e-3, "replay": 0.0}, [0, 1, 2]),
        ({"task": "borrow", "method": "esft_token", "lr": 3e-3, "replay": 0.5, "esft_p": 0.2}, [0]),
        ({"task": "borrow", "method": "newexp", "lr": 3e-3, "replay": 0.5}, [0]),
        ({"task": "borrow", "method": "lora", "lr": 1e-2, "replay": 0.5}, [0]),
        ({"task": "borrow", "method": "full", "lr": 3e-4, "replay": 0.0}, [0]),
        ({"task": "borrow", "method": "full", "lr": 3e-3, "replay": 0.0}, [0]),
        ({"task": "borrow", "method": VSTAR, "lr": 1e-2, "replay": 0.5}, [0, 1, 2]),
        ({"task": "lookup", "method": "full", "lr": 1e-3, "replay": 0.0}, [0]),
        ({"task": "lookup", "method": VSTAR, "lr": 1e-2, "replay": 0.0}, [0]),
    ],
    "ci": [  # seconds, for a smoke test of the script itself
        ({"task": "borrow", "method": "lora", "steps": 3, "eval_problems": 4, "old_eval_problems": 4}, [0]),
        ({"task": "borrow", "method": "full", "steps": 3, "eval_problems": 4, "old_eval_problems": 4}, [0, 1]),
    ],
}
KEY = ("task", "method", "lr", "replay", "steps", "esft_p", "rank", "seed", "old_eval_problems", "eval_problems")


def _key(d: dict) -> tuple:
    return tuple(d.get(k) for k in KEY)


def read_rows(paths: list[Path]) -> list[dict]:
    rows = []
    for path in paths:
        if not path.is_file():
            raise SystemExit(f"error: {path} is not a file of rows (JSONL); run the plan first")
        with open(path, encoding="utf-8") as f:  # one pass, line by line
            for n, line in enumerate(f, 1):
                if line.strip():
                    try:
                        rows.append(json.loads(line))
                    except json.JSONDecodeError as e:
                        raise SystemExit(f"error: {path}:{n} is not a JSON row ({e})") from None
    return rows


def _ms(values: list[float], scale: float = 100.0, digits: int = 1) -> str:
    if not values:
        return ""
    m = sum(values) / len(values)
    if len(values) == 1:
        return f"{scale * m:.{digits}f}"
    sd = math.sqrt(sum((v - m) ** 2 for v in values) / (len(values) - 1))
    return f"{scale * m:.{digits}f} ± {scale * sd:.{digits}f}"


def table(rows: list[dict]) -> str:
    """Markdown table: one line per (task, method, lr, replay, steps), mean ± std (sample) over its seeds."""
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for r in rows:
        groups[(r["task"], r["method"], r["lr"], r["replay"], r["steps"])].append(r)
    head = ("| task | method | lr | replay | steps | seeds | new % | old % (ungated) | gated new / old % | "
            "old loss | trained params | optim MB | step ms | delta KB |")  # fmt: skip
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    base_old = sorted({round(r["cold"]["gated"]["base_old_acc"], 4) for r in rows if "gated" in r["cold"]})
    for (task, method, lr, replay, steps), rs in sorted(groups.items(), key=lambda kv: (kv[0][0], kv[0][1], kv[0][2:])):
        cold = [r["cold"] for r in rs]
        gated = [c["gated"] for c in cold if "gated" in c]
        g = f"{_ms([x['acc'] for x in gated])} / {_ms([x['old_acc'] for x in gated])}" if gated else ""
        delta = [r["delta_bytes"] / 1e3 for r in rs if r.get("delta_bytes")]
        lines.append(
            f"| {task} | {method} | {lr:g} | {replay:g} | {steps} | {','.join(str(r['seed']) for r in rs)} | "
            f"{_ms([c['acc'] for c in cold])} | {_ms([c['old_acc'] for c in cold])} | {g} | "
            f"{_ms([c['old_loss'] for c in cold], 1.0, 3)} | {rs[0]['trained_params']:,} | "
            f"{rs[0]['optimizer_MB']:.2f} | {_ms([r['step_s'] for r in rs], 1000.0, 0)} | "
            f"{_ms(delta, 1.0, 0) if delta else '-'} |"
        )
    if base_old:
        lines.append(
            f"\nbase old-task accuracy (the gated runs measured it): {', '.join(f'{100 * b:.1f}' for b in base_old)}%"
        )
    for r in rows:
        if "grpo" in r:
            lines.append(f"GRPO {r['task']} {r['method']} seed {r['seed']}: {100 * r['cold']['acc']:.1f} -> "
                         f"{100 * r['grpo']['acc']:.1f}% ({r['grpo_steps']} steps, lr {r['grpo_lr']:g})")  # fmt: skip
    return "\n".join(lines)


def run(plan: str, rows_path: Path, base_path: Path, threads: int) -> None:
    import torch

    from workbench.io.hf import load_hf
    from workbench.vertical import Recipe, describe_row, specialise

    if plan not in PLANS:
        raise SystemExit(f"error: unknown plan {plan!r}; choose one of {', '.join(PLANS)}")
    if os.environ.get("PYTHONHASHSEED") != "0":
        print("note: PYTHONHASHSEED is not 0; runs may not be reproducible across processes", file=sys.stderr)
    torch.set_num_threads(threads)
    defaults = {"old_eval_problems": 500} if plan == "reduced" else {}
    recipes = [Recipe(**{**defaults, **fields, "seed": s}) for fields, seeds in PLANS[plan] for s in seeds]
    done = {_key(r) for r in read_rows([rows_path])} if rows_path.exists() else set()
    base = load_hf(base_path)
    rows_path.parent.mkdir(parents=True, exist_ok=True)
    from dataclasses import asdict

    for recipe in recipes:
        if _key(asdict(recipe)) in done:
            print(f"skip (in {rows_path}): {recipe.task} {recipe.method} lr={recipe.lr} seed={recipe.seed}", flush=True)
            continue
        row, _ = specialise(base, recipe)
        row["base"] = str(base_path)
        with open(rows_path, "a", encoding="utf-8") as f:
            f.write(json.dumps(row, default=str) + "\n")
        print(describe_row(row), flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="run a plan of recipes x seeds, appending rows")
    r.add_argument("--plan", default="reduced", help=f"one of {', '.join(PLANS)} (default: reduced)")
    r.add_argument("--rows", default=str(ROOT / "runs" / "vertical_compare.jsonl"), help="JSONL file of rows")
    r.add_argument("--base", default=str(ROOT / "data" / "add-base"), help="the base model (default: data/add-base)")
    r.add_argument("--threads", type=int, default=1, help="torch CPU threads (default: 1)")
    t = sub.add_parser("table", help="print the table of one or more row files")
    t.add_argument("rows", nargs="+", help="JSONL files of rows")
    args = p.parse_args()
    if args.cmd == "run":
        if args.threads < 1:
            p.error(f"--threads must be >= 1, got {args.threads}")
        run(args.plan, Path(args.rows), Path(args.base), args.threads)
    else:
        print(table(read_rows([Path(x) for x in args.rows])))


if __name__ == "__main__":
    main()
