"""Training: pre-training on the generated corpus (``pretrain``)."""

from workbench.train.pretrain import (
    TrainConfig,
    TrainResult,
    default_dataset,
    lr_at,
    make_optimizer,
    read_metrics,
    train,
    validation_loss,
)

__all__ = [
    "TrainConfig",
    "TrainResult",
    "default_dataset",
    "validation_loss",
    "lr_at",
    "make_optimizer",
    "read_metrics",
    "train",
]
