"""The lessons: every notebook is clean in git, executes headless with papermill at CI scale, and never
contradicts itself (workbench.analysis.audit: every printed verdict agrees with its own numbers, and
no number is typed into a markdown cell)."""

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

# Lessons not yet brought under the audit, each with what is missing. A lesson leaves this list when it
# passes; the checks run on it all the same and only an actual failure is excused (strict=False).
TYPED_NUMBERS_PENDING = {
    "04_multi_token_prediction.ipynb": "not yet audited: markdown numbers to generate from code",
    "05_economics.ipynb": "not yet audited: the report's figures typed in markdown instead of claims.REPORTED",
    "06_fp8.ipynb": "not yet audited: format ranges (448, 15, 0.25) typed in markdown",
    "07_r1_reward_curves.ipynb": "not yet audited: typed results and run sizes from earlier runs",
    "08_distillation.ipynb": "not yet audited: typed sizes (64, 128) in the introduction",
    "09_add_a_vertical.ipynb": "owned by the vertical lesson (issue 14 did not edit it)",
    "11_parallelism.ipynb": "owned by the parallelism lesson (issue 14 did not edit it)",
}
VERDICTS_PENDING = {
    "04_multi_token_prediction.ipynb": "does not yet use analysis.stats: MTP judged on one seed, explanation fixed",
    "05_economics.ipynb": "no ledger findings yet for the parameter count and the training bill",
    "06_fp8.ipynb": "does not yet use analysis.stats: the INT8 explanation does not follow the result",
    "07_r1_reward_curves.ipynb": "does not yet use analysis.stats: accuracies without binomial intervals",
    "08_distillation.ipynb": "does not yet use analysis.stats: teacher and student compared without noise",
    "09_add_a_vertical.ipynb": "owned by the vertical lesson (issue 14 did not edit it)",
    "10_serving.ipynb": "owned by the serving lesson (issue 14 did not edit it)",
    "11_parallelism.ipynb": "owned by the parallelism lesson (issue 14 did not edit it)",
}


def test_the_lessons_are_numbered_in_order():
    # tolerant of lessons being added: the numbers present must be unique and start at 01 (or 00)
    numbers = [int(p.name[:2]) for p in NOTEBOOKS]
    assert numbers == sorted(set(numbers)) and numbers[0] in (0, 1), "one notebook per lesson number, from 01"
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
    # the verdict test: no verdict cell states a conclusion its own numbers do not support
    from workbench.analysis.audit import verdict_problems, verdict_records
    from workbench.analysis.claims import collect_findings

    problems = verdict_problems(executed)
    has_findings = any(f["executed"] == path.name for fs in collect_findings(EXECUTED).values() for f in fs)
    if not verdict_records(executed) and not has_findings:
        problems.append("the lesson displays no verdict (analysis.stats) and no ledger finding (analysis.claims)")
    if problems and path.name in VERDICTS_PENDING:
        pytest.xfail(f"{VERDICTS_PENDING[path.name]}: {problems[:3]}")
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_no_number_is_typed_into_markdown(path):
    from workbench.analysis.audit import typed_number_cells

    typed = typed_number_cells(json.loads(path.read_text()))
    if typed and path.name in TYPED_NUMBERS_PENDING:
        pytest.xfail(f"{TYPED_NUMBERS_PENDING[path.name]}: {typed}")
    assert not typed, f"markdown cells carry numbers code should produce (cell: numbers): {typed}"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_the_lesson_asks_a_prediction_before_an_experiment(path):
    cells = json.loads(path.read_text())["cells"]
    asked = any("**Predict:**" in "".join(c["source"]) for c in cells if c["cell_type"] == "markdown")
    if not asked and path.name in VERDICTS_PENDING:
        pytest.xfail(f"{VERDICTS_PENDING[path.name]}; no Predict line yet")
    assert asked, f"{path.name} asks no prediction of the student (a **Predict:** line before an experiment)"
