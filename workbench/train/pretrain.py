"""Pre-training loop: AdamW, warmup + cosine decay, clipping, balancing, checkpoints that resume exactly.

One optimiser step does what DeepSeek-V3's training step does, at small scale:

1. forward with labels -> loss = main CE + lambda * MTP CE + alpha * sequence balance loss;
2. backward, clip the gradient norm, AdamW step with the scheduled learning rate;
3. auxiliary-loss-free balancing: every router's bias moves by gamma toward balance, from the
   expert loads observed in this step (``Model.update_expert_bias``).

Every step appends one JSON line to ``<out>/metrics.jsonl`` (loss parts, learning rate, gradient
norm, MaxVio of the routing, tokens seen, wall time; ``eval_loss`` every ``eval_every`` steps), which
lessons plot. ``<out>/checkpoint`` holds the latest checkpoint, written atomically:

    checkpoint/model/         a Hugging Face folder (config.json + model.safetensors), see ``workbench.io.hf``
    checkpoint/optimizer.safetensors   AdamW moments, one tensor per parameter and moment
    checkpoint/state.json              step, the training config, the data sampler's RNG state

Because the model, the optimiser, the schedule (a function of the step) and the data sampler's
random state are all restored, a resumed run produces the same losses as an uninterrupted one.
Simplifications against DeepSeek-V3: no batch-size warmup, no pipeline/expert parallelism, bf16
autocast by default (``ModelConfig(fp8=True)`` trains through ``workbench.fp8`` instead; see
lesson 6), and a cosine schedule instead of their staged one.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from workbench.config import ConfigError, ModelConfig
from workbench.io.files import (
    CheckpointError,
    atomic_write_json,
    load_tensors,
    read_json,
    save_tensors,
    write_folder_atomically,
)
from workbench.model import Model
from workbench.util import resolve_device


@dataclass
class TrainConfig:
    """Every knob of a training run. Defaults suit the ``tiny`` preset on a CPU."""

    steps: int = 300  # optimiser steps in total
    batch_size: int = 16  # sequences per step
    seq_len: int = 128  # tokens per sequence
    lr: float = 3e-3  # peak learning rate
    min_lr_ratio: float = 0.1  # the cosine decays to lr * min_lr_ratio
    warmup_steps: int = 30
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0  # max global gradient norm (0 disables clipping)
    eval_every: int = 50  # steps between evaluations (0: only at the end)
    eval_batches: int = 4
    checkpoint_every: int = 0  # steps between checkpoints (0: only at the end)
    seed: int = 0  # model init and data sampling
    n_docs: int = 4000  # size of the generated corpus
    data_seed: int = 0  # which corpus is generated
    device: str = "auto"  # "auto" picks CUDA when present
    bf16: bool = True  # bf16 autocast on CUDA (always fp32 on CPU)

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "seq_len", "eval_batches"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("warmup_steps", "eval_every", "checkpoint_every", "grad_clip", "weight_decay"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be >= 0, got {getattr(self, name)}")
        if not self.lr > 0:
            raise ConfigError(f"lr must be positive, got {self.lr}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ConfigError(f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")


def lr_at(step: int, tc: TrainConfig) -> float:
    """Linear warmup to ``lr`` over ``warmup_steps``, then cosine decay to ``lr * min_lr_ratio``."""
    if step < tc.warmup_steps:
        return tc.lr * (step + 1) / tc.warmup_steps
    progress = (step - tc.warmup_steps) / max(1, tc.steps - tc.warmup_steps)
    cosine = 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return tc.lr * (tc.min_lr_ratio + (1 - tc.min_lr_ratio) * cosine)


def make_optimizer(model: Model, tc: TrainConfig) -> torch.optim.AdamW:
    """AdamW; no weight decay on norms and biases (1-D tensors) or the embedding."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.dim() < 2 or name.startswith("embed_tokens") else decay).append(p)
    groups = [{"params": decay, "weight_decay": tc.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=tc.lr, betas=(tc.beta1, tc.beta2), eps=1e-8)


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
def evaluate(model: Model, dataset, tc: TrainConfig, device: torch.device) -> float:
    """Mean next-token loss over fixed validation windows."""
    was_training = model.training
    model.eval()
    losses = []
    for ids, _domains in dataset.eval_batches(tc.batch_size, tc.seq_len, tc.eval_batches):
        ids = ids.to(device)
        with _autocast(device, tc):
            losses.append(float(model(ids, labels=ids, compute_mtp=False).main_loss))
    model.train(was_training)
    return sum(losses) / len(losses)


def _autocast(device: torch.device, tc: TrainConfig):
    enabled = device.type == "cuda" and tc.bf16
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=enabled)


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
) -> TrainResult:
    """Train a model; returns it with the per-step metrics.

    out_dir: where metrics.jsonl and checkpoint/ go (None: keep nothing on disk).
    resume: continue from ``out_dir/checkpoint`` if it exists (same losses as never stopping).
    stop_at: stop after this step (and checkpoint), as if interrupted; resume later with the same config.
    model: start from these weights instead of a fresh initialisation.
    overwrite: start afresh even if ``out_dir`` already holds a run (otherwise that is an error).
    """
    device = resolve_device(tc.device)
    out = Path(out_dir) if out_dir is not None else None
    dataset = dataset if dataset is not None else default_dataset(tc)
    largest_id = int(dataset.tokens["train"].max())
    if largest_id >= model_config.vocab_size:
        raise ConfigError(
            f"the data holds token id {largest_id} but vocab_size={model_config.vocab_size}; "
            f"set vocab_size >= {largest_id + 1} (the tokenizer's size)"
        )

    torch.manual_seed(tc.seed)
    if model is None:
        model = Model(model_config)
    model.to(device).train()
    if getattr(dataset, "tokenizer", None) is not None:
        model.tokenizer = dataset.tokenizer
    optimizer = make_optimizer(model, tc)
    sampler = torch.Generator().manual_seed(tc.seed)
    start_step = 0
    metrics: list[dict[str, Any]] = []

    ckpt = out / "checkpoint" if out is not None else None
    if resume and ckpt is not None and ckpt.exists():
        start_step = load_training_checkpoint(ckpt, model, optimizer, sampler, tc)
        metrics = _read_metrics(out / "metrics.jsonl", upto=start_step)
    elif out is not None:
        if ckpt.exists() and not overwrite:
            raise CheckpointError(
                f"{out} already holds a training run; pass resume=True (--resume) to continue it, "
                "overwrite=True (--overwrite) to start again, or choose another output folder"
            )
        out.mkdir(parents=True, exist_ok=True)
        (out / "metrics.jsonl").unlink(missing_ok=True)
    if out is not None:
        _rewrite_metrics(out / "metrics.jsonl", metrics)  # drop lines past the checkpoint

    end_step = tc.steps if stop_at is None else min(tc.steps, stop_at)
    tokens_per_step = tc.batch_size * tc.seq_len
    t0 = time.perf_counter()
    bar = tqdm(
        range(start_step, end_step),
        initial=start_step,
        total=tc.steps,
        disable=not progress,
        desc="train",
        unit="step",
    )
    for step in bar:
        lr = lr_at(step, tc)
        for group in optimizer.param_groups:
            group["lr"] = lr
        ids, _domains = dataset.get_batch("train", tc.batch_size, tc.seq_len, sampler)
        ids = ids.to(device)
        with _autocast(device, tc):
            output = model(ids, labels=ids)
        optimizer.zero_grad(set_to_none=True)
        output.loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(
            model.parameters(), tc.grad_clip if tc.grad_clip > 0 else float("inf")
        )
        optimizer.step()
        if output.routing:
            model.update_expert_bias(output.routing)

        row: dict[str, Any] = {
            "step": step + 1,
            **output.loss_parts(),
            "lr": lr,
            "grad_norm": float(grad_norm),
            "tokens": (step + 1) * tokens_per_step,
            "elapsed_s": round(time.perf_counter() - t0, 3),
        }
        if output.routing:
            row["max_vio"] = sum(s.max_violation for s in output.routing) / len(output.routing)
        last = step + 1 == end_step
        if (tc.eval_every and (step + 1) % tc.eval_every == 0) or (last and step + 1 == tc.steps):
            row["eval_loss"] = evaluate(model, dataset, tc, device)
        metrics.append(row)
        if out is not None:
            with open(out / "metrics.jsonl", "a") as f:
                f.write(json.dumps(row) + "\n")
        bar.set_postfix(
            loss=f"{row['main_loss']:.3f}",
            **({"eval": f"{row['eval_loss']:.3f}"} if "eval_loss" in row else {}),
        )
        if ckpt is not None and ((tc.checkpoint_every and (step + 1) % tc.checkpoint_every == 0) or last):
            save_training_checkpoint(ckpt, model, optimizer, sampler, tc, step + 1)
    bar.close()
    return TrainResult(model=model, metrics=metrics, out_dir=out)


# ---- checkpoints --------------------------------------------------------------------------------
def save_training_checkpoint(
    path: Path,
    model: Model,
    optimizer: torch.optim.Optimizer,
    sampler: torch.Generator,
    tc: TrainConfig,
    step: int,
) -> None:
    from workbench.io.hf import save_hf

    def fill(tmp: Path) -> None:
        save_hf(model, tmp / "model")
        tensors, groups = _flatten_optimizer(optimizer)
        save_tensors(tmp / "optimizer.safetensors", tensors)
        atomic_write_json(
            tmp / "state.json",
            {
                "step": step,
                "train_config": asdict(tc),
                "param_groups": groups,
                "sampler_state": sampler.get_state().tolist(),
            },
        )

    write_folder_atomically(path, fill)


def load_training_checkpoint(
    path: Path, model: Model, optimizer: torch.optim.Optimizer, sampler: torch.Generator, tc: TrainConfig
) -> int:
    from workbench.io.hf import load_hf

    state = read_json(path / "state.json")
    saved_tc = state.get("train_config", {})
    # the step budget may be extended, but what shapes the run so far must match
    for key in ("batch_size", "seq_len", "lr", "warmup_steps", "seed", "data_seed", "n_docs", "min_lr_ratio"):
        if key in saved_tc and saved_tc[key] != getattr(tc, key):
            raise CheckpointError(
                f"cannot resume {path}: it was trained with {key}={saved_tc[key]!r}, "
                f"this run asks for {getattr(tc, key)!r}; use the same value or a new --out"
            )
    loaded = load_hf(path / "model", device="cpu")
    if dataclasses.asdict(loaded.config) != dataclasses.asdict(model.config):
        raise CheckpointError(f"cannot resume {path}: its model config differs from this run's; use a new --out")
    model.load_state_dict(loaded.state_dict())
    _load_optimizer(optimizer, load_tensors(path / "optimizer.safetensors"), state["param_groups"])
    sampler.set_state(torch.tensor(state["sampler_state"], dtype=torch.uint8))
    return int(state["step"])


def _flatten_optimizer(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], list[dict]]:
    sd = optimizer.state_dict()
    tensors = {}
    for idx, st in sd["state"].items():
        for name, value in st.items():
            tensors[f"{idx}.{name}"] = value if torch.is_tensor(value) else torch.tensor(value)
    groups = [{k: v for k, v in g.items()} for g in sd["param_groups"]]
    for g in groups:
        g["betas"] = list(g["betas"])
    return {k: v.cpu() for k, v in tensors.items()}, groups


def _load_optimizer(optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], groups: list[dict]) -> None:
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        idx, name = key.split(".", 1)
        state.setdefault(int(idx), {})[name] = value
    for g in groups:
        g["betas"] = tuple(g["betas"])
    current = optimizer.state_dict()
    if [len(g["params"]) for g in current["param_groups"]] != [len(g["params"]) for g in groups]:
        raise CheckpointError("the optimizer state does not match this model's parameters; use a new --out")
    optimizer.load_state_dict({"state": state, "param_groups": groups})


def _read_metrics(path: Path, upto: int) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r for r in rows if r["step"] <= upto]


def _rewrite_metrics(path: Path, rows: list[dict[str, Any]]) -> None:
    from workbench.io.files import atomic_write_text

    atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in rows))


def read_metrics(out_dir: str | Path) -> list[dict[str, Any]]:
    """The metrics log of a run folder, one dict per step."""
    path = Path(out_dir) / "metrics.jsonl"
    if not path.exists():
        raise FileNotFoundError(f"no metrics.jsonl in {out_dir}")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
