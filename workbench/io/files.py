"""Safe files: atomic writes of JSON and safetensors, and checkpoint folders that are never half-written.

A checkpoint is a folder. Everything is first written into a temporary sibling folder
(``.<name>.tmp-<random>``), flushed, and only then renamed into place, so a crash or a full disk
leaves either the old checkpoint or the new one, never a mixture. Tensors are stored with
``safetensors`` (no pickle: loading a checkpoint can never execute code); everything else is JSON.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from workbench.atomic import _fsync_dir, _normal_permissions, atomic_write_bytes, atomic_write_json, atomic_write_text


class CheckpointError(ValueError):
    """A checkpoint that is missing, incomplete or does not fit the model; the message says which."""


def write_folder_atomically(path: str | Path, fill: Callable[[Path], None], overwrite: bool = True) -> Path:
    """Create folder ``path`` by calling ``fill(tmp_folder)`` and renaming the result into place.

    If ``fill`` raises, nothing at ``path`` changes. An existing folder is replaced only when
    ``overwrite`` is true (the old one is removed after the new one is in place).
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise FileExistsError(f"{path} exists and is not a folder; choose another output path")
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} already exists; pass overwrite=True or choose another path")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.tmp-"))
    try:
        fill(tmp)
        _normal_permissions(tmp, is_dir=True)
        for f in tmp.iterdir():
            if f.is_file():
                with open(f, "rb") as fh:
                    os.fsync(fh.fileno())
        old = None
        if path.exists():
            old = path.parent / f".{path.name}.old-{os.getpid()}"
            os.replace(path, old)
        os.replace(tmp, path)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        _fsync_dir(path.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def save_tensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    """safetensors file written atomically (tensors made contiguous; shared storage copied apart)."""
    path = Path(path)
    clean = {
        k: v.detach().contiguous().clone() if _shares_storage(v, tensors) else v.detach().contiguous()
        for k, v in tensors.items()
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        save_file(clean, tmp, metadata=metadata)
        _normal_permissions(Path(tmp))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _shares_storage(t: torch.Tensor, all_tensors: dict[str, torch.Tensor]) -> bool:
    ptr = t.untyped_storage().data_ptr()
    return sum(1 for v in all_tensors.values() if v.untyped_storage().data_ptr() == ptr) > 1


def load_tensors(path: str | Path, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"missing tensor file {path}")
    try:
        return load_file(str(path), device=str(device))
    except Exception as e:  # safetensors raises its own error types for corrupt headers
        raise CheckpointError(f"{path} is not a readable safetensors file ({e}); it may be truncated or corrupt") from e


def read_json(path: str | Path) -> Any:
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"missing file {path}")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path} is not valid JSON: {e}") from e


__all__ = [
    "CheckpointError",
    "atomic_write_bytes",
    "atomic_write_json",
    "atomic_write_text",
    "load_tensors",
    "read_json",
    "save_tensors",
    "write_folder_atomically",
]
