"""Safe files: atomic writes of JSON and safetensors, and checkpoint folders that are never half-written.

A checkpoint is a folder. Everything is first written into a temporary sibling folder
(``.<name>.tmp-<random>``), flushed, and only then renamed into place, so a crash or a full disk
leaves either the old checkpoint or the new one, never a mixture. Tensors are stored with
``safetensors`` (no pickle: loading a checkpoint can never execute code); everything else is JSON.
"""

from __future__ import annotations

import ctypes
import json
import os
import re
import shutil
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from workbench.atomic import _fsync_dir, _normal_permissions, atomic_write_bytes, atomic_write_json, atomic_write_text


class CheckpointError(ValueError):
    """A checkpoint that is missing, incomplete or does not fit the model; the message says which."""


# The files a model folder may hold (ours, transformers' and DeepSeek's): a folder with anything else in it
# belongs to someone, and is never replaced.
MODEL_FOLDER_FILES = re.compile(
    r"^(config\.json|generation_config\.json|model(-\d{5}-of-\d{5})?\.safetensors|model\.safetensors\.index\.json"
    r"|tokenizer\.json|tokenizer_config\.json|special_tokens_map\.json|vertical\.json|delta\.json"
    r"|delta\.safetensors|README\.md|\.gitattributes)$"
)


def check_output_folder(
    path: str | Path, *, overwrite: bool, protect: tuple[str | Path, ...] = (), allowed: re.Pattern | None = None
) -> None:
    """Refuse, before anything is written, an output folder whose replacement could lose someone's files.

    A path that contains (or is) one of ``protect`` (e.g. the training run being exported) is refused; so
    is a non-empty folder holding a file that ``allowed`` does not match (default: anything non-empty is
    ours only with ``overwrite``); an existing non-empty folder needs ``overwrite``.
    """
    target = Path(path).resolve()
    for guarded in protect:
        g = Path(guarded).resolve()
        if g == target or target in g.parents:
            raise CheckpointError(
                f"{path} holds the run {guarded}; writing there would replace it. Choose another folder"
            )
    if not target.exists():
        return
    if not target.is_dir():
        raise FileExistsError(f"{path} exists and is not a folder; choose another output path")
    entries = sorted(e.name for e in target.iterdir())
    if not entries:
        return
    if allowed is not None:
        foreign = [name for name in entries if not allowed.match(name)]
        if foreign:
            shown = ", ".join(foreign[:5]) + (" ..." if len(foreign) > 5 else "")
            raise CheckpointError(
                f"{path} is not empty and is not a model folder (it holds {shown}); nothing was written. "
                "Choose an empty or new folder"
            )
    if not overwrite:
        raise FileExistsError(f"{path} already exists; pass overwrite=True (--overwrite) or choose another path")


def write_folder_atomically(
    path: str | Path,
    fill: Callable[[Path], None],
    overwrite: bool = False,
    *,
    protect: tuple[str | Path, ...] = (),
    allowed: re.Pattern | None = None,
) -> Path:
    """Create folder ``path`` by calling ``fill(tmp_folder)`` and renaming the result into place.

    If ``fill`` raises, nothing at ``path`` changes. An existing folder is replaced only when
    ``overwrite`` is true and ``check_output_folder`` allows it; the swap is one atomic exchange of the
    two folders where the system has it (Linux renameat2), so no moment exists without one of them.
    """
    path = Path(path)
    check_output_folder(path, overwrite=overwrite, protect=protect, allowed=allowed)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.tmp-"))
    try:
        fill(tmp)
        _normal_permissions(tmp, is_dir=True)
        for f in tmp.iterdir():
            if f.is_file():
                with open(f, "rb") as fh:
                    os.fsync(fh.fileno())
        if path.exists():
            if _exchange(tmp, path):  # tmp now holds the old folder
                shutil.rmtree(tmp, ignore_errors=True)
            else:  # no atomic exchange here: two renames (a kill between them leaves the old one at .old-*)
                old = path.parent / f".{path.name}.old-{os.getpid()}"
                os.replace(path, old)
                os.replace(tmp, path)
                shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
        _fsync_dir(path.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths (Linux ``renameat2(RENAME_EXCHANGE)``); False where unsupported."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    return renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0


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
    "MODEL_FOLDER_FILES",
    "CheckpointError",
    "check_output_folder",
    "atomic_write_bytes",
    "atomic_write_json",
    "atomic_write_text",
    "load_tensors",
    "read_json",
    "save_tensors",
    "write_folder_atomically",
]
