"""The recipe of a vertical: a cold start on worked problems mixed with replay of the old corpus, GRPO on
the same parameters, and the folder a grown model is saved to."""

from __future__ import annotations

import json
import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from workbench.config import ConfigError
from workbench.io.files import CheckpointError, atomic_write_json
from workbench.model import Model
from workbench.vertical.freeze import Trainable, flops_saved_estimate, new_token_ids, train_only_new_experts
from workbench.vertical.grow import AddedExperts, add_expert
from workbench.vertical.measure import domain_windows, old_windows, vertical_metrics
from workbench.vertical.wake import wake_experts


@dataclass
class VerticalConfig:
    """The knobs of ``train_vertical``: language modelling on the new domain with replay of the old."""

    steps: int = 200
    batch_size: int = 16
    seq_len: int = 64
    lr: float = 3e-3  # only a few small matrices train, so a pre-training-sized rate is safe
    warmup_steps: int = 10
    replay_fraction: float = 0.5  # share of the training tokens drawn from the base corpus
    n_new_docs: int = 600  # new-domain documents: train-split problems with their worked traces
    n_old_docs: int = 1000  # base-corpus documents for replay and the old-domain measurements
    bias_update_speed: float | None = 0.0  # gamma for the new experts' bias (None: the model's); see above
    train_router: bool = True
    train_new_tokens: bool = True  # the embedding/head rows of tokens the base never saw (<think>, ...)
    eval_every: int = 50
    seed: int = 0
    device: str = "auto"

    def __post_init__(self) -> None:
        if not 0.0 <= self.replay_fraction < 1.0:
            raise ConfigError(f"replay_fraction must be in [0, 1), got {self.replay_fraction}")
        for name in ("steps", "batch_size", "seq_len", "n_new_docs"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")


def vertical_dataset(task, cfg: VerticalConfig, tokenizer, replay: Sequence | None = None):
    """A ``TokenDataset`` of the new domain (``task`` problems with their traces, domain = task name) and
    of replay documents from what the base was trained on, enough of them to make ``replay_fraction``
    of the tokens. replay: those documents (``data.Document``); default: the five-domain corpus, drawn
    with another seed than the one the shipped tiny model was trained on."""
    from workbench.data import Document, TokenDataset, generate_corpus

    problems = task.sample(cfg.n_new_docs, seed=cfg.seed)
    new_docs = [Document(task.name, task.prompt(ex) + task.trace(ex)) for ex in problems]
    old_docs = list(replay) if replay is not None else generate_corpus(cfg.n_old_docs, seed=1000 + cfg.seed)
    if not old_docs:
        raise ValueError("replay holds no documents; the old domains are needed to measure forgetting")
    if any(d.domain == task.name for d in old_docs):
        raise ValueError(f"the replay documents already contain the new domain {task.name!r}")
    if cfg.replay_fraction > 0:
        new_tokens = sum(len(tokenizer.encode(d.text)) + 2 for d in new_docs)
        sample = old_docs[:100]
        per_old = sum(len(tokenizer.encode(d.text)) + 2 for d in sample) / len(sample)
        wanted = math.ceil(cfg.replay_fraction / (1 - cfg.replay_fraction) * new_tokens / per_old)
        kept = old_docs[: max(2, min(len(old_docs), wanted))]
    else:
        kept = old_docs[: max(2, len(old_docs) // 10)]  # kept for the old-domain measurements only
    return TokenDataset.from_documents(new_docs + kept, tokenizer, val_fraction=0.1, seed=cfg.seed)


def replay_documents(task, n: int = 2000, *, seed: int = 0, think_fraction: float = 0.5) -> list:
    """Documents like an R1 base's pre-training corpus for ``task`` (``rl.base.base_documents``, drawn with
    another seed), labelled with the task's name as their domain: the replay of a vertical grown on it."""
    from workbench.data import Document
    from workbench.rl.base import base_documents

    return [Document(task.name, d.text) for d in base_documents(task, n, seed=seed, think_fraction=think_fraction)]


@dataclass
class VerticalReport:
    trainable: Trainable
    added: AddedExperts
    metrics: list[dict[str, Any]]
    seconds: float
    flops_saved: float  # estimated share of a full fine-tuning step's FLOPs that is skipped

    def summary(self) -> str:
        t = self.trainable
        return (
            f"trained {t.parameters:,} of {t.total:,} parameters ({100 * t.fraction:.2f}%); "
            f"optimizer state {2 * t.parameters * 4 / 1e6:.2f} MB instead of {2 * t.total * 4 / 1e6:.2f} MB; "
            f"about {100 * self.flops_saved:.0f}% of a full fine-tuning step's FLOPs skipped; {self.seconds:.0f} s"
        )


def train_vertical(
    model: Model,
    added: AddedExperts,
    task,
    cfg: VerticalConfig | None = None,
    *,
    dataset=None,
    tokenizer=None,
    out_dir: str | Path | None = None,
    progress: bool = True,
) -> VerticalReport:
    """Teach the new experts the new domain (in place): LM training with ``workbench.train.train`` on
    the new domain's worked problems mixed with replay of the base corpus, everything else frozen."""
    from workbench.io.tokenizer import tokenizer_of
    from workbench.train import TrainConfig, train

    cfg = cfg or VerticalConfig()
    tok = tokenizer_of(model, tokenizer)
    dataset = dataset if dataset is not None else vertical_dataset(task, cfg, tok)
    tokens: list[int] = []
    if cfg.train_new_tokens:
        old = [d for d in dataset.domains if d != task.name]
        old_ids = torch.tensor([dataset.domains.index(d) for d in old])
        old_stream = dataset.tokens["train"][torch.isin(dataset.token_domains["train"], old_ids)]
        tokens = new_token_ids(tok, old_stream, [task.trace(ex) for ex in task.sample(50, seed=cfg.seed)])
    added.train_tokens = tokens
    tc = TrainConfig(
        steps=cfg.steps,
        batch_size=cfg.batch_size,
        seq_len=cfg.seq_len,
        lr=cfg.lr,
        warmup_steps=cfg.warmup_steps,
        weight_decay=0.0,  # decoupled decay would shrink the frozen rows of the stacked experts
        bias_update_speed=cfg.bias_update_speed,
        eval_every=cfg.eval_every,
        seed=cfg.seed,
        device=cfg.device,
    )
    t0 = time.perf_counter()
    with train_only_new_experts(model, added, train_router=cfg.train_router, train_tokens=tokens) as trainable:
        result = train(model.config, tc, out_dir, dataset=dataset, model=model, progress=progress, overwrite=True,
                       balance_masks=trainable.balance_masks)  # fmt: skip
    if out_dir is not None:
        added.save(Path(out_dir))
    return VerticalReport(
        trainable=trainable,
        added=added,
        metrics=result.metrics,
        seconds=time.perf_counter() - t0,
        flops_saved=flops_saved_estimate(model, trainable),
    )


def run_vertical(
    base: str | Path | Model | None = None,
    task_name: str = "sub",
    out: str | Path | None = None,
    *,
    replay_task: str | None = "add",
    scale: str = "laptop",
    n: int | None = None,
    layers: Sequence[int] | None = None,
    init: str = "copy",
    old_rate: float = 0.05,
    steps: int = 3000,
    replay: float = 0.75,
    lr: float = 3e-3,
    grpo_steps: int = 20,
    seed: int = 0,
    device: str = "auto",
    overwrite: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """The whole recipe (``python -m workbench vertical``): grow, wake, train the new experts on the new
    domain, GRPO them, measure before and after. Writes OUT/model and OUT/report.json.

    base: a model or a model folder; None pre-trains the R1 base of ``replay_task`` at ``scale``
        (``rl.pipeline.make_base``, about two minutes on a laptop for ``add``).
    replay_task: the task the base was trained on: its documents are the replay, and its held-out
        accuracy is the old-domain accuracy. None: the base is a five-domain model such as
        ``data/tiny-model``, and the replay is the generated corpus.
    """
    from workbench.io.hf import load_hf
    from workbench.io.tokenizer import load_tokenizer
    from workbench.rl.grpo import GRPOConfig, grpo_train
    from workbench.rl.pipeline import get_scale, make_base
    from workbench.tasks import get_task
    from workbench.util import resolve_device

    out = Path(out) if out is not None else None
    if out is not None and (out / "model").exists() and not overwrite:
        raise CheckpointError(f"{out / 'model'} exists; pass overwrite=True (--overwrite) or choose another folder")
    tok, task = load_tokenizer(), get_task(task_name)
    old_task = get_task(replay_task) if replay_task is not None else None
    if isinstance(base, Model):
        model = base
    elif base is not None:
        model = load_hf(base, device=resolve_device(device))
    elif old_task is not None:
        model = make_base(old_task, scale, seed=seed, progress=progress)
    else:
        raise ValueError("give a base model (a folder), or a replay_task whose R1 base to pre-train")
    cfg = VerticalConfig(steps=steps, replay_fraction=replay, lr=lr, eval_every=0, seed=seed, device=device)
    docs = None
    if old_task is not None:
        docs = replay_documents(old_task, seed=seed + 7, think_fraction=get_scale(scale).think_fraction)
    dataset = vertical_dataset(task, cfg, tok, replay=docs)
    measure = dict(old_task=old_task, tokenizer=tok)
    before = vertical_metrics(model, task, dataset, **measure)
    new_ids = domain_windows(dataset, task.name, 16, seed=seed).to(model.device)
    old_ids = old_windows(dataset, task.name, 32, seed=seed).to(model.device)
    n = n or 2 * model.config.n_group  # two per routing group: what lesson 9 found enough for subtraction
    grown, added = add_expert(model, n, layers, init, probe_ids=new_ids, seed=seed)
    woken = wake_experts(grown, added, new_ids, old_ids, old_rate=old_rate)
    report = train_vertical(grown, added, task, cfg, dataset=dataset, tokenizer=tok, progress=progress)
    stages = {"base": before, "cold_start": vertical_metrics(grown, task, dataset, added, **measure)}
    if grpo_steps:
        g = GRPOConfig(steps=grpo_steps, eval_every=0, lr=1e-4, beta=0.04, seed=seed, device=device,
                       bias_update_speed=cfg.bias_update_speed)  # fmt: skip
        with train_only_new_experts(grown, added) as trainable:
            grpo_train(grown, task, g, tokenizer=tok, progress=progress, balance_masks=trainable.balance_masks)
        stages["grpo"] = vertical_metrics(grown, task, dataset, added, **measure)
    last = stages[list(stages)[-1]]
    summary = {
        "added": added.describe(),
        "trained": report.summary(),
        "accuracy": {k: v["accuracy"] for k, v in stages.items()},
        "old_accuracy": {k: v.get("old_accuracy") for k, v in stages.items()},
        "old_completion_loss": {k: v.get("old_completion_loss") for k, v in stages.items()},
        "old_domain_loss_change": {
            d: last["loss"][d] / before["loss"][d] - 1 for d in before["loss"] if d != task.name
        },
    }
    result = {"summary": summary, "stages": stages, "wake": woken, "added": asdict(added), "seconds": report.seconds}
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        save_vertical(grown, added, out / "model")
        atomic_write_json(out / "report.json", json.loads(json.dumps(result, default=str)))
    result["model"] = grown
    return result


def save_vertical(model: Model, added: AddedExperts, folder: str | Path) -> Path:
    """The grown model as a Hugging Face folder (like any other) plus ``vertical.json``."""
    from workbench.io.hf import save_hf

    folder = Path(folder)
    save_hf(model, folder)
    added.save(folder)
    return folder


def load_vertical(folder: str | Path) -> tuple[Model, AddedExperts]:
    from workbench.io.hf import load_hf

    return load_hf(folder), AddedExperts.load(folder)
