"""What a model outputs, measured in units that can carry error bars: per sequence, per prompt, per problem.

A single agreement rate over 4,096 positions hides that positions of one sequence are not independent.
These functions return one number per independent unit, ready for ``stats.mean_interval`` or
``stats.paired_difference``:

* ``sequence_losses(model, batches)`` and ``sequence_agreement(reference, model, batches)``: mean
  next-token loss, and the share of positions whose greedy next token matches the reference model's,
  per sequence of the batches;
* ``main_and_mtp_losses(model, batches)``: per batch, the main next-token loss and the MTP loss (the
  token after next) on the same windows, a paired comparison;
* ``greedy_continuations(model, prompts, n)`` and ``same_text(a, b)``: what greedy decoding writes, and
  for each prompt whether two models wrote the same tokens (and where they first part);
* ``per_problem_accuracy(samples)``: one accuracy per problem from ``rl.rollout.evaluate(...,
  return_samples=True)`` (its samples of one problem are correlated; the problems are not);
* ``reasoning_split(samples)``: the accuracy of completions that reason (``<think>``) and of those that
  answer directly, as counts for ``stats.proportion_difference``.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Sequence
from typing import Any

import torch
import torch.nn.functional as F

from workbench.model import Model
from workbench.model.generate import generate
from workbench.tasks.rewards import THINK
from workbench.util import eval_mode


def _ids(batch) -> torch.Tensor:
    ids = batch[0] if isinstance(batch, (tuple, list)) else batch
    if not isinstance(ids, torch.Tensor) or ids.dim() != 2 or ids.shape[1] < 2:
        raise ValueError(f"each batch must be token ids (batch, seq_len >= 2), got {getattr(ids, 'shape', ids)!r}")
    return ids


@torch.no_grad()
def sequence_losses(model: Model, batches: Iterable) -> list[float]:
    """Mean next-token cross-entropy of every sequence in ``batches`` (token ids (B, T))."""
    out: list[float] = []
    with eval_mode(model):
        for batch in batches:
            ids = _ids(batch).to(model.device)
            logits = model(ids, compute_mtp=False).logits.float()  # (B, T, V)
            ce = F.cross_entropy(logits[:, :-1].transpose(1, 2), ids[:, 1:], reduction="none")  # (B, T-1)
            out += ce.mean(dim=1).tolist()
    if not out:
        raise ValueError("batches is empty")
    return out


@torch.no_grad()
def sequence_agreement(reference: Model, model: Model, batches: Iterable) -> list[float]:
    """Per sequence: the share of positions where ``model``'s greedy next token equals ``reference``'s."""
    out: list[float] = []
    with eval_mode(reference), eval_mode(model):
        for batch in batches:
            ids = _ids(batch)
            a = reference(ids.to(reference.device), compute_mtp=False).logits.argmax(-1).cpu()  # (B, T)
            b = model(ids.to(model.device), compute_mtp=False).logits.argmax(-1).cpu()
            out += (a == b).float().mean(dim=1).tolist()
    if not out:
        raise ValueError("batches is empty")
    return out


@torch.no_grad()
def main_and_mtp_losses(model: Model, batches: Iterable) -> tuple[list[float], list[float]]:
    """Per batch: (main next-token loss, MTP loss of the token after next), on the same windows."""
    if len(model.mtp) == 0:
        raise ValueError("the model has no MTP module (num_nextn_predict_layers=0): there is no MTP loss")
    main, mtp = [], []
    with eval_mode(model):
        for batch in batches:
            ids = _ids(batch).to(model.device)
            out = model(ids, labels=ids, compute_mtp=True)
            main.append(float(out.main_loss))
            mtp.append(float(out.mtp_loss))
    if not main:
        raise ValueError("batches is empty")
    return main, mtp


@torch.no_grad()
def greedy_continuations(model: Model, prompts: Sequence[Sequence[int]], n_tokens: int) -> list[list[int]]:
    """The ``n_tokens`` tokens greedy decoding writes after each prompt (ids without the prompt)."""
    if n_tokens < 1:
        raise ValueError(f"n_tokens must be >= 1, got {n_tokens}")
    out = []
    for p in prompts:
        ids = generate(model, list(p), n_tokens)  # (1, T0 + n)
        out.append(ids[0, len(p) :].tolist())
    return out


def same_text(a: Sequence[Sequence[int]], b: Sequence[Sequence[int]]) -> tuple[list[bool], list[int | None]]:
    """For each pair of continuations: identical?, and the first position where they differ (None if never)."""
    if len(a) != len(b):
        raise ValueError(f"need as many continuations on each side, got {len(a)} and {len(b)}")
    same, first = [], []
    for x, y in zip(a, b):
        where = next((i for i, (u, v) in enumerate(zip(x, y)) if u != v), None)
        if where is None and len(x) != len(y):
            where = min(len(x), len(y))
        same.append(where is None)
        first.append(where)
    return same, first


def per_problem_accuracy(samples: Sequence[tuple[str, str, float, float]]) -> dict[str, float]:
    """Mean accuracy per question from ``evaluate(..., return_samples=True)["samples"]``, in first-seen order."""
    sums: dict[str, list[float]] = defaultdict(list)
    for question, _completion, accuracy, _format in samples:
        sums[question].append(float(accuracy))
    if not sums:
        raise ValueError("no samples: evaluate with return_samples=True")
    return {q: sum(v) / len(v) for q, v in sums.items()}


def paired_rates(a: dict[str, float], b: dict[str, float]) -> tuple[list[float], list[float]]:
    """Two models' per-problem rates on the same problems, aligned (refuses different problem sets)."""
    if set(a) != set(b):
        raise ValueError(f"the two evaluations cover different problems ({len(set(a) ^ set(b))} differ)")
    keys = list(a)
    return [a[k] for k in keys], [b[k] for k in keys]


def reasoning_split(samples: Sequence[tuple[str, str, float, float]]) -> dict[str, Any]:
    """Accuracy counts of completions that start reasoning (``<think>``) and of those that do not."""
    right = {"reasoned": 0, "direct": 0}
    total = {"reasoned": 0, "direct": 0}
    for _q, completion, accuracy, _f in samples:
        kind = "reasoned" if THINK in completion else "direct"
        total[kind] += 1
        right[kind] += int(accuracy > 0)
    return {"right": right, "total": total}


def reasoning_rates(samples: Sequence[tuple[str, str, float, float]]) -> tuple[list[float], list[float]]:
    """Per problem, the accuracy of its reasoned samples and of its direct ones, for the problems that have
    both (paired by problem: samples of one problem are not independent of each other)."""
    by: dict[str, dict[str, list[float]]] = defaultdict(lambda: {"reasoned": [], "direct": []})
    for q, completion, accuracy, _f in samples:
        by[q]["reasoned" if THINK in completion else "direct"].append(float(accuracy > 0))
    both = [v for v in by.values() if v["reasoned"] and v["direct"]]
    return [sum(v["reasoned"]) / len(v["reasoned"]) for v in both], [sum(v["direct"]) / len(v["direct"]) for v in both]


__all__ = [
    "greedy_continuations",
    "main_and_mtp_losses",
    "paired_rates",
    "per_problem_accuracy",
    "reasoning_rates",
    "reasoning_split",
    "same_text",
    "sequence_agreement",
    "sequence_losses",
]
