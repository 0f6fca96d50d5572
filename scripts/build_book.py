"""Execute every lesson with papermill, then build the Jupyter Book site from the executed notebooks.

    python scripts/build_book.py                 # classroom scale (the notebooks' own defaults)
    python scripts/build_book.py --scale ci      # the small scale CI uses
    python scripts/build_book.py --skip-execute  # rebuild the site from book/lessons as they are
    python scripts/build_book.py --force         # execute every lesson, cached or not

Executed notebooks go to book/lessons/ (generated, not committed); the site to book/_build/html.
The build uses Jupyter Book 1 (Sphinx), which needs no network, and treats warnings as errors.

Execution is cached: a lesson runs again only when its key changes. The key hashes the notebook as
committed, the parameters its scale injects, the scale's name, every source file of the ``workbench``
package and everything under ``data/`` (the shipped model and tokenizer). The claims ledger
(``LEDGER``), which reads the other executed lessons, also hashes their keys. Keys live next to the
executed notebooks (``book/lessons/<name>.key``); a lesson is written to a temporary file and moved
into place, and its key written, only when it executed without error, so an interrupted build never
leaves a stale notebook behind a fresh key.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = ROOT / "notebooks"
BOOK = ROOT / "book"
LEDGER = "12_claims_ledger.ipynb"  # reads the other executed lessons: its key includes theirs


def lesson_notebooks() -> list[Path]:
    return sorted(NOTEBOOKS.glob("[0-9][0-9]_*.ipynb"))


def scale_parameters(scale: str) -> dict[str, dict]:
    scales = json.loads((NOTEBOOKS / "scales.json").read_text())
    if scale not in scales or scale.startswith("_"):
        raise SystemExit(f"unknown scale {scale!r}; choose one of {[s for s in scales if not s.startswith('_')]}")
    return scales[scale]


def execute(notebook: Path, out: Path, parameters: dict) -> float:
    """Run one notebook with papermill (cwd = notebooks/, as in JupyterLab); returns seconds."""
    import papermill

    t0 = time.perf_counter()
    papermill.execute_notebook(
        str(notebook),
        str(out),
        parameters=parameters,
        cwd=str(NOTEBOOKS),
        kernel_name="python3",
        progress_bar=False,
        log_output=False,
    )
    return time.perf_counter() - t0


def _tree_digest(folder: Path, pattern: str) -> str:
    h = hashlib.sha256()
    for path in sorted(folder.rglob(pattern)):
        if path.is_file() and "__pycache__" not in path.parts:
            h.update(str(path.relative_to(folder)).encode() + b"\0" + path.read_bytes() + b"\0")
    return h.hexdigest()


def library_digest() -> str:
    """One hash of the library's source and the shipped data: what every lesson's result depends on."""
    return hashlib.sha256(
        (_tree_digest(ROOT / "workbench", "*.py") + _tree_digest(ROOT / "data", "*")).encode()
    ).hexdigest()


def execution_key(notebook: Path, parameters: dict, scale: str, library: str, others: dict[str, str]) -> str:
    """The cache key of one lesson (see the module docstring)."""
    h = hashlib.sha256()
    h.update(notebook.read_bytes())
    h.update(json.dumps(parameters, sort_keys=True).encode())
    h.update(scale.encode() + library.encode())
    if notebook.name == LEDGER:
        h.update(json.dumps(others, sort_keys=True).encode())
    return h.hexdigest()


def execute_cached(
    notebook: Path, out_dir: Path, parameters: dict, scale: str, library: str, others: dict[str, str], force: bool
) -> tuple[str, float | None]:
    """Execute one lesson unless its key is unchanged; returns (key, seconds or None when cached)."""
    out = out_dir / notebook.name
    key_file = out_dir / (notebook.name + ".key")
    key = execution_key(notebook, parameters, scale, library, others)
    if not force and out.exists() and key_file.exists() and key_file.read_text().strip() == key:
        return key, None
    key_file.unlink(missing_ok=True)  # the old key no longer describes what is (or will be) there
    tmp = out.with_name(f".{notebook.stem}.tmp.ipynb")
    seconds = execute(notebook, tmp, parameters)
    os.replace(tmp, out)
    tmp_key = key_file.with_name(f".{key_file.name}.tmp")
    tmp_key.write_text(key + "\n")
    os.replace(tmp_key, key_file)
    return key, seconds


def build_site(builder: str = "html") -> Path:
    exe = Path(sys.executable).parent / "jupyter-book"  # the venv's own, whatever is on PATH
    if not exe.exists():
        found = shutil.which("jupyter-book")
        if found is None:
            raise SystemExit("jupyter-book is not installed: pip install 'jupyter-book<2' (make setup does)")
        exe = Path(found)
    cmd = [str(exe), "build", str(BOOK), "--builder", builder, "--warningiserror", "--keep-going", "--quiet"]
    subprocess.run(cmd, check=True)
    return BOOK / "_build" / "html"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--scale", default="default", help="default (classroom), ci or gpu; see notebooks/scales.json")
    p.add_argument("--skip-execute", action="store_true", help="build from the executed notebooks already there")
    p.add_argument("--force", action="store_true", help="execute every lesson even when its cache key is unchanged")
    args = p.parse_args()
    lessons = BOOK / "lessons"
    if not args.skip_execute:
        params = scale_parameters(args.scale)
        lessons.mkdir(parents=True, exist_ok=True)
        library = library_digest()
        total, keys = 0.0, {}
        # the ledger last: it reads the lessons executed before it
        for nb in sorted(lesson_notebooks(), key=lambda n: n.name == LEDGER):
            parameters = params.get(nb.name, {})
            if nb.name == LEDGER:  # its links must point at the book's pages, not at the notebooks
                parameters = {**parameters, "link_ext": ".html"}
            keys[nb.name], seconds = execute_cached(
                nb, lessons, parameters, args.scale, library, dict(keys), args.force
            )
            if seconds is None:
                print(f"cached   {nb.name} (notebook, parameters and library unchanged)", flush=True)
            else:
                total += seconds
                print(f"executed {nb.name} in {seconds:.0f}s", flush=True)
        print(f"lessons executed in {total:.0f}s at scale {args.scale!r}")
    html = build_site()
    print(f"site built: open {html / 'index.html'}")


if __name__ == "__main__":
    main()
