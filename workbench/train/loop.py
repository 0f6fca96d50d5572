"""One training loop for every trainer: pre-training, SFT, distillation, GRPO and the vertical.

A trainer says what one step computes; ``fit`` does everything else, the same way for all of them:

    for step in steps:                      # fit
        row = trainer.step(model, update)   # forward + backward, then update(loss, routing) once or more
        evaluate, log, checkpoint           # fit

``update(loss, routing)`` is one optimiser update: it checks that the loss and the gradient are finite,
clips the gradient norm, sets the scheduled learning rate, takes the AdamW step, and applies
DeepSeek-V3's auxiliary-loss-free balancing (each router's bias moves by gamma toward balance, from the
expert loads of ``routing``; ``balance_masks`` limit which experts' biases move). A step usually makes
one update; GRPO's makes ``inner_steps`` on one batch of rollouts.

Around the steps, ``fit`` owns the run folder (``train.run``: refusals before anything changes, atomic
checkpoints with no window, the metrics log), evaluation every ``eval_every`` steps, the progress bar,
bf16 autocast on CUDA, and exact resume: the model, AdamW's moments, the step, torch's global random
state and the trainer's own state (its data sampler, its reference model, ...) are checkpointed, so a
resumed run computes the same numbers as one that never stopped. A step whose loss or gradient is not
finite stops the run before the update touches the weights: the last good checkpoint stays, and
``TrainingDiverged`` says where and what to change. Ctrl-C stops the run the same way.

Data parallel (``cfg.parallel``, ``workbench.dist.data_parallel``): under ``torchrun`` every process runs
this loop on its own device. The trainer draws the same global batch everywhere and keeps its shard
(``update.shard``); DDP or FSDP2 averages the gradients; ``update`` averages the loss, takes the norm of
the global gradient and sums the expert loads over the ranks before balancing, so every rank takes the
same step and keeps the same biases. Rank 0 alone writes the run folder (its decisions and errors reach
every rank), and the checkpoint has the single-process layout, so a run resumes on any number of
processes. A trainer that does not shard (GRPO, logit distillation) still runs correctly, every rank
computing the whole batch. In one process none of this runs.
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
from tqdm.auto import tqdm

from workbench.atomic import atomic_write_json
from workbench.dist.data_parallel import DataParallel, data_parallel, distribute_like, full_tensor
from workbench.io.files import CheckpointError, load_tensors, read_json, save_tensors
from workbench.model import Model
from workbench.model.moe import RoutingStats
from workbench.train.optim import LoopConfig, config_dict, make_optimizer
from workbench.train.run import RunFolder
from workbench.util import resolve_device


class TrainingDiverged(RuntimeError):
    """The loss or the gradient stopped being finite; the message names the step and the last checkpoint."""


class Trainer(Protocol):
    """What one step of a run computes. ``fit`` calls ``step`` once per step."""

    desc: str  # the progress bar's label
    # optional: ``uses_every_parameter = True`` when every step gives every parameter a gradient (DDP then
    # need not search for unused ones)

    def step(self, model: Model, update: Update) -> dict[str, Any]:
        """Forward and backward, then ``update(loss, routing)``; returns the step's metrics."""

    def state(self) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        """What the trainer needs to continue exactly: JSON-able values and tensors."""

    def load_state(self, values: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None: ...


@dataclass
class FitResult:
    model: Model
    metrics: list[dict[str, Any]]  # one row per step, from step 1 (resumed runs include the earlier rows)
    out_dir: Path | None
    start_step: int  # 0, or the step a resumed run continued from


class Update:
    """One optimiser update at a time: finiteness, clipping, schedule, AdamW, balancing."""

    def __init__(
        self,
        model: Model,
        optimizer: torch.optim.Optimizer,
        cfg: LoopConfig,
        balance_masks: list[torch.Tensor | None] | None,
        parallel: DataParallel | None = None,
    ) -> None:
        self.model, self.optimizer, self.cfg = model, optimizer, cfg
        self.balance_masks = balance_masks
        self.parallel = parallel  # None: one process
        self.count = 0  # updates made so far in the whole run (the schedule's clock)
        self.last: dict[str, float] = {}
        self.step = 0  # the step being computed (1-based), for messages

    def shard(self, *tensors: torch.Tensor):
        """This process's rows of the global batch (all of them in one process)."""
        if self.parallel is None:
            return tensors[0] if len(tensors) == 1 else tensors
        return self.parallel.shard(*tensors)

    def shard_loss(self, output, labels: torch.Tensor, full_labels: torch.Tensor):
        """The loss to back-propagate and its parts for logging: in one process the model's own; on a shard,
        weighted by its share of the labelled tokens (``workbench.dist.data_parallel.shard_loss``)."""
        if self.parallel is None:
            return output.loss, output.loss_parts()
        return self.parallel.shard_loss(output, labels, full_labels, self.model.config)

    def __call__(self, loss: torch.Tensor | float, routing: list[RoutingStats] | list[torch.Tensor] | None = None):
        loss_value = float(loss.detach()) if torch.is_tensor(loss) else float(loss)
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        clip = self.cfg.grad_clip if self.cfg.grad_clip > 0 else float("inf")
        if self.parallel is None:
            grad_norm = float(torch.nn.utils.clip_grad_norm_(params, clip))
        else:  # every rank judges the same numbers: the batch's loss, the global gradient's norm
            loss_value = self.parallel.mean(loss_value)
            grad_norm = self.parallel.clip_grad_norm(params, clip)
        if not (math.isfinite(loss_value) and math.isfinite(grad_norm)):
            what = "loss" if not math.isfinite(loss_value) else "gradient norm"
            value = loss_value if what == "loss" else grad_norm
            raise TrainingDiverged(
                f"the {what} became {value} at step {self.step}; the weights were not updated. "
                f"Lower the learning rate (lr={self.cfg.lr:g}) or the gradient clip, or check the data"
            )
        lr = self.cfg.lr_at(self.count)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.count += 1
        self.last = {"lr": lr, "grad_norm": grad_norm}
        if routing:
            counts = [r.counts if isinstance(r, RoutingStats) else r for r in routing]
            if self.parallel is not None:  # each rank routed its own tokens: balance on the global loads
                counts = self.parallel.global_counts(counts)
            self.last["max_vio"] = sum(_max_violation(c) for c in counts) / len(counts)
            if self.cfg.balance:
                routers = self.model.routers()
                # routers that did not run (the MTP modules' in a forward without them) saw no load: no move
                counts += [torch.zeros(r.n_experts, device=counts[0].device) for r in routers[len(counts) :]]
                self.model.update_expert_bias(counts, self.cfg.bias_update_speed, masks=self.balance_masks)
        return self.last


def _max_violation(counts: torch.Tensor) -> float:
    c = counts.float()
    return float((c.max() - c.mean()) / c.mean().clamp_min(1e-9))


def _autocast(device: torch.device, cfg: LoopConfig):
    enabled = device.type == "cuda" and cfg.bf16
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=enabled)


def fit(
    model: Model,
    cfg: LoopConfig,
    trainer: Trainer,
    *,
    out_dir: str | Path | None = None,
    evaluate=None,
    resume: bool = False,
    overwrite: bool = False,
    stop_at: int | None = None,
    progress: bool = True,
    balance_masks: list[torch.Tensor | None] | None = None,
) -> FitResult:
    """Run ``cfg.steps`` steps of ``trainer`` on ``model`` (in place).

    out_dir: the run folder (None: keep nothing on disk). resume: continue from its newest checkpoint
    (an error if it has none). overwrite: start afresh in a folder that holds a run (its old files go
    once the first step has succeeded). stop_at: stop (with a checkpoint) after this step, to resume later.
    evaluate: ``evaluate(model) -> dict`` of floats, logged as ``eval_<name>`` every ``eval_every`` steps
    and after the last. balance_masks: per router (``Model.routers()`` order), which experts' biases
    balancing may move (None: all).
    """
    if stop_at is not None and (isinstance(stop_at, bool) or not isinstance(stop_at, int) or stop_at < 1):
        raise ValueError(f"stop_at must be a step >= 1, got {stop_at!r}")
    par = data_parallel(cfg.parallel, cfg.device)  # None: one process, and nothing below changes for it
    run = RunFolder(out_dir) if out_dir is not None else None
    claim = (lambda: run.claim(resume=resume, overwrite=overwrite)) if run is not None else (lambda: "fresh")
    plan = claim() if par is None else par.on_main(claim)  # rank 0 decides; its refusal stops every rank
    device = resolve_device(cfg.device) if par is None else par.device

    torch.manual_seed(cfg.seed)
    model.to(device).train()
    start_step, metrics = 0, []
    if par is None:
        work = model
        optimizer = make_optimizer(model, cfg)
        update = Update(model, optimizer, cfg, balance_masks)
        optimizer.zero_grad(set_to_none=True)
        if run is not None:
            run.open()
            if plan == "resume":
                path = run.latest()
                state = _load_model(path, model, cfg)
                start_step = _load_rest(path, state, optimizer, update, trainer, cfg)
                metrics = run.read_metrics(upto=start_step)
                run.write_metrics(metrics)  # drop the lines of steps after the checkpoint
    else:
        path = par.on_main(lambda: run.latest()) if plan == "resume" else None
        state = _load_model(path, model, cfg) if path is not None else None  # every rank reads the weights
        work = par.wrap(model, find_unused=not getattr(trainer, "uses_every_parameter", False))  # DDP, or FSDP's copy
        optimizer = make_optimizer(par.inner(work), cfg)
        update = Update(par.inner(work), optimizer, cfg, balance_masks, parallel=par)
        optimizer.zero_grad(set_to_none=True)
        if path is not None:
            start_step = _load_rest(path, state, optimizer, update, trainer, cfg, par)
        if run is not None:

            def open_folder() -> list[dict[str, Any]]:
                run.open()
                if plan != "resume":
                    return []
                rows = run.read_metrics(upto=start_step)
                run.write_metrics(rows)
                return rows

            metrics = par.on_main(open_folder)

    end_step = cfg.steps if stop_at is None else min(cfg.steps, stop_at)
    pending_clear = plan == "replace"
    t0 = time.perf_counter()
    show = progress and (par is None or par.is_main)
    bar = tqdm(range(start_step, end_step), initial=start_step, total=cfg.steps, disable=not show,
               desc=getattr(trainer, "desc", "train"), unit="step")  # fmt: skip
    step = start_step
    try:
        for step in bar:
            update.step = step + 1
            with _autocast(device, cfg):
                row = trainer.step(work, update)
            if par is not None:
                row = par.reduce_row(row)  # the shards' losses averaged: the global batch's
            row = {"step": step + 1, **update.last, **row, "elapsed_s": round(time.perf_counter() - t0, 3)}
            last = step + 1 == cfg.steps
            if evaluate is not None and (last or (cfg.eval_every and (step + 1) % cfg.eval_every == 0)):
                with _autocast(device, cfg):
                    evaluated = {f"eval_{k}": v for k, v in evaluate(work if par is None else par.inner(work)).items()}
                row.update(evaluated if par is None else par.reduce_row(evaluated))
            metrics.append(row)
            if run is not None:
                first = step == start_step and plan != "resume"

                def log(clear: bool = pending_clear, first: bool = first, row: dict = row) -> None:
                    if clear:  # the new run has really started: now the old one may go
                        run.clear()
                    if first:
                        run.mark({"trainer": type(trainer).__name__, "config": config_dict(cfg)})
                        run.write_metrics(metrics)
                    else:
                        run.append_metrics(row)

                log() if par is None else par.on_main(log)
                pending_clear = False
                if (cfg.checkpoint_every and (step + 1) % cfg.checkpoint_every == 0) or step + 1 == end_step:
                    _save_checkpoint(run, step + 1, model, optimizer, update, trainer, cfg, par, work)
            bar.set_postfix(_postfix(row))
    except (TrainingDiverged, KeyboardInterrupt) as e:
        bar.close()
        if par is not None and isinstance(e, TrainingDiverged):
            par.sync_into(model, work)  # every rank agreed on the divergence: the last good weights, whole
        kept = run.latest() if run is not None else None
        where = f"the last good checkpoint ({kept}) is kept; " if kept else "no checkpoint was written; "
        how = "continue with resume=True (--resume)" if kept else "start again"
        if par is not None:
            par.close()
        if isinstance(e, KeyboardInterrupt):
            raise KeyboardInterrupt(f"interrupted at step {step + 1}; {where}{how}") from None
        raise TrainingDiverged(f"{e} ({where}{'fix the cause, then ' + how})") from None
    bar.close()
    if par is not None:
        par.sync_into(model, work)  # FSDP: the trained weights, gathered whole into the caller's model
        del work
        par.close()
    return FitResult(model=model, metrics=metrics, out_dir=run.path if run else None, start_step=start_step)


def _postfix(row: dict[str, Any]) -> dict[str, str]:
    keys = [k for k in ("main_loss", "loss", "reward", "accuracy") if k in row][:2]
    keys += [k for k in row if k.startswith("eval_") and isinstance(row[k], float)][:1]
    return {k: f"{row[k]:.3f}" for k in keys}


# ---- checkpoints ----------------------------------------------------------------------------------
def _save_checkpoint(run: RunFolder, step: int, model, optimizer, update: Update, trainer, cfg, par=None,
                     work=None) -> None:  # fmt: skip
    from workbench.io.hf import save_hf

    if par is not None:
        par.sync_into(model, work)  # FSDP: the shards gathered into the whole model (every rank takes part)
    bad = [name for name, p in model.named_parameters() if not torch.isfinite(p).all()]
    if bad:
        raise TrainingDiverged(f"after step {step} the weights are not finite ({', '.join(bad[:3])}); nothing saved")
    values, tensors = trainer.state()
    opt_tensors, groups = _flatten_optimizer(optimizer)  # FSDP: each moment gathered whole (a collective)

    def fill(tmp: Path) -> None:
        save_hf(model, tmp / "model")
        save_tensors(tmp / "optimizer.safetensors", opt_tensors)
        save_tensors(tmp / "trainer.safetensors", {k: v.detach().cpu() for k, v in tensors.items()})
        atomic_write_json(
            tmp / "state.json",
            {
                "step": step,
                "updates": update.count,
                "config_class": type(cfg).__name__,
                "config": config_dict(cfg),
                "param_groups": groups,
                "torch_rng": torch.get_rng_state().tolist(),
                "trainer": values,
            },
        )

    save = lambda: run.save_checkpoint(step, fill, keep=cfg.keep_checkpoints)  # noqa: E731
    save() if par is None else par.on_main(save)  # written once, by rank 0


def _load_model(path: Path, model, cfg: LoopConfig) -> dict[str, Any]:
    """Check the checkpoint's config against this run's and load its weights into ``model``; its state.json."""
    from workbench.io.hf import load_hf

    state = read_json(path / "state.json")
    saved = state.get("config", state.get("train_config", {}))
    mine = config_dict(cfg)
    for key in sorted(set(saved) | set(mine)):
        if key in type(cfg).resume_may_change or key not in saved or key not in mine:
            continue
        if _normal(saved[key]) != _normal(mine[key]):
            raise CheckpointError(
                f"cannot resume {path}: it was trained with {key}={saved[key]!r}, "
                f"this run asks for {mine[key]!r}; use the same value or a new --out"
            )
    loaded = load_hf(path / "model", device="cpu")
    if dataclasses.asdict(loaded.config) != dataclasses.asdict(model.config):
        raise CheckpointError(f"cannot resume {path}: its model config differs from this run's; use a new --out")
    model.load_state_dict(loaded.state_dict())
    if loaded.tokenizer is not None:
        model.tokenizer = loaded.tokenizer
    return state


def _load_rest(path: Path, state: dict[str, Any], optimizer, update: Update, trainer, cfg: LoopConfig,
               par: DataParallel | None = None) -> int:  # fmt: skip
    """The optimizer (split like the parameters under FSDP), the trainer, the random state; the step."""
    _load_optimizer(optimizer, load_tensors(path / "optimizer.safetensors"), state["param_groups"])
    trainer_tensors = load_tensors(path / "trainer.safetensors") if (path / "trainer.safetensors").exists() else {}
    if "trainer" in state:
        trainer.load_state(state["trainer"], trainer_tensors)
    elif "sampler_state" in state:  # the earlier layout (pre-training only): the data sampler's state
        trainer.load_state({"sampler": state["sampler_state"]}, {})
    if "torch_rng" in state:
        torch.set_rng_state(torch.tensor(state["torch_rng"], dtype=torch.uint8))
    step = int(state["step"])
    update.count = int(state.get("updates", step * cfg.updates_per_step))
    return step


def _normal(value: Any) -> Any:
    return [_normal(v) for v in value] if isinstance(value, (list, tuple)) else value


def _flatten_optimizer(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], list[dict]]:
    sd = optimizer.state_dict()
    tensors = {}
    for idx, st in sd["state"].items():
        for name, value in st.items():  # an FSDP moment is gathered whole: the layout of one process
            tensors[f"{idx}.{name}"] = full_tensor(value) if torch.is_tensor(value) else torch.tensor(value)
    groups = [dict(g) for g in sd["param_groups"]]
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
    params = [p for g in optimizer.param_groups for p in g["params"]]
    for idx, moments in state.items():  # under FSDP each moment is split the way its parameter is
        for name, value in moments.items():
            if value.shape == params[idx].shape and value.dim() > 0:
                moments[name] = distribute_like(value, params[idx])
    optimizer.load_state_dict({"state": state, "param_groups": groups})


__all__ = ["FitResult", "Trainer", "TrainingDiverged", "Update", "fit"]
