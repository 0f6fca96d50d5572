"""Execute every lesson with papermill, then build the Jupyter Book site from the executed notebooks.

    python scripts/build_book.py                 # classroom scale (the notebooks' own defaults)
    python scripts/build_book.py --scale ci      # the small scale CI uses
    python scripts/build_book.py --skip-execute  # rebuild the site from book/lessons as they are

Executed notebooks go to book/lessons/ (generated, not committed); the site to book/_build/html.
The build uses Jupyter Book 1 (Sphinx), which needs no network, and treats warnings as errors.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = ROOT / "notebooks"
BOOK = ROOT / "book"


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
    args = p.parse_args()
    lessons = BOOK / "lessons"
    if not args.skip_execute:
        params = scale_parameters(args.scale)
        lessons.mkdir(parents=True, exist_ok=True)
        total = 0.0
        for nb in lesson_notebooks():
            seconds = execute(nb, lessons / nb.name, params.get(nb.name, {}))
            total += seconds
            print(f"executed {nb.name} in {seconds:.0f}s", flush=True)
        print(f"all lessons executed in {total:.0f}s at scale {args.scale!r}")
    html = build_site()
    print(f"site built: open {html / 'index.html'}")


if __name__ == "__main__":
    main()
