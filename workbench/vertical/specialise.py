"""One specialisation run, measured the same way for every method: ``specialise(base, recipe)``.

The budget is the recipe's and the same for every method: ``steps`` AdamW steps (weight decay 0, warmup then
cosine) of ``batch_size`` x ``seq_len`` tokens of the new task's worked traces, mixed with ``replay`` of the
old task's corpus. Then, on held-out problems (greedy): the new task's accuracy, the old task's (on the same
``old_eval_problems`` every run, so differences between methods are paired), both tasks' completion loss
and the loss per domain (forgetting), the trained parameters, the optimiser state (AdamW: two float32
moments per trained entry), the step time and the delta's bytes. With ``recipe.gate`` also the accuracies
behind the per-request gate (``gate.py``: a request the gate does not send to the vertical is answered
by the exact base). With ``grpo_steps`` GRPO then runs restricted to the same parameters (the masks stay
on) and everything is measured again.

The result is one flat JSON-able row (``scripts/vertical_compare.py`` collects them into the table).
"""

from __future__ import annotations

import tempfile
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from workbench.model import Model
from workbench.vertical.delta import fingerprint, save_delta
from workbench.vertical.gate import OLD, DomainGate, gated_choice
from workbench.vertical.measure import completion_loss
from workbench.vertical.methods import Prepared, Recipe, prepare
from workbench.vertical.recipe import VerticalConfig, replay_documents, vertical_dataset

_BASE_CACHE: dict[tuple, list[float]] = {}  # (base fingerprint, task, n, tokens) -> the base's correctness


def recipe_dataset(recipe: Recipe, tokenizer):
    """The training mix of a recipe: the new task's worked traces plus ``replay`` of the old task's corpus."""
    from workbench.tasks import get_task

    task, old = get_task(recipe.task), get_task(recipe.old_task)
    docs = replay_documents(old, seed=recipe.seed + 7, think_fraction=0.5)
    vc = VerticalConfig(steps=recipe.steps, replay_fraction=recipe.replay, n_new_docs=recipe.n_new_docs,
                        seed=recipe.seed)  # fmt: skip
    return vertical_dataset(task, vc, tokenizer, replay=docs)


def correctness(model: Model, task, n: int, tokenizer, max_new_tokens: int) -> list[float]:
    """Greedy 0/1 correctness of each of the first ``n`` held-out (test split) problems of ``task``."""
    from workbench.rl.rollout import evaluate

    examples = task.sample(n, seed=0, split="test")
    res = evaluate(model, task, examples, tokenizer, max_new_tokens=max_new_tokens, return_samples=True)
    return [float(s[2]) for s in res["samples"]]


def _base_correctness(base: Model, fp: str, task, n: int, tok, max_new_tokens: int) -> list[float]:
    key = (fp, task.name, n, max_new_tokens)
    if key not in _BASE_CACHE:
        _BASE_CACHE[key] = correctness(base, task, n, tok, max_new_tokens)
    return _BASE_CACHE[key]


def measure(model: Model, base: Model, fp: str, recipe: Recipe, dataset, tok, gate: DomainGate | None) -> dict:
    from workbench.tasks import get_task
    from workbench.train.measure import loss_by_domain

    task, old = get_task(recipe.task), get_task(recipe.old_task)
    new_c = correctness(model, task, recipe.eval_problems, tok, recipe.max_new_tokens)
    old_c = correctness(model, old, recipe.old_eval_problems, tok, recipe.max_new_tokens)
    out: dict[str, Any] = {
        "acc": sum(new_c) / len(new_c),
        "old_acc": sum(old_c) / len(old_c),
        "loss": completion_loss(model, task, 200, tokenizer=tok),
        "old_loss": completion_loss(model, old, 200, tokenizer=tok),
        "domain_loss": loss_by_domain(model, dataset, n_batches=4),
    }
    if gate is not None:
        b_new = _base_correctness(base, fp, task, recipe.eval_problems, tok, recipe.max_new_tokens)
        b_old = _base_correctness(base, fp, old, recipe.old_eval_problems, tok, recipe.max_new_tokens)
        r_new = gate.route([task.prompt(ex) for ex in task.sample(recipe.eval_problems, seed=0, split="test")])
        r_old = gate.route([old.prompt(ex) for ex in old.sample(recipe.old_eval_problems, seed=0, split="test")])
        out["gated"] = {
            "acc": gated_choice(r_new, {task.name: new_c, OLD: b_new}),
            "old_acc": gated_choice(r_old, {task.name: old_c, OLD: b_old}),
            "gate_on_new": sum(r is not OLD for r in r_new) / len(r_new),
            "gate_on_old": sum(r is not OLD for r in r_old) / len(r_old),
            "base_acc": sum(b_new) / len(b_new),
            "base_old_acc": sum(b_old) / len(b_old),
        }
    return out


def fit_gate(base: Model, recipe: Recipe, tok, n: int = 300) -> DomainGate:
    """The per-request gate of one vertical: its training prompts against the old task's."""
    from workbench.tasks import get_task

    task, old = get_task(recipe.task), get_task(recipe.old_task)
    new_p = [task.prompt(ex) for ex in task.sample(n, seed=1, split="train")]
    old_p = [old.prompt(ex) for ex in old.sample(n, seed=1, split="train")]
    return DomainGate.fit(base, tok, {task.name: new_p}, old_p)


def specialise(
    base: Model, recipe: Recipe, *, out: str | Path | None = None, overwrite: bool = False, progress: bool = False
) -> tuple[dict[str, Any], Prepared]:
    """Train ``recipe`` on a copy of ``base``, measure it; returns (row, prepared model). out: write the delta
    there (a delta folder), or for ``full`` the model (a Hugging Face folder)."""
    from workbench.io.tokenizer import tokenizer_of
    from workbench.rl.grpo import GRPOConfig, grpo_train
    from workbench.tasks import get_task
    from workbench.train import TrainConfig, train

    if out is not None:  # refuse the output folder before the (long) training
        from workbench.io.files import MODEL_FOLDER_FILES, check_output_folder

        check_output_folder(out, overwrite=overwrite, allowed=MODEL_FOLDER_FILES)
    tok = tokenizer_of(base)
    fp = fingerprint(base)
    dataset = recipe_dataset(recipe, tok)
    t0 = time.perf_counter()
    prepared = prepare(base, recipe, dataset, tok)
    model = prepared.model
    tc = TrainConfig(steps=recipe.steps, batch_size=recipe.batch_size, seq_len=recipe.seq_len, lr=recipe.lr,
                     warmup_steps=recipe.warmup_steps, weight_decay=0.0, eval_every=0, seed=recipe.seed,
                     bias_update_speed=None if not recipe.is_delta else 0.0, device=recipe.device)  # fmt: skip
    res = train(model.config, tc, None, dataset=dataset, model=model, progress=progress, overwrite=True)
    train_s = time.perf_counter() - t0
    gate = fit_gate(base, recipe, tok) if recipe.gate and recipe.is_delta else None
    trained = prepared.trained_parameters
    row: dict[str, Any] = {
        **{k: v for k, v in asdict(recipe).items() if k != "device"},
        "trained_params": trained,
        "total_params": model.num_parameters(),
        "optimizer_MB": 2 * 4 * trained / 1e6,
        "step_s": res.metrics[-1]["elapsed_s"] / len(res.metrics),
        "train_s": train_s,
        "final_train_loss": sum(m["main_loss"] for m in res.metrics[-20:]) / len(res.metrics[-20:]),
        "info": prepared.info,
        "base_fingerprint": fp,
    }
    row["cold"] = measure(model, base, fp, recipe, dataset, tok, gate)
    if recipe.grpo_steps:
        g = GRPOConfig(steps=recipe.grpo_steps, lr=recipe.grpo_lr, temperature=recipe.grpo_temperature,
                       beta=recipe.grpo_beta, eval_every=0, eval_problems=16, eval_samples=1,
                       max_new_tokens=recipe.max_new_tokens, seed=recipe.seed, device=recipe.device,
                       bias_update_speed=None if not recipe.is_delta else 0.0)  # fmt: skip
        t1 = time.perf_counter()
        r = grpo_train(model, get_task(recipe.task), g, tokenizer=tok, progress=progress)
        row["grpo"] = measure(model, base, fp, recipe, dataset, tok, gate)
        row["grpo"]["seconds"] = time.perf_counter() - t1
        row["grpo"]["train_acc"] = [round(m.get("accuracy", 0.0), 3) for m in r.metrics]
    prepared.masks.close()
    if recipe.is_delta:
        if out is not None:
            row["delta_bytes"] = save_delta(prepared, out, base, recipe=asdict(recipe), overwrite=overwrite)["bytes"]
        else:
            with tempfile.TemporaryDirectory() as tmp:
                row["delta_bytes"] = save_delta(prepared, Path(tmp) / "delta", base, recipe=asdict(recipe))["bytes"]
    else:
        row["delta_bytes"] = None  # full fine-tuning changed the base: it ships as a whole model
        if out is not None:
            from workbench.io.hf import save_hf

            save_hf(model, out, overwrite=overwrite)
    model.requires_grad_(False)
    return row, prepared


@torch.no_grad()
def describe_row(row: dict[str, Any]) -> str:
    c = row["cold"]
    s = (f"{row['task']} {row['method']} lr={row['lr']} replay={row['replay']} seed={row['seed']}: "
         f"acc {c['acc']:.3f} old_acc {c['old_acc']:.3f} loss {c['loss']:.3f} old_loss {c['old_loss']:.3f} "
         f"params {row['trained_params']:,} step {1000 * row['step_s']:.0f} ms")  # fmt: skip
    if "gated" in c:
        s += f" | gated acc {c['gated']['acc']:.3f} old {c['gated']['old_acc']:.3f}"
    if "grpo" in row:
        s += f" | grpo acc {row['grpo']['acc']:.3f} old {row['grpo']['old_acc']:.3f}"
    return s


__all__ = ["correctness", "describe_row", "fit_gate", "measure", "recipe_dataset", "specialise"]
