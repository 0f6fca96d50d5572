"""The optimiser and its schedule, and every knob the training loop shares: one validated config.

Every trainer (pre-training, SFT, distillation, GRPO, the vertical) is configured by a subclass of
``LoopConfig``: the subclass adds what its step needs (batch size, group size, ...) and changes the
defaults that suit it (GRPO: a small learning rate, a constant schedule), while the loop reads only the
fields below. So every trainer has the same optimiser, schedule, clipping, balancing, evaluation,
checkpoint and resume switches, spelled the same way on the command line.

The optimiser is AdamW with no weight decay on norms, biases and the embedding (decaying an embedding
row shrinks tokens that are rarely seen). The learning rate warms up linearly over ``warmup_steps``
optimiser updates and then either decays along a cosine to ``lr * min_lr_ratio`` (pre-training, SFT)
or stays constant (GRPO, where a decaying rate would hide whether the policy still improves).
``parallel`` runs the same loop data-parallel over the processes ``torchrun`` starts (``workbench.dist``).
DeepSeek-V3 used a staged schedule (constant, then cosine, then two steps down); a cosine is the
common small-scale stand-in.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from workbench.config import ConfigError
from workbench.dist.data_parallel import PARALLEL_MODES

SCHEDULES = ("cosine", "constant")


@dataclass
class LoopConfig:
    """The training loop's knobs (optimiser, schedule, clipping, balancing, evaluation, checkpoints)."""

    steps: int = 300  # steps of the run (a step may make several optimiser updates, e.g. GRPO's inner steps)
    lr: float = 3e-3  # peak learning rate
    min_lr_ratio: float = 0.1  # the cosine decays to lr * min_lr_ratio
    warmup_steps: int = 30  # optimiser updates of linear warmup
    schedule: str = "cosine"  # after warmup: "cosine" decay or "constant"
    weight_decay: float = 0.1  # AdamW weight decay (not on norms, biases or the embedding)
    beta1: float = 0.9  # AdamW beta1
    beta2: float = 0.95  # AdamW beta2
    grad_clip: float = 1.0  # max global gradient norm (0 disables clipping)
    balance: bool = True  # auxiliary-loss-free balancing: nudge the router biases after every update
    bias_update_speed: float | None = None  # gamma of that balancing (None: the model config's)
    eval_every: int = 50  # steps between evaluations (0: only at the end)
    checkpoint_every: int = 0  # steps between checkpoints (0: only at the end)
    keep_checkpoints: int = 1  # how many of the newest checkpoints a run folder keeps
    seed: int = 0  # everything random in the run
    device: str = "auto"  # "auto" picks CUDA when present
    bf16: bool = True  # bf16 autocast on CUDA (always fp32 on CPU)
    parallel: str = "auto"  # under torchrun: "ddp", "fsdp" (FSDP2), "none"; "auto" = ddp when several processes

    # fields that may differ when a run is resumed (the rest shape the run and must match)
    resume_may_change: ClassVar[frozenset[str]] = frozenset(
        {"steps", "eval_every", "checkpoint_every", "keep_checkpoints", "device", "parallel"}
    )

    def __post_init__(self) -> None:
        check_fields(self)
        if self.parallel not in PARALLEL_MODES:
            raise ConfigError(f"parallel must be one of {PARALLEL_MODES}, got {self.parallel!r}")
        if self.schedule not in SCHEDULES:
            raise ConfigError(f"schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        if not self.lr > 0:
            raise ConfigError(f"lr must be positive, got {self.lr}; try 1e-3")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ConfigError(f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        for name in ("beta1", "beta2"):
            if not 0 <= getattr(self, name) < 1:
                raise ConfigError(f"{name} must be in [0, 1), got {getattr(self, name)}")
        if self.bias_update_speed is not None and self.bias_update_speed < 0:
            raise ConfigError(f"bias_update_speed must be >= 0 or None, got {self.bias_update_speed}")
        if self.keep_checkpoints < 1:
            raise ConfigError(f"keep_checkpoints must be >= 1, got {self.keep_checkpoints}")

    @property
    def updates_per_step(self) -> int:
        """Optimiser updates in one step (GRPO: its inner steps); the schedule counts updates."""
        return 1

    def lr_at(self, update: int) -> float:
        """The learning rate of optimiser update ``update`` (0-based)."""
        return lr_at(update, self)


# what a number field must be: (positive?, integer?) by field name; the others are checked by type only
_POSITIVE_INT = ("steps",)
_NON_NEGATIVE = ("warmup_steps", "eval_every", "checkpoint_every", "grad_clip", "weight_decay")


def check_fields(cfg: Any) -> None:
    """Check every field of a config dataclass against its annotation: an int is an int (not a bool and
    not 3.0), a float is a finite number, a bool is a bool, a str is a str; ``steps`` >= 1 and the
    counts and weights in ``_NON_NEGATIVE`` >= 0. Names the field and the fix."""
    hints = {f.name: f.type for f in dataclasses.fields(cfg)}
    for name, hint in hints.items():
        value = getattr(cfg, name)
        kind = str(hint).replace("typing.", "")
        optional = "None" in kind
        if value is None and optional:
            continue
        base = kind.split("|")[0].strip()
        where = f"{type(cfg).__name__}.{name}"
        if base == "bool":
            if not isinstance(value, bool):
                raise ConfigError(f"{where} must be true or false, got {value!r}")
        elif base == "int":
            if isinstance(value, bool) or not isinstance(value, int):
                raise ConfigError(f"{where} must be an integer, got {value!r}")
        elif base == "float":
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ConfigError(f"{where} must be a number, got {value!r}")
            if not math.isfinite(value):
                raise ConfigError(f"{where} must be a finite number, got {value!r}")
        elif base == "str" and not isinstance(value, str):
            raise ConfigError(f"{where} must be a string, got {value!r}")
    for name in _POSITIVE_INT:
        if name in hints and getattr(cfg, name) < 1:
            raise ConfigError(f"{type(cfg).__name__}.{name} must be >= 1, got {getattr(cfg, name)}")
    for name in _NON_NEGATIVE:
        if name in hints and getattr(cfg, name) is not None and getattr(cfg, name) < 0:
            raise ConfigError(f"{type(cfg).__name__}.{name} must be >= 0, got {getattr(cfg, name)}")


def lr_at(update: int, cfg: LoopConfig) -> float:
    """Linear warmup to ``lr`` over ``warmup_steps`` updates; then cosine decay to ``lr * min_lr_ratio``
    over the rest of the run's updates, or constant."""
    if update < cfg.warmup_steps:
        return cfg.lr * (update + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return cfg.lr
    total = cfg.steps * cfg.updates_per_step
    progress = (update - cfg.warmup_steps) / max(1, total - cfg.warmup_steps)
    cosine = 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * cosine)


def make_optimizer(model: nn.Module, cfg: LoopConfig) -> torch.optim.AdamW:
    """AdamW over the parameters that require gradients; no weight decay on norms and biases (1-D
    tensors) or the embedding."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.dim() < 2 or name.startswith("embed_tokens") else decay).append(p)
    if not decay and not no_decay:
        raise ConfigError("no parameter of the model requires a gradient: there is nothing to train")
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=1e-8)


def config_dict(cfg: Any) -> dict[str, Any]:
    """A config dataclass as a plain dict (what checkpoints and reports store)."""
    return dataclasses.asdict(cfg)


__all__ = ["SCHEDULES", "LoopConfig", "check_fields", "config_dict", "lr_at", "make_optimizer"]
