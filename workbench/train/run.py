"""A run folder: the metrics log and the checkpoints of one training run, kept so that nothing is lost.

    OUT/run.json                 what wrote the folder (the marker that it is a run of ours)
    OUT/metrics.jsonl            one JSON line per step
    OUT/checkpoints/step-000300/ a complete checkpoint (model/, optimizer.safetensors, state.json, ...)
    OUT/checkpoint               a link to the newest one (OUT/checkpoint/model is the trained model)

The rules, each a promise to the person whose disk this is:

* **No window without a checkpoint.** A checkpoint is written into a temporary folder and renamed into
  place as ``checkpoints/step-N`` (a new name, so nothing is replaced); only then does the link move
  (an atomic rename of a new link over the old one) and only then are older checkpoints removed. A kill
  at any moment leaves the previous checkpoint, or the new one, complete; ``latest()`` takes the newest
  complete ``step-*`` folder whatever the link says. Temporary folders a kill left behind are removed
  when the folder is next opened. Runs written by the earlier layout (a ``checkpoint/`` folder, and a
  ``.checkpoint.old-*`` copy that an ill-timed kill could leave) are read and recovered too.
* **Refuse before touching anything.** ``claim`` decides, before any file changes, whether this run may
  use the folder: ``resume`` needs a checkpoint to resume; a folder that holds a run needs ``resume``
  or ``overwrite``; a non-empty folder that is not a run of ours is never used.
* **Replace only what we wrote, only once the new run has started.** With ``overwrite`` the old run's
  files (only those named above) are removed by ``clear`` after the new run's first step has succeeded.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from workbench.atomic import atomic_write_json, atomic_write_text
from workbench.io.files import CheckpointError, write_folder_atomically

METRICS = "metrics.jsonl"
MARKER = "run.json"
CHECKPOINTS = "checkpoints"
LINK = "checkpoint"
_STEP = re.compile(r"^step-(\d{6,})$")
_OURS = (METRICS, MARKER, CHECKPOINTS, LINK)


class RunFolder:
    """The files of one run in ``path`` (which need not exist yet)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.metrics_path = self.path / METRICS

    # ---- what is there ----------------------------------------------------------------------------
    def holds_run(self) -> bool:
        """Whether the folder holds a run of ours (a metrics log, a checkpoint, or the marker)."""
        p = self.path
        return p.is_dir() and (
            any((p / name).exists() or (p / name).is_symlink() for name in _OURS) or bool(self._legacy_old())
        )

    def foreign_entries(self) -> list[str]:
        """Entries of a non-empty folder that is not a run of ours (empty when it is ours or empty)."""
        if not self.path.is_dir() or self.holds_run():
            return []
        return sorted(e.name for e in self.path.iterdir())

    def checkpoints(self) -> list[tuple[int, Path]]:
        """Every complete checkpoint, oldest first: (step, folder)."""
        found = []
        folder = self.path / CHECKPOINTS
        if folder.is_dir():
            for entry in folder.iterdir():
                m = _STEP.match(entry.name)
                if m and (entry / "state.json").is_file():
                    found.append((int(m.group(1)), entry))
        legacy = self.path / LINK
        if legacy.is_dir() and not legacy.is_symlink() and (legacy / "state.json").is_file():
            found.append((_state_step(legacy), legacy))
        return sorted(found, key=lambda item: item[0])

    def latest(self) -> Path | None:
        """The newest complete checkpoint folder, or None."""
        found = self.checkpoints()
        return found[-1][1] if found else None

    def _legacy_old(self) -> list[Path]:
        return sorted(self.path.glob(f".{LINK}.old-*")) if self.path.is_dir() else []

    # ---- deciding -----------------------------------------------------------------------------------
    def claim(self, *, resume: bool, overwrite: bool) -> str:
        """What this run will do with the folder: ``"fresh"``, ``"resume"`` or ``"replace"``.

        Changes nothing on disk; raises ``CheckpointError`` with the fix when the folder may not be used.
        """
        if resume and overwrite:
            raise CheckpointError("resume and overwrite contradict each other; choose one")
        if self.path.exists() and not self.path.is_dir():
            raise CheckpointError(f"{self.path} exists and is not a folder; choose another output folder")
        foreign = self.foreign_entries()
        if foreign:
            shown = ", ".join(foreign[:5]) + (" ..." if len(foreign) > 5 else "")
            raise CheckpointError(
                f"{self.path} is not empty and holds no training run ({shown}); nothing there will be touched. "
                "Choose an empty or new output folder"
            )
        has_checkpoint = self.latest() is not None or bool(self._legacy_old())
        if resume:
            if not has_checkpoint:
                raise CheckpointError(
                    f"there is no checkpoint to resume in {self.path}"
                    + (" (it holds a metrics log but no checkpoint)" if self.holds_run() else "")
                    + "; start the run without resume (--resume), or point at the folder that holds the run"
                )
            return "resume"
        if self.holds_run():
            if not overwrite:
                raise CheckpointError(
                    f"{self.path} already holds a training run; pass resume=True (--resume) to continue it, "
                    "overwrite=True (--overwrite) to start again, or choose another output folder"
                )
            return "replace"
        return "fresh"

    # ---- changing -----------------------------------------------------------------------------------
    def open(self) -> None:
        """Create the folder and tidy what a kill may have left: recover an earlier layout's checkpoint
        from its ``.old-*`` copy, and remove temporary checkpoint folders of ours."""
        self.path.mkdir(parents=True, exist_ok=True)
        link = self.path / LINK
        olds = self._legacy_old()
        if olds and not link.exists() and not link.is_symlink():
            good = [o for o in olds if (o / "state.json").is_file()]
            if good:
                os.replace(good[-1], link)  # the earlier layout's kill window: the good copy goes back
        for stale in self.path.glob(f".{LINK}.tmp-*"):
            shutil.rmtree(stale, ignore_errors=True)
        folder = self.path / CHECKPOINTS
        if folder.is_dir():
            for stale in folder.glob(".step-*.tmp-*"):
                shutil.rmtree(stale, ignore_errors=True)

    def mark(self, info: dict[str, Any]) -> None:
        atomic_write_json(self.path / MARKER, info)

    def clear(self) -> None:
        """Remove the old run's files: only the names a run writes (metrics, checkpoints, link, marker)."""
        for name in (METRICS, MARKER):
            (self.path / name).unlink(missing_ok=True)
        link = self.path / LINK
        if link.is_symlink():
            link.unlink()
        elif link.is_dir():
            shutil.rmtree(link)
        folder = self.path / CHECKPOINTS
        if folder.is_dir():
            for entry in folder.iterdir():
                if _STEP.match(entry.name) or entry.name.startswith(".step-"):
                    shutil.rmtree(entry)
            if not any(folder.iterdir()):
                folder.rmdir()
        for old in self._legacy_old():
            shutil.rmtree(old)

    def save_checkpoint(self, step: int, fill: Callable[[Path], None], keep: int = 1) -> Path:
        """Write ``checkpoints/step-<step>`` with ``fill(folder)``, point the link at it, keep ``keep``."""
        folder = self.path / CHECKPOINTS
        folder.mkdir(parents=True, exist_ok=True)
        target = folder / f"step-{step:06d}"
        if target.exists():  # a step written before a resume from an earlier checkpoint: ours, superseded
            shutil.rmtree(target)
        write_folder_atomically(target, fill, overwrite=False)
        self._point_link_at(target)
        for _, old in self.checkpoints()[:-keep]:
            shutil.rmtree(old)
        return target

    def _point_link_at(self, target: Path) -> None:
        link = self.path / LINK
        tmp = self.path / f".{LINK}.link-{os.getpid()}"
        tmp.unlink(missing_ok=True)
        os.symlink(os.path.relpath(target, self.path), tmp)
        if link.is_dir() and not link.is_symlink():  # the earlier layout's folder: move it among the steps
            moved = self.path / CHECKPOINTS / f"step-{_state_step(link):06d}"
            if moved.exists():
                shutil.rmtree(link)
            else:
                os.replace(link, moved)
        os.replace(tmp, link)

    # ---- the metrics log ----------------------------------------------------------------------------
    def read_metrics(self, upto: int | None = None) -> list[dict[str, Any]]:
        return read_metrics_file(self.metrics_path, upto)

    def write_metrics(self, rows: list[dict[str, Any]]) -> None:
        atomic_write_text(self.metrics_path, "".join(json.dumps(r) + "\n" for r in rows))

    def append_metrics(self, row: dict[str, Any]) -> None:
        with open(self.metrics_path, "a") as f:
            f.write(json.dumps(row) + "\n")


def _state_step(folder: Path) -> int:
    try:
        return int(json.loads((folder / "state.json").read_text())["step"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{folder / 'state.json'} is unreadable ({e}); the checkpoint is damaged") from e


def read_metrics_file(path: str | Path, upto: int | None = None) -> list[dict[str, Any]]:
    """The rows of a metrics log (only steps <= ``upto`` when given); a bad line is named by number."""
    path = Path(path)
    if not path.exists():
        return []
    if not path.is_file():
        raise CheckpointError(f"{path} is not a regular file")
    rows = []
    with open(path, encoding="utf-8", errors="replace") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise CheckpointError(
                    f"{path}, line {number}, is not a JSON object ({e.msg}); remove or repair that line"
                ) from None
            if not isinstance(row, dict) or not isinstance(row.get("step"), int):
                raise CheckpointError(f"{path}, line {number}, has no integer 'step'; remove or repair that line")
            if upto is None or row["step"] <= upto:
                rows.append(row)
    return rows


def read_metrics(out_dir: str | Path) -> list[dict[str, Any]]:
    """The metrics log of a run folder, one dict per step."""
    path = Path(out_dir) / METRICS
    if not path.exists():
        raise FileNotFoundError(f"no {METRICS} in {out_dir}")
    return read_metrics_file(path)


__all__ = ["CHECKPOINTS", "LINK", "METRICS", "RunFolder", "read_metrics", "read_metrics_file"]
