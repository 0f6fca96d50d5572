"""Serving a base with its verticals: deltas applied at load, and the gate that picks one per request.

A vertical ships as a delta (``workbench.vertical.delta``): only the tensors its method trained, plus the
fingerprint of the base they were trained on. ``python -m workbench serve --model BASE --delta DIR`` applies
it onto the base when the server starts, so a team serves base + vertical without a merged copy of the
weights. The delta is checked before the port opens: a folder that is missing, holds no ``delta.json``,
or whose files do not parse is refused, and so is a delta trained on another base (its rows mean nothing
on other weights); each message names ``--delta`` and says what to do instead.

One delta is always on: every request is answered by base + delta. Several deltas compose the way the
library composes verticals (``vertical.gate``): each delta's ``delta.json`` records its recipe, whose
``task`` gives that vertical's training prompts and whose ``old_task`` gives the base's; a ``DomainGate``
fitted on them at start reads each request with the untouched base and sends it to the vertical whose
probe claims it, or to the exact base when none does. Each model has its own ``Engine`` (its own running
batch): rows of different models cannot share one forward pass.

Where it simplifies: the gate is fitted again at every start (a few hundred short forward passes of the
base; a production server would store the probes beside the deltas); a delta whose recipe names no task
can be served alone, not behind the gate.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from workbench.io.files import CheckpointError
from workbench.model import Model

GATE_PROMPTS = 300  # training prompts per domain for the gate (what vertical.specialise.fit_gate uses)


class DeltaError(ValueError):
    """A ``--delta`` that cannot be served; the message names the folder, the flag and the fix."""


@dataclass
class Served:
    """What a server answers with: the base, the deltas applied onto it, and the gate between them."""

    base: Model
    base_name: str
    models: dict[str, Model] = field(default_factory=dict)  # delta name -> base with that delta applied
    metas: dict[str, dict[str, Any]] = field(default_factory=dict)  # delta name -> its delta.json
    gate: Any = None  # a vertical.gate.DomainGate when several deltas are served, else None

    @property
    def default(self) -> Model:
        """The model of a request nobody routes: the one delta when there is one, else the base."""
        return next(iter(self.models.values())) if len(self.models) == 1 else self.base

    @property
    def model_id(self) -> str:
        return "+".join([self.base_name, *self.models])

    def describe(self) -> dict[str, Any]:
        """The base and each delta, with the method and task its recipe names, and how requests are routed."""
        routing = "none" if not self.models else "always" if len(self.models) == 1 else "gate"
        deltas = [{"name": n, "method": m.get("recipe", {}).get("method"), "task": m.get("recipe", {}).get("task"),
                   "base_fingerprint": m["base_fingerprint"]} for n, m in self.metas.items()]  # fmt: skip
        return {"base": self.base_name, "deltas": deltas, "routing": routing}


def _fix(folder: Path) -> str:
    return (f"give --delta the folder `python -m workbench vertical --out {folder}` wrote (delta.json and "
            "delta.safetensors)")  # fmt: skip


def load_delta(base: Model, folder: str | Path) -> tuple[Model, dict[str, Any]]:
    """``apply_delta`` with every failure turned into a ``DeltaError`` naming ``--delta`` and the fix."""
    from workbench.vertical.delta import DELTA_FILE, apply_delta, read_delta

    folder = Path(folder)
    if not folder.exists():
        raise DeltaError(f"--delta {folder}: no such folder; {_fix(folder)}")
    if not folder.is_dir():
        raise DeltaError(f"--delta {folder}: is a file, not a delta folder; {_fix(folder)}")
    try:
        meta = read_delta(folder)
        if not isinstance(meta.get("base_fingerprint"), str) or not isinstance(meta.get("structure"), dict):
            raise CheckpointError("delta.json lacks its base_fingerprint or structure")
        if not (folder / DELTA_FILE).is_file():
            raise CheckpointError(f"{DELTA_FILE} is missing")
    except (CheckpointError, ValueError, OSError) as e:
        raise DeltaError(f"--delta {folder}: not a readable delta ({e}); {_fix(folder)}") from None
    try:
        model = apply_delta(base, folder)
    except CheckpointError as e:
        if "another base" in str(e):
            raise DeltaError(f"--delta {folder}: this delta was trained on another base than --model "
                             f"(it names base fingerprint {meta['base_fingerprint'][:12]}...); serve it with "
                             "--model set to the base it was trained on, or train the vertical again on "
                             "this base") from None  # fmt: skip
        raise DeltaError(f"--delta {folder}: the delta does not fit the base ({e}); {_fix(folder)}") from None
    except Exception as e:  # a truncated or foreign safetensors file, a structure that cannot be rebuilt
        raise DeltaError(f"--delta {folder}: malformed delta ({type(e).__name__}: {e}); write it again with "
                         "`python -m workbench vertical --out DIR --overwrite`") from None  # fmt: skip
    return model.eval(), meta


def fit_delta_gate(base: Model, tokenizer, metas: dict[str, dict[str, Any]], n: int = GATE_PROMPTS, probe: str = "mlp"):
    """The ``DomainGate`` of several deltas, from the tasks their recipes name (one vertical per task). ``probe``
    "mlp" by default: verticals whose prompts share one shape (subtraction with and without borrowing) are
    told apart by it, not by the linear probe (lesson 9's two-verticals rows)."""
    from workbench.tasks import get_task, task_names
    from workbench.vertical.gate import DomainGate

    tasks: dict[str, str] = {}
    old: set[str] = set()
    for name, meta in metas.items():
        recipe = meta.get("recipe") or {}
        task = recipe.get("task")
        if task not in task_names():
            raise DeltaError(f"--delta {name}: its delta.json names no known recipe task ({task!r}), so the gate "
                             "cannot tell which requests are its own; serve it alone (one --delta)")  # fmt: skip
        if task in tasks.values():
            other = next(k for k, v in tasks.items() if v == task)
            raise DeltaError(f"--delta {name} and --delta {other} are both verticals of task {task!r}; the gate "
                             "routes by domain and cannot choose between them; serve one of them")  # fmt: skip
        tasks[name] = task
        if recipe.get("old_task") in task_names():
            old.add(recipe["old_task"])
    old -= set(tasks.values())
    if not old:
        raise DeltaError("--delta: no recipe names the task the base knows (old_task), so the gate has no base "
                         "requests to learn from; serve one delta alone")  # fmt: skip
    new_p = {name: [get_task(t).prompt(ex) for ex in get_task(t).sample(n, seed=1, split="train")]
             for name, t in tasks.items()}  # fmt: skip
    old_p = [get_task(t).prompt(ex) for t in sorted(old) for ex in get_task(t).sample(n, seed=1, split="train")]
    return DomainGate.fit(base, tokenizer, new_p, old_p, probe=probe)


def load_served(base: Model, base_name: str, folders: list[str | Path], tokenizer=None, gate: str = "mlp") -> Served:
    """The base and every ``--delta`` applied onto it; with several, the gate that routes between them."""
    served = Served(base.eval(), base_name)
    for folder in folders:
        name = Path(folder).resolve().name
        if name in served.models:
            raise DeltaError(f"--delta {folder}: two deltas are named {name!r} (the folder's name); rename one")
        served.models[name], served.metas[name] = load_delta(base, folder)
    if len(served.models) > 1:
        if tokenizer is None:
            from workbench.io.tokenizer import tokenizer_of

            tokenizer = tokenizer_of(base)
        served.gate = fit_delta_gate(base, tokenizer, served.metas, probe=gate)
    return served


__all__ = ["GATE_PROMPTS", "DeltaError", "Served", "fit_delta_gate", "load_delta", "load_served"]
