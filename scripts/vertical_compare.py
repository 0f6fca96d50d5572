"""Compare specialisation methods on one budget: run a plan of recipes x seeds, collect JSONL rows, print the table.

    # run the plan (one process, one run at a time; rows are appended as each run ends, and rows already in
    # the file are skipped, so an interrupted comparison continues where it stopped)
    PYTHONHASHSEED=0 OMP_NUM_THREADS=1 python scripts/vertical_compare.py run --plan reduced --rows runs/compare.jsonl
    # the other plans: a short cold start then GRPO on the same parameters; lookup on the base that reads
    PYTHONHASHSEED=0 OMP_NUM_THREADS=1 python scripts/vertical_compare.py run --plan grpo --rows runs/grpo.jsonl
    PYTHONHASHSEED=0 OMP_NUM_THREADS=1 python scripts/vertical_compare.py run --plan lookup --rows runs/lookup.jsonl
    # print the table (mean +- std over seeds) of one or more row files
    python scripts/vertical_compare.py table runs/compare.jsonl
    # two verticals trained separately onto one base, then served together behind the gate
    PYTHONHASHSEED=0 OMP_NUM_THREADS=1 python scripts/vertical_compare.py compose --gates linear mlp --rows runs/c.jsonl

Every run is ``workbench.vertical.specialise`` on a shipped base (``data/add-base``; for the ``lookup`` plan
``data/read-base``, which also learnt to read in pre-training), so the rows are what
``python -m workbench vertical --method ... --rows FILE`` writes too. The columns: new-task accuracy (greedy,
held out), old-task accuracy ungated and behind the per-request gate, the old task's completion loss,
trained parameters, optimiser state, step time, delta bytes.

``compose`` measures composition: each task's vertical is trained alone onto the base (its own delta), then
both deltas are loaded together behind one per-request gate (``workbench.vertical.Verticals``: a probe per
vertical on the base's prompt features; a request none claims goes to the exact base). Each vertical's
accuracy served that way must stay within ``--tolerance`` points of its accuracy alone, and the old
task's within ``--old-tolerance`` points of the base's. Deltas are switched per request, never summed, so
the two never meet in the weights: the only place they can conflict is the gate, which must tell their
requests apart (the rows print the routing: which share of each task's requests went where).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
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
        ({"task": "borrow", "method": "esft_token", "lr": 3e-3, "replay": 0.5, "esft_p": 0.2}, [0, 1, 2]),
        ({"task": "borrow", "method": "newexp", "lr": 3e-3, "replay": 0.5}, [0, 1, 2]),
        ({"task": "borrow", "method": "lora", "lr": 1e-2, "replay": 0.5}, [0, 1, 2]),
        ({"task": "borrow", "method": "full", "lr": 3e-4, "replay": 0.0}, [0]),
        ({"task": "borrow", "method": "full", "lr": 3e-3, "replay": 0.0}, [0]),
        ({"task": "borrow", "method": VSTAR, "lr": 1e-2, "replay": 0.5}, [0, 1, 2]),
        ({"task": "lookup", "method": "full", "lr": 1e-3, "replay": 0.0}, [0]),
        ({"task": "lookup", "method": VSTAR, "lr": 1e-2, "replay": 0.0}, [0]),
    ],
    # R1's order on the hard vertical: a short cold start (300 steps: the format and part of the procedure), then
    # GRPO restricted to the same delta parameters; the row holds both measurements, paired on one run
    "grpo": [
        (
            dict(task="borrow", method=VSTAR, lr=1e-2, replay=0.0, steps=300, grpo_steps=60, grpo_lr=3e-4),
            [0, 1, 2, 3, 4],
        ),
    ],
    # the near vertical (subtraction without borrowing: one new rule on the prompts the base reads)
    "sub": [
        ({"task": "sub", "method": "full", "lr": 1e-3, "replay": 0.0}, [0, 1, 2]),
        ({"task": "sub", "method": VSTAR, "lr": 1e-2, "replay": 0.0}, [0, 1, 2]),
    ],
    # the vertical outside arithmetic, on the base that reads (scripts/make_vertical_base.py --read)
    "lookup": [
        ({"task": "lookup", "method": "full", "lr": 1e-3, "replay": 0.0}, [0, 1, 2]),
        ({"task": "lookup", "method": VSTAR, "lr": 1e-2, "replay": 0.0}, [0, 1, 2]),
        ({"task": "lookup", "method": "lora", "lr": 1e-2, "replay": 0.0}, [0, 1, 2]),
        ({"task": "lookup", "method": "newexp", "lr": 3e-3, "replay": 0.0}, [0]),
    ],
    "ci": [  # seconds, for a smoke test of the script itself
        ({"task": "borrow", "method": "lora", "steps": 3, "eval_problems": 4, "old_eval_problems": 4}, [0]),
        ({"task": "borrow", "method": "full", "steps": 3, "eval_problems": 4, "old_eval_problems": 4}, [0, 1]),
    ],
}
PLAN_BASES = {"lookup": "read-base"}  # a plan's base in data/ (default: add-base)
KEY = ("task", "method", "lr", "replay", "steps", "esft_p", "rank", "seed", "old_eval_problems", "eval_problems",
       "grpo_steps", "grpo_lr")  # fmt: skip


def _key(d: dict) -> tuple:
    d = d if d.get("grpo_steps") else {**d, "grpo_lr": None}  # without GRPO its rate changes nothing
    return tuple(d.get(k) for k in KEY)


def read_rows(paths: list[Path]) -> list[dict]:
    from workbench.vertical.compare import read_rows as read

    try:
        return read(paths)
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None


def table(rows: list[dict]) -> str:
    from workbench.vertical.compare import table as tabulate

    return tabulate(rows)


def run(plan: str, rows_path: Path, base_path: Path | None, threads: int) -> None:
    import torch

    from workbench.io.hf import load_hf
    from workbench.vertical import Recipe, describe_row, specialise

    if plan not in PLANS:
        raise SystemExit(f"error: unknown plan {plan!r}; choose one of {', '.join(PLANS)}")
    if os.environ.get("PYTHONHASHSEED") != "0":
        print("note: PYTHONHASHSEED is not 0; runs may not be reproducible across processes", file=sys.stderr)
    base_path = base_path or ROOT / "data" / PLAN_BASES.get(plan, "add-base")
    if not (base_path / "config.json").is_file():
        hint = " (python scripts/make_vertical_base.py --read makes it)" if base_path.name == "read-base" else ""
        raise SystemExit(f"error: --base {base_path} is not a model folder{hint}")
    torch.set_num_threads(threads)
    defaults = {"old_eval_problems": 500} if plan != "ci" else {}
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
        resolved = base_path.resolve()  # the repository's own bases are named relative to it (rows travel)
        row["base"] = str(resolved.relative_to(ROOT) if resolved.is_relative_to(ROOT) else base_path)
        with open(rows_path, "a", encoding="utf-8") as f:
            f.write(json.dumps(row, default=str) + "\n")
        print(describe_row(row), flush=True)


def compose(tasks: list[str], fields: dict, rows_path: Path | None, base_path: Path, threads: int,
            tolerance: float, old_tolerance: float, gates: list[str]) -> bool:  # fmt: skip
    """Train one vertical per task alone, serve them together behind the gate, compare; True when both hold."""
    import tempfile
    import time

    import torch

    from workbench.io.hf import load_hf
    from workbench.io.tokenizer import tokenizer_of
    from workbench.tasks import get_task
    from workbench.vertical import DomainGate, Recipe, Verticals, apply_delta, describe_row, specialise

    if len(set(tasks)) != len(tasks) or len(tasks) < 2:
        raise SystemExit(f"error: --tasks needs two or more different tasks, got {tasks}")
    torch.set_num_threads(threads)
    recipes = {t: Recipe(**{**fields, "task": t}) for t in tasks}  # bad fields are refused before any training
    old = get_task(recipes[tasks[0]].old_task)
    base = load_hf(base_path)
    tok = tokenizer_of(base)
    t0 = time.perf_counter()
    alone, models = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for t, recipe in recipes.items():
            row, _ = specialise(base, recipe, out=Path(tmp) / t)
            print(describe_row(row), flush=True)
            alone[t] = row
            models[t] = apply_delta(base, Path(tmp) / t)  # loaded from the delta file, as serving loads it
    prompts = {t: [get_task(t).prompt(ex) for ex in get_task(t).sample(300, seed=1, split="train")] for t in tasks}
    old_prompts = [old.prompt(ex) for ex in old.sample(300, seed=1, split="train")]
    r0 = recipes[tasks[0]]
    out: dict = {"tasks": tasks, "recipe": dict(fields), "base": str(base_path), "rows": []}
    ok = True
    for probe in gates:
        served = Verticals(base, models, DomainGate.fit(base, tok, prompts, old_prompts, probe=probe))
        held_all = True
        for name in [*tasks, old.name]:
            task = get_task(name)
            n = r0.old_eval_problems if name == old.name else r0.eval_problems
            examples = task.sample(n, seed=0, split="test")  # the same held-out problems specialise measured
            routes, correct = served.correctness(task, examples, tok, max_new_tokens=r0.max_new_tokens)
            together = sum(correct) / n
            if name == old.name:
                ref, ref_name, tol = alone[tasks[0]]["cold"]["gated"]["base_old_acc"], "the base", old_tolerance
            else:
                ref, ref_name, tol = alone[name]["cold"]["acc"], "its delta alone", tolerance
            held = abs(together - ref) <= tol / 100 + 1e-9
            held_all &= held
            share = {str(r): sum(x == r for x in routes) / n for r in [*tasks, None]}
            out["rows"].append({"gate": probe, "task": name, "n": n, "together": together, "reference": ref,
                                "reference_is": ref_name, "tolerance_points": tol, "holds": held,
                                "routed": share})  # fmt: skip
            routed = ", ".join(f"{'base' if r == 'None' else r} {100 * s:.1f}%" for r, s in share.items())
            print(f"gate {probe:>6} {name:>8}: together {100 * together:5.1f}%  vs {ref_name} {100 * ref:5.1f}%  "
                  f"({100 * (together - ref):+.1f} points, tolerance {tol:g}: {'holds' if held else 'FAILS'})  "
                  f"routed to: {routed}", flush=True)  # fmt: skip
        print(f"gate {probe}: composition {'holds' if held_all else 'does not hold'}", flush=True)
        ok &= held_all
    out["alone"] = {t: {"acc": r["cold"]["acc"], "old_acc": r["cold"]["old_acc"], "gated": r["cold"].get("gated"),
                        "trained_params": r["trained_params"], "delta_bytes": r["delta_bytes"]}
                    for t, r in alone.items()}  # fmt: skip
    out["seconds"] = time.perf_counter() - t0
    print(f"{out['seconds']:.0f} s")
    if rows_path is not None:
        rows_path.parent.mkdir(parents=True, exist_ok=True)
        with open(rows_path, "a", encoding="utf-8") as f:
            f.write(json.dumps(out, default=str) + "\n")
    return ok


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="run a plan of recipes x seeds, appending rows")
    r.add_argument("--plan", default="reduced", help=f"one of {', '.join(PLANS)} (default: reduced)")
    r.add_argument("--rows", default=str(ROOT / "runs" / "vertical_compare.jsonl"), help="JSONL file of rows")
    r.add_argument("--base", help="the base model (default: the plan's: data/read-base for lookup, else data/add-base)")
    r.add_argument("--threads", type=int, default=1, help="torch CPU threads (default: 1)")
    t = sub.add_parser("table", help="print the table of one or more row files")
    t.add_argument("rows", nargs="+", help="JSONL files of rows")
    c = sub.add_parser("compose", help="two verticals trained alone, served together behind the gate")
    c.add_argument("--tasks", nargs="+", default=["borrow", "sub"], help="the verticals' tasks (default: borrow sub)")
    c.add_argument("--method", default=VSTAR, help=f"the method of every vertical (default: {VSTAR})")
    c.add_argument("--steps", type=int, default=1000, help="steps per vertical (default: 1000)")
    c.add_argument("--lr", type=float, default=1e-2, help="learning rate (default: 0.01)")
    c.add_argument("--replay", type=float, default=0.0, help="replay share (default: 0; the gate keeps the old task)")
    c.add_argument("--seed", type=int, default=1, help="seed of every vertical (default: 1)")
    c.add_argument("--eval-problems", type=int, default=200, help="held-out problems per vertical (default: 200)")
    c.add_argument("--old-eval-problems", type=int, default=500, help="held-out old-task problems (default: 500)")
    c.add_argument("--tolerance", type=float, default=2.0, help="points a vertical may lose together (default: 2)")
    c.add_argument("--old-tolerance", type=float, default=1.0, help="points the old task may lose (default: 1)")
    c.add_argument(
        "--gates",
        nargs="+",
        default=["mlp"],
        choices=["linear", "mlp"],
        help="the gates to serve behind (workbench.vertical.gate; default: mlp)",
    )
    c.add_argument("--rows", help="append the result (one JSON line) to this file")
    c.add_argument("--base", default=str(ROOT / "data" / "add-base"), help="the base model (default: data/add-base)")
    c.add_argument("--threads", type=int, default=1, help="torch CPU threads (default: 1)")
    args = p.parse_args()
    if args.cmd == "compose":
        if args.threads < 1:
            p.error(f"--threads must be >= 1, got {args.threads}")
        fields = {"method": args.method, "steps": args.steps, "lr": args.lr, "replay": args.replay, "seed": args.seed,
                  "eval_problems": args.eval_problems, "old_eval_problems": args.old_eval_problems}  # fmt: skip
        ok = compose(args.tasks, fields, Path(args.rows) if args.rows else None, Path(args.base), args.threads,
                     args.tolerance, args.old_tolerance, args.gates)  # fmt: skip
        raise SystemExit(0 if ok else 1)
    if args.cmd == "run":
        if args.threads < 1:
            p.error(f"--threads must be >= 1, got {args.threads}")
        run(args.plan, Path(args.rows), Path(args.base) if args.base else None, args.threads)
    else:
        print(table(read_rows([Path(x) for x in args.rows])))


if __name__ == "__main__":
    main()
