"""Pre-training: next-token prediction on the generated corpus (or your own text), on the one loop.

One step does what DeepSeek-V3's training step does, at small scale:

1. forward with labels -> loss = main CE + lambda * MTP CE + alpha * sequence balance loss;
2. backward, clip the gradient norm, AdamW step with the scheduled learning rate;
3. auxiliary-loss-free balancing: every router's bias moves by gamma toward balance, from the
   expert loads observed in this step (``Model.update_expert_bias``).

Steps 2 and 3 are the loop's (``workbench.train.loop``); this module supplies step 1 (``LMTrainer``:
random windows of the token stream, drawn by its own seeded sampler) and the validation loss. Every step
appends one JSON line to ``<out>/metrics.jsonl`` (loss parts, learning rate, gradient norm, MaxVio of
the routing, tokens seen, wall time; ``eval_loss`` every ``eval_every`` steps), which lessons plot;
``<out>/checkpoint`` is the newest checkpoint (``workbench.train.run``):

    checkpoint/model/                  a Hugging Face folder (config.json, weights, tokenizer)
    checkpoint/optimizer.safetensors   AdamW moments, one tensor per parameter and moment
    checkpoint/state.json              step, the training config, random states (the data sampler's too)

Because the model, the optimiser, the schedule (a function of the step) and every random state are
restored, a resumed run produces the same losses as an uninterrupted one. Simplifications against
DeepSeek-V3: no batch-size warmup, no pipeline/expert parallelism in training (data parallel under
``torchrun`` with ``parallel="ddp"`` or ``"fsdp"``: each rank takes its rows of the batch), bf16 autocast by default
(``ModelConfig(fp8=True)`` trains through ``workbench.fp8`` instead; see lesson 6), and a cosine
schedule instead of their staged one.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch

from workbench.config import ConfigError, ModelConfig
from workbench.model import Model
from workbench.train.loop import FitResult, Update, fit
from workbench.train.optim import LoopConfig, lr_at, make_optimizer
from workbench.train.run import read_metrics
from workbench.util import eval_mode


@dataclass
class TrainConfig(LoopConfig):
    """Every knob of a pre-training run. Defaults suit the ``tiny`` preset on a CPU."""

    batch_size: int = 16  # sequences per step
    seq_len: int = 128  # tokens per sequence
    eval_batches: int = 4  # validation windows of batch_size sequences per evaluation
    n_docs: int = 4000  # size of the generated corpus
    data_seed: int = 0  # which corpus is generated

    resume_may_change: ClassVar[frozenset[str]] = LoopConfig.resume_may_change | {"eval_batches"}

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("batch_size", "seq_len", "eval_batches", "n_docs"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")


@dataclass
class TrainResult:
    model: Model
    metrics: list[dict[str, Any]]
    out_dir: Path | None


def default_dataset(tc: TrainConfig):
    """The generated multi-domain corpus, tokenized with the shipped tokenizer."""
    from workbench.data import TokenDataset, generate_corpus
    from workbench.io.tokenizer import load_tokenizer

    return TokenDataset.from_documents(
        generate_corpus(tc.n_docs, seed=tc.data_seed), load_tokenizer(), seed=tc.data_seed
    )


@torch.no_grad()
def validation_loss(model: Model, dataset, tc: TrainConfig) -> float:
    """Mean next-token loss over fixed validation windows."""
    losses = []
    with eval_mode(model):
        for ids, _domains in dataset.eval_batches(tc.batch_size, tc.seq_len, tc.eval_batches):
            ids = ids.to(model.device)
            losses.append(float(model(ids, labels=ids, compute_mtp=False).main_loss))
    return sum(losses) / len(losses)


class LMTrainer:
    """A step of language modelling: a batch of random windows, the full objective, one update."""

    desc = "train"
    uses_every_parameter = True  # the full objective runs every module, MTP included

    def __init__(self, dataset, tc: TrainConfig) -> None:
        self.dataset, self.tc = dataset, tc
        self.sampler = torch.Generator().manual_seed(tc.seed)

    def step(self, model: Model, update: Update) -> dict[str, Any]:
        ids, _domains = self.dataset.get_batch("train", self.tc.batch_size, self.tc.seq_len, self.sampler)
        ids = update.shard(ids).to(model.device)  # this process's rows (all of them in one process)
        output = model(ids, labels=ids)  # equal shards hold equally many labelled tokens: no reweighting
        output.loss.backward()
        update(output.loss, output.routing)
        return {**output.loss_parts(), "tokens": update.count * self.tc.batch_size * self.tc.seq_len}

    def state(self) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        return {"sampler": self.sampler.get_state().tolist()}, {}

    def load_state(self, values: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
        self.sampler.set_state(torch.tensor(values["sampler"], dtype=torch.uint8))


def check_vocabulary(dataset, model_config: ModelConfig) -> None:
    """Every token id of the data must have a row in the embedding."""
    largest_id = int(dataset.tokens["train"].max())
    if largest_id >= model_config.vocab_size:
        raise ConfigError(
            f"the data holds token id {largest_id} but vocab_size={model_config.vocab_size}; "
            f"set vocab_size >= {largest_id + 1} (the tokenizer's size)"
        )


def train(
    model_config: ModelConfig,
    tc: TrainConfig,
    out_dir: str | Path | None = None,
    *,
    dataset=None,
    resume: bool = False,
    stop_at: int | None = None,
    progress: bool = True,
    model: Model | None = None,
    overwrite: bool = False,
    balance_masks: list[torch.Tensor | None] | None = None,
) -> TrainResult:
    """Pre-train a model; returns it with the per-step metrics.

    out_dir: the run folder for metrics.jsonl and the checkpoints (None: keep nothing on disk).
    resume: continue from the newest checkpoint in ``out_dir`` (same losses as never stopping).
    stop_at: stop after this step (and checkpoint), as if interrupted; resume later with the same config.
    model: start from these weights instead of a fresh initialisation.
    overwrite: start afresh even if ``out_dir`` already holds a run (otherwise that is an error).
    """
    if out_dir is not None:  # refuse a folder before the (possibly slow) corpus is built
        from workbench.train.run import RunFolder

        RunFolder(out_dir).claim(resume=resume, overwrite=overwrite)
    dataset = dataset if dataset is not None else default_dataset(tc)
    check_vocabulary(dataset, model_config if model is None else model.config)
    torch.manual_seed(tc.seed)
    if model is None:
        model = Model(model_config)
    if getattr(dataset, "tokenizer", None) is not None:
        model.tokenizer = dataset.tokenizer
    result: FitResult = fit(
        model,
        tc,
        LMTrainer(dataset, tc),
        out_dir=out_dir,
        evaluate=lambda m: {"loss": validation_loss(m, dataset, tc)},
        resume=resume,
        overwrite=overwrite,
        stop_at=stop_at,
        progress=progress,
        balance_masks=balance_masks,
    )
    return TrainResult(model=result.model, metrics=result.metrics, out_dir=result.out_dir)


__all__ = [
    "LMTrainer",
    "TrainConfig",
    "TrainResult",
    "check_vocabulary",
    "default_dataset",
    "validation_loss",
    "lr_at",
    "make_optimizer",
    "read_metrics",
    "train",
]
