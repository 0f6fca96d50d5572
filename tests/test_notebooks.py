"""The lessons: every notebook is clean in git and executes headless with papermill at CI scale."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))
NOTEBOOKS = sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb"))
EXECUTED = ROOT / "book" / "lessons"  # where the book build expects executed lessons


def test_the_lessons_are_numbered_in_order():
    numbers = [int(p.name[:2]) for p in NOTEBOOKS]
    assert numbers == sorted(set(numbers)) and numbers[0] == 1, "one notebook per lesson number, from 01"
    assert set(range(1, 10)) | {11} <= set(numbers), f"lessons missing: {sorted(set(range(1, 12)) - set(numbers))}"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_is_committed_clean_with_a_parameters_cell(path):
    nb = json.loads(path.read_text())
    code = [c for c in nb["cells"] if c["cell_type"] == "code"]
    assert code and "parameters" in code[0].get("metadata", {}).get("tags", []), "first code cell must be tagged"
    params = "".join(code[0]["source"])
    for knob in ("seed", "device"):
        assert f"{knob} =" in params, f"parameters cell lacks {knob}"
    for cell in code:
        assert cell.get("outputs") == [] and cell.get("execution_count") is None, "commit notebooks without outputs"
    source = "\n".join("".join(c["source"]) for c in code)
    for forbidden in ("class Model(", "def forward(", "class MLA(", "class Router("):
        assert forbidden not in source, f"{path.name} redefines library code ({forbidden}); import it from workbench"


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_executes_at_ci_scale(path):
    pytest.importorskip("papermill")
    from build_book import execute, scale_parameters

    EXECUTED.mkdir(parents=True, exist_ok=True)
    out = EXECUTED / path.name
    t0 = time.perf_counter()
    execute(path, out, scale_parameters("ci").get(path.name, {}))
    executed = json.loads(out.read_text())
    outputs = [o for c in executed["cells"] if c["cell_type"] == "code" for o in c.get("outputs", [])]
    assert not [o for o in outputs if o.get("output_type") == "error"]
    html = [o for o in outputs if "text/html" in o.get("data", {})]
    assert any("Plotly.newPlot" in "".join(o["data"]["text/html"]) for o in html), "no plotly figure with text/html"
    print(f"{path.name}: {time.perf_counter() - t0:.0f}s")
