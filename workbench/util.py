"""Small helpers every layer uses: choosing a device, and running a model in eval mode for a while."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn

# The repository's data/ folder: the shipped tokenizer, the tiny checkpoint, prompt sets.
SHIPPED_DATA = Path(__file__).resolve().parent.parent / "data"


def resolve_device(device: str | torch.device) -> torch.device:
    """``"auto"`` (CUDA when present, else CPU), ``"cpu"``, ``"cuda"``, ``"cuda:N"``, ``"mps"``, or a device.

    A device that does not exist here is refused with the fix, before anything is allocated on it.
    """
    if isinstance(device, torch.device):
        device = str(device)
    if not isinstance(device, str):
        raise ValueError(f"device must be a string such as 'auto', 'cpu' or 'cuda:0', got {device!r}")
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError):
        raise ValueError(f"device {device!r} is not a device name; use 'auto', 'cpu', 'cuda' or 'cuda:N'") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {device!r} asked for but CUDA is not available; use 'cpu' or 'auto'")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(
                f"device {device!r} does not exist: this machine has {torch.cuda.device_count()} CUDA device(s); "
                f"use cuda:0 .. cuda:{torch.cuda.device_count() - 1}"
            )
    elif dev.type == "mps":
        if not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
            raise ValueError(f"device {device!r} asked for but MPS is not available; use 'cpu' or 'auto'")
    elif dev.type != "cpu":
        raise ValueError(f"device {device!r} is not supported here; use 'auto', 'cpu', 'cuda' or 'cuda:N'")
    return dev


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Put ``model`` in eval mode inside the block and restore its training flag afterwards, even when
    the block raises (dropout-free models still need it: eval mode is what callers of ``train`` expect)."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


__all__ = ["SHIPPED_DATA", "eval_mode", "resolve_device"]
