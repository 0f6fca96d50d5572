"""Count the bad-input sweep (tests/test_bad_input.py) by class and verdict, on one or more versions.

    python scripts/count_bad_input.py                          # this checkout
    python scripts/count_bad_input.py --tree /tmp/orig --tree .   # before and after, side by side
    python scripts/count_bad_input.py --tree /tmp/orig --json runs/sweep-before.jsonl

Each tree is a checkout whose ``workbench`` package is imported (the cases come from this checkout's
tests, whatever the tree). Every tree runs in its own process, one case after another, each in a fresh
temporary folder; verdicts are those of ``tests/bad_input_sweep.py`` (clear, vague, traceback,
accepted, changed, hang, allocates, n/a). A case that would hang or allocate a huge model is stopped by
a timer or a guard, so the sweep is safe on a version without the fixes.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from collections import Counter, defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TESTS = ROOT / "tests"


def _child(out: Path) -> None:
    """Run every case here (``workbench`` is whatever sys.path finds first) and write one JSON line each."""
    sys.path.append(str(TESTS))
    import torch

    torch.set_num_threads(1)
    from bad_input_sweep import run_case
    from test_bad_input import CASES

    with open(out, "w") as f, tempfile.TemporaryDirectory() as tmp:
        for i, case in enumerate(CASES):
            outcome = run_case(case, Path(tmp) / f"case-{i:03d}")
            row = {"id": case.id, "klass": case.klass, "owner": case.owner, "verdict": outcome.verdict,
                   "message": outcome.message[-300:]}  # fmt: skip
            f.write(json.dumps(row) + "\n")
            f.flush()
            print(f"{outcome.verdict:>9}  {case.id}", file=sys.stderr, flush=True)


def sweep(tree: Path, out: Path) -> list[dict]:
    env = {**os.environ, "PYTHONPATH": str(tree.resolve()), "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, __file__, "--child", str(out)], env=env, check=True, cwd=tree)
    return [json.loads(line) for line in out.read_text().splitlines()]


def table(results: dict[str, list[dict]]) -> str:
    """A markdown table: per class, the number of cases and, per tree, how many were answered clearly and
    how the others went."""
    trees = list(results)
    classes = list(dict.fromkeys(r["klass"] for rows in results.values() for r in rows))
    head = "| class | cases | " + " | ".join(f"clear ({t})" for t in trees) + " | " + " | ".join(
        f"the rest ({t})" for t in trees
    ) + " |"  # fmt: skip
    lines = [head, "|" + " --- |" * (2 + 2 * len(trees))]
    totals = {t: Counter() for t in trees}
    for klass in [*classes, None]:
        cells_clear, cells_rest = [], []
        n = 0
        for t in trees:
            rows = [r for r in results[t] if klass is None or r["klass"] == klass]
            n = len(rows)
            counts = Counter(r["verdict"] for r in rows)
            if klass is not None:
                totals[t].update(counts)
            cells_clear.append(str(counts.get("clear", 0)))
            rest = ", ".join(f"{v} {c}" for v, c in sorted(counts.items()) if v != "clear")
            cells_rest.append(rest or "-")
        name = "**all**" if klass is None else klass
        lines.append(f"| {name} | {n} | " + " | ".join(cells_clear) + " | " + " | ".join(cells_rest) + " |")
    return "\n".join(lines)


def owners(rows: list[dict]) -> str:
    by_owner: dict[str, Counter] = defaultdict(Counter)
    for r in rows:
        if r["owner"]:
            by_owner[r["owner"]][r["verdict"]] += 1
    return "\n".join(f"  {o}: {dict(c)}" for o, c in sorted(by_owner.items()))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tree", action="append", help="a checkout to sweep (repeatable; default: this one)")
    p.add_argument("--json", help="also write every case's verdict as JSON lines here (one file per tree: -N)")
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        _child(Path(args.child))
        return
    trees = [Path(t) for t in (args.tree or [str(ROOT)])]
    results: dict[str, list[dict]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for i, tree in enumerate(trees):
            out = Path(args.json + (f"-{i}" if len(trees) > 1 else "")) if args.json else Path(tmp) / f"{i}.jsonl"
            results[str(tree)] = sweep(tree, out)
    print(table(results))
    for tree, rows in results.items():
        print(f"\nowned elsewhere, in {tree}:\n{owners(rows)}")


if __name__ == "__main__":
    main()
