"""Measuring a vertical: accuracy on the new and the old task, loss per domain, which tokens the new
experts (or any set of experts, ``expert_share``) take, and the windows of each domain those measurements read."""

from __future__ import annotations

import random
from typing import Any

import torch

from workbench.model import Model
from workbench.util import eval_mode
from workbench.vertical.grow import AddedExperts, moe_layers
from workbench.vertical.wake import _router_inputs, _share_to, selection_rate


@torch.no_grad()
def completion_loss(model: Model, task, n_problems: int = 64, *, tokenizer=None, split: str = "test") -> float:
    """Mean next-token loss of a task's worked completions (trace and answer) given their prompts, on
    held-out problems: what the model knows of the task, without the loss of guessing the question."""
    from workbench.io.tokenizer import tokenizer_of
    from workbench.rl.sft import sft_batch

    tok = tokenizer_of(model, tokenizer)
    pairs = [(task.prompt(ex), task.trace(ex)) for ex in task.sample(n_problems, seed=0, split=split)]
    ids, labels = sft_batch(tok, pairs)
    with eval_mode(model):
        loss = float(model(ids.to(model.device), labels=labels.to(model.device), compute_mtp=False).main_loss)
    return loss


@torch.no_grad()
def vertical_metrics(
    model: Model,
    task,
    dataset,
    added: AddedExperts | None = None,
    *,
    old_task=None,
    tokenizer=None,
    n_problems: int = 64,
    max_new_tokens: int = 64,
    n_batches: int = 4,
) -> dict[str, Any]:
    """Everything the lesson compares before and after: new-domain accuracy (greedy, held-out problems),
    the old task's (with ``old_task``), validation loss per domain; with ``added`` also the share of each
    domain's tokens that pick a new expert, per layer, and the load balance (MaxVio over the experts that
    exist) of each grown layer."""
    from workbench.io.tokenizer import tokenizer_of
    from workbench.rl.rollout import held_out_evaluator
    from workbench.train.measure import expert_usage_by_domain, loss_by_domain

    tok = tokenizer_of(model, tokenizer)

    def greedy(t) -> dict[str, Any]:
        return held_out_evaluator(t, tok, n_problems, max_new_tokens=max_new_tokens)(model)

    ev = greedy(task)
    out = {"accuracy": ev["accuracy"], "format": ev["format"], "length": ev["length"]}
    out["completion_loss"] = completion_loss(model, task, n_problems, tokenizer=tok)
    if old_task is not None:
        out["old_accuracy"] = greedy(old_task)["accuracy"]
        out["old_completion_loss"] = completion_loss(model, old_task, n_problems, tokenizer=tok)
    out["loss"] = loss_by_domain(model, dataset, n_batches=n_batches)
    if added is None:
        return out
    new_share: dict[int, dict[str, float]] = {layer: {} for layer in added.layers}
    for d in dataset.domains:  # share of each domain's tokens that send a slot to a new expert
        rates = selection_rate(model, added, domain_windows(dataset, d, 8 * n_batches).to(model.device))
        for layer, rate in rates.items():
            new_share[layer][d] = rate
    usage = expert_usage_by_domain(model, dataset, n_batches=n_batches)  # (main MoE layers, domains, E)
    main = [i for i in moe_layers(model) if i < model.config.num_hidden_layers]
    load = usage.mean(dim=1)  # (layers, E): share of the slots, the domains weighted equally
    maxvio = {}
    for li, layer in enumerate(main):
        if layer in added.layers:
            live = load[li][torch.isfinite(moe_layers(model)[layer].gate.e_score_correction_bias.cpu())]
            maxvio[layer] = float((live.max() - live.mean()) / live.mean())
    return {**out, "new_expert_share": new_share, "maxvio": maxvio}


@torch.no_grad()
def expert_share(model: Model, experts: dict, ids: torch.Tensor) -> dict[int, float]:
    """Per MoE layer named in ``experts`` ({layer: [expert indices]}, e.g. ``Prepared.info["trained_experts"]``):
    the share of the tokens of ``ids`` (B, T) that send at least one routed slot to one of those experts.
    On the new domain's windows against the old one's it says whose tokens a method's trained experts take."""
    layers = sorted(int(k) for k, v in experts.items() if len(v))
    moes = moe_layers(model)
    unknown = [i for i in layers if i not in moes]
    if unknown:
        raise ValueError(f"layers {unknown} are not MoE layers of this model (its MoE layers: {sorted(moes)})")
    inputs = _router_inputs(model, ids, layers)
    out = {}
    for i in layers:
        chosen = torch.tensor(sorted(int(e) for e in experts.get(i, experts.get(str(i), []))), device=model.device)
        out[i] = _share_to(moes[i].gate, inputs[i], chosen)
    return out


def domain_windows(dataset, domain: str, n: int = 8, seq_len: int = 64, seed: int = 0) -> torch.Tensor:
    """(n, seq_len) validation windows of one domain of a ``TokenDataset``."""
    ids, _ = dataset.domain_batch(domain, "val", n, seq_len, torch.Generator().manual_seed(seed))
    return ids


def old_windows(dataset, new_domain: str, n: int = 8, seq_len: int = 64, seed: int = 0) -> torch.Tensor:
    """(n, seq_len) validation windows spread over every domain but ``new_domain``."""
    old = [d for d in dataset.domains if d != new_domain]
    rng = random.Random(seed)
    rows = [domain_windows(dataset, rng.choice(old), 1, seq_len, seed + i) for i in range(n)]
    return torch.cat(rows)
