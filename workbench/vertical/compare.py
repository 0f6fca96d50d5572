"""The rows of a comparison of specialisation methods: read them, group them by configuration, tabulate them.

Every run of ``specialise`` (``python -m workbench vertical --rows FILE``, ``scripts/vertical_compare.py run``)
is one flat JSON row: the recipe's fields, the costs (trained parameters, optimiser state, step time, delta
bytes) and the measurements after the cold start (``cold``: new- and old-task accuracy, ungated and behind
the gate; ``grpo``: the same after GRPO, when the recipe ran it). A *configuration* is a row's recipe fields
(``CONFIG``), the base it specialised and its GRPO steps and rate; its seeds are repeats of it.
``table`` prints one line per configuration, mean ± sample standard deviation over its seeds: a summary of
spread, not a test. Whether one configuration beats another is for ``analysis.stats.Verdict`` (lesson 9).
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from collections.abc import Iterable
from pathlib import Path
from typing import NamedTuple

CONFIG = ("task", "method", "lr", "replay", "steps")  # what makes runs repeats of one another (seeds aside)


class Config(NamedTuple):
    """What makes runs repeats of one another, seeds aside: the recipe's fields, the base, the GRPO stage."""

    task: str
    method: str
    lr: float
    replay: float
    steps: int
    base: str  # the base model's folder name (``add-base``, ``read-base``)
    grpo_steps: int  # 0: the cold start only
    grpo_lr: float


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


def base_name(row: dict) -> str:
    """The name of the folder of the base a row specialised (``add-base`` when the row does not say)."""
    return Path(str(row.get("base") or "add-base")).name


def config_of(row: dict) -> Config:
    grpo = int(row.get("grpo_steps") or 0) if "grpo" in row else 0
    return Config(*(row[k] for k in CONFIG), base_name(row), grpo, float(row.get("grpo_lr") or 0.0) if grpo else 0.0)


def group_rows(rows: Iterable[dict]) -> dict[Config, list[dict]]:
    """Rows by configuration (``Config``), each group sorted by seed, the groups sorted by task, method, rest."""
    groups: dict[Config, list[dict]] = defaultdict(list)
    for r in rows:
        groups[config_of(r)].append(r)
    return {k: sorted(v, key=lambda r: r["seed"]) for k, v in sorted(groups.items(), key=lambda kv: kv[0])}


def label(config: Config) -> str:
    """``full (lr 0.001, replay 0.5)``: a configuration in words (with its base when not ``add-base``, and
    its GRPO stage when it ran one)."""
    c = config
    extra = f", on {c.base}" if c.base != "add-base" else ""
    extra += f", then {c.grpo_steps} GRPO steps at lr {c.grpo_lr:g}" if c.grpo_steps else ""
    return f"{c.method} (lr {c.lr:g}, replay {c.replay:g}{extra})"


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
    grpo = any(r.get("grpo") for r in rows)
    head = ("| task | base | method | lr | replay | steps | seeds | new % | old % (ungated) | gated new / old % | "
            + ("after GRPO new / old % (gated when a delta) | " if grpo else "")
            + "old loss | trained params | optim MB | step ms | delta KB |")  # fmt: skip
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    base_old = sorted({(base_name(r), round(r["cold"]["gated"]["base_old_acc"], 4)) for r in rows
                       if "gated" in r["cold"]})  # fmt: skip
    for c, rs in group_rows(rows).items():
        cold = [r["cold"] for r in rs]
        gated = [c["gated"] for c in cold if "gated" in c]
        g = f"{_ms([x['acc'] for x in gated])} / {_ms([x['old_acc'] for x in gated])}" if gated else ""
        delta = [r["delta_bytes"] / 1e3 for r in rs if r.get("delta_bytes")]
        after = [r["grpo"] for r in rs if r.get("grpo")]
        kept = [x["gated"]["old_acc"] if "gated" in x else x["old_acc"] for x in after]  # as served
        gr = f"{_ms([x['acc'] for x in after])} / {_ms(kept)}" if after else ""
        if c.grpo_steps:
            gr = f"{gr} ({c.grpo_steps} steps, lr {c.grpo_lr:g})"
        lines.append(
            f"| {c.task} | {c.base} | {c.method} | {c.lr:g} | {c.replay:g} | {c.steps} | "
            f"{','.join(str(r['seed']) for r in rs)} | "
            f"{_ms([x['acc'] for x in cold])} | {_ms([x['old_acc'] for x in cold])} | {g} | "
            + (f"{gr} | " if grpo else "")
            + f"{_ms([x['old_loss'] for x in cold], 1.0, 3)} | {rs[0]['trained_params']:,} | "
            f"{rs[0]['optimizer_MB']:.2f} | {_ms([r['step_s'] for r in rs], 1000.0, 0)} | "
            f"{_ms(delta, 1.0, 0) if delta else '-'} |"
        )
    if base_old:
        shown = ", ".join(f"{b} {100 * a:.1f}%" for b, a in base_old)
        lines.append(f"\nbase old-task accuracy (the gated runs measured it): {shown}")
    return "\n".join(lines)


__all__ = ["CONFIG", "Config", "base_name", "config_of", "group_rows", "label", "read_rows", "table"]
