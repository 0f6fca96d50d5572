"""Training: pre-training on the generated corpus (``pretrain``)."""

from workbench.train.pretrain import (
    TrainConfig,
    TrainResult,
    default_dataset,
    evaluate,
    lr_at,
    make_optimizer,
    read_metrics,
    train,
)

__all__ = [
    "TrainConfig",
    "TrainResult",
    "default_dataset",
    "evaluate",
    "lr_at",
    "make_optimizer",
    "read_metrics",
    "train",
]
