"""The rows of a comparison of specialisation methods: read them, group them by configuration, tabulate them.

Every run of ``specialise`` (``python -m workbench vertical --rows FILE``, ``scripts/vertical_compare.py run``)
is one flat JSON row: the recipe's fields, the costs (trained parameters, optimiser state, step time, delta
bytes) and the measurements after the cold start (``cold``: new- and old-task accuracy, ungated and behind
the gate). A *configuration* is a row's (task, method, lr, replay, steps); its seeds are repeats of it.
``table`` prints one line per configuration, mean ± sample standard deviation over its seeds: a summary of
spread, not a test. Whether one configuration beats another is for ``analysis.stats.Verdict`` (lesson 9).
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from collections.abc import Iterable
from pathlib import Path

CONFIG = ("task", "method", "lr", "replay", "steps")  # what makes runs repeats of one another (seeds aside)


def read_rows(paths: Iterable[str | Path]) -> list[dict]:
    """The rows of one or more JSONL files, in order (one pass over each file, line by line)."""
    rows = []
    for path in map(Path, paths):
        if not path.is_file():
            raise ValueError(f"{path} is not a file of rows (JSONL); run the comparison first "
                             "(scripts/vertical_compare.py run --rows FILE)")  # fmt: skip
        with open(path, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if line.strip():
                    try:
                        row = json.loads(line)
                    except json.JSONDecodeError as e:
                        raise ValueError(f"{path}:{n} is not a JSON row ({e})") from None
                    missing = [k for k in (*CONFIG, "seed", "cold") if k not in row]
                    if missing:
                        raise ValueError(f"{path}:{n} is not a comparison row: it lacks {missing}")
                    rows.append(row)
    return rows


def config_of(row: dict) -> tuple:
    return tuple(row[k] for k in CONFIG)


def group_rows(rows: Iterable[dict]) -> dict[tuple, list[dict]]:
    """Rows by configuration (``CONFIG``), each group sorted by seed, the groups sorted by task, method, rest."""
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for r in rows:
        groups[config_of(r)].append(r)
    return {k: sorted(v, key=lambda r: r["seed"]) for k, v in sorted(groups.items(), key=lambda kv: kv[0])}


def label(config: tuple) -> str:
    """``full (lr 0.001, replay 0.5)``: a configuration in words."""
    task, method, lr, replay, steps = config
    return f"{method} (lr {lr:g}, replay {replay:g})"


def _ms(values: list[float], scale: float = 100.0, digits: int = 1) -> str:
    if not values:
        return ""
    m = sum(values) / len(values)
    if len(values) == 1:
        return f"{scale * m:.{digits}f}"
    sd = math.sqrt(sum((v - m) ** 2 for v in values) / (len(values) - 1))
    return f"{scale * m:.{digits}f} ± {scale * sd:.{digits}f}"


def table(rows: list[dict]) -> str:
    """Markdown table: one line per configuration, mean ± std (sample) over its seeds."""
    head = ("| task | method | lr | replay | steps | seeds | new % | old % (ungated) | gated new / old % | "
            "old loss | trained params | optim MB | step ms | delta KB |")  # fmt: skip
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    base_old = sorted({round(r["cold"]["gated"]["base_old_acc"], 4) for r in rows if "gated" in r["cold"]})
    for (task, method, lr, replay, steps), rs in group_rows(rows).items():
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


__all__ = ["CONFIG", "config_of", "group_rows", "label", "read_rows", "table"]
