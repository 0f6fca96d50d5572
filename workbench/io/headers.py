"""A checkpoint folder's files as safetensors describes them: the index checked, every header read, no data.

A checkpoint holds ``config.json`` and either ``model.safetensors`` or shards listed by
``model.safetensors.index.json`` (``weight_map``: tensor name -> file). ``read_files`` returns the files and
every tensor's name, shape and dtype from the safetensors headers, and refuses, all problems together:
an index entry that is not a plain ``.safetensors`` file of the folder (an absolute path, ``..``, a link
leading out of it), a listed file that is missing, a file safetensors cannot open (truncated or corrupt:
its header must cover the whole file), a tensor stored twice, and an index that places a tensor in a file
that does not hold it.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from workbench.io.files import CheckpointError, read_json

WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
CONFIG_NAME = "config.json"

# safetensors dtype names -> torch
DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}
FP8_DTYPES = ("F8_E4M3", "F8_E5M2")
_SIZES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "F8_E4M3": 1, "F8_E5M2": 1, "I64": 8, "I32": 4, "I16": 2,
          "I8": 1, "U64": 8, "U32": 4, "U16": 2, "U8": 1, "BOOL": 1}  # fmt: skip


@dataclass(frozen=True)
class Stored:
    """One tensor as a safetensors header describes it."""

    name: str
    file: Path
    shape: tuple[int, ...]
    dtype: str  # safetensors' name: BF16, F32, F8_E4M3, ...

    @property
    def nbytes(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n * _SIZES.get(self.dtype, 1)


# ------------------------------------------------------------------------------------------------
# Files
# ------------------------------------------------------------------------------------------------
def read_hf_config(folder: str | Path) -> dict[str, Any]:
    """The raw ``config.json`` of a checkpoint folder."""
    path = Path(folder) / CONFIG_NAME
    data = read_json(path)
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} must hold a JSON object")
    return data


def checkpoint_files(folder: Path, problems: list[str]) -> tuple[list[Path], dict[str, str] | None]:
    """The safetensors files of a checkpoint (the single file, or the shards its index lists) and the
    index's weight map. Index entries that leave the folder or name missing files are problems."""
    single, index = folder / WEIGHTS_NAME, folder / INDEX_NAME
    if single.is_file():
        return [single], None
    if not index.exists():
        raise CheckpointError(f"{folder} holds neither {WEIGHTS_NAME} nor {INDEX_NAME}")
    data = read_json(index)
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise CheckpointError(f"{index} has no 'weight_map' (tensor name -> file)")
    root = folder.resolve()
    files: list[Path] = []
    for filename in dict.fromkeys(weight_map.values()):
        if not isinstance(filename, str) or not filename:
            problems.append(f"{index} maps a tensor to {filename!r}, which is not a file name")
            continue
        rel = Path(filename)
        if rel.is_absolute() or ".." in rel.parts:
            problems.append(f"{index} names {filename!r}, which is outside the checkpoint folder")
            continue
        if not filename.endswith(".safetensors"):
            problems.append(f"{index} names {filename!r}; checkpoints are read from .safetensors files only")
            continue
        file = folder / rel
        try:
            inside = file.resolve().is_relative_to(root)
        except OSError:
            inside = False
        if not inside:
            problems.append(f"{index} names {filename!r}, which leads outside the checkpoint folder")
        elif not file.is_file():
            problems.append(f"{index} lists {filename}, which is missing from {folder}")
        else:
            files.append(file)
    return files, {str(k): str(v) for k, v in weight_map.items()}


def read_headers(files: Iterable[Path], problems: list[str]) -> dict[str, Stored]:
    """Every tensor's shape and dtype from the safetensors headers (no tensor data is read)."""
    found: dict[str, Stored] = {}
    for file in files:
        try:
            with safe_open(str(file), framework="pt") as f:
                for name in f.keys():  # noqa: SIM118 (safe_open is not iterable)
                    s = f.get_slice(name)
                    if name in found:
                        problems.append(f"tensor {name} is stored twice: in {found[name].file.name} and {file.name}")
                        continue
                    found[name] = Stored(name, file, tuple(int(d) for d in s.get_shape()), s.get_dtype())
        except Exception as e:  # safetensors raises its own error types for corrupt headers
            problems.append(f"{file} is not a readable safetensors file ({e}); it may be truncated or corrupt")
    return found


def read_files(folder: Path) -> tuple[list[Path], dict[str, Stored]]:
    """The files and every tensor's header, with the index checked against what the files hold."""
    problems: list[str] = []
    files, weight_map = checkpoint_files(folder, problems)
    found = read_headers(files, problems)
    if weight_map is not None:
        elsewhere = [f"{n} (the index says {weight_map[n]}, found in {s.file.name})"
                     for n, s in found.items() if n in weight_map and weight_map[n] != s.file.name]  # fmt: skip
        absent = [f"{n} (in {f})" for n, f in weight_map.items() if n not in found and (folder / f) in files]
        if elsewhere:
            problems.append(listing("tensors the index places in another file", elsewhere))
        if absent:
            problems.append(listing("tensors the index lists but its file does not hold", absent))
    if problems:
        raise CheckpointError(f"checkpoint {folder} cannot be read:\n" + "\n".join(problems))
    return files, found


def listing(title: str, items: list[str], limit: int = 50) -> str:
    lines = [f"  {item}" for item in items[:limit]]
    if len(items) > limit:
        lines.append(f"  ... and {len(items) - limit} more")
    return f"{title} ({len(items)}):\n" + "\n".join(lines)


__all__ = [
    "CONFIG_NAME",
    "DTYPES",
    "FP8_DTYPES",
    "INDEX_NAME",
    "WEIGHTS_NAME",
    "Stored",
    "checkpoint_files",
    "read_files",
    "read_headers",
    "read_hf_config",
]
