"""The ledger table (workbench.analysis.ledger): one row per claim from the executed lessons, the strongest
finding shown, the scale each lesson ran at, labels re-derived from their rules, and money kept as money."""

from __future__ import annotations

import json

import pytest

from workbench.analysis import claims, ledger

SCALES = {"_doc": "x", "ci": {"05_economics.ipynb": {"steps": 3}}, "default": {}}


def _finding_output(finding: claims.Finding) -> dict:
    return {
        "output_type": "display_data",
        "data": {"text/markdown": finding.markdown()},
        "metadata": {claims.CLAIM_KEY: finding.record()},
    }


def _write(folder, name, findings, params):
    meta = {} if params is None else {"papermill": {"parameters": params}}
    cells = [{"cell_type": "code", "source": "", "outputs": [_finding_output(f) for f in findings]}]
    (folder / name).write_text(json.dumps({"cells": cells, "metadata": meta, "nbformat": 4}))


def test_rows_follow_the_claims_with_scale_and_strongest_finding(tmp_path):
    near = claims.Finding.of("cost-5.6m", ("holds", claims.compare_figure(5.6e6, 5.576e6)[1]), "5.576M")
    misq = claims.Finding.of("params-571", claims.compare_figure(571e9, 671.03e9), "671.03B counted")
    _write(tmp_path, "05_economics.ipynb", [near, misq], {"steps": 3})
    low = claims.Finding.of("aux-free-95", claims.threshold(1.0, 0.5, "below"), "MaxVio 1.0")
    _write(tmp_path, "03_expert_routing.ipynb", [low], {})
    _write(tmp_path, "04_multi_token_prediction.ipynb", [], {"steps": 99})
    # the ledger's own earlier output is never read back as a source
    _write(tmp_path, ledger.LEDGER_NOTEBOOK, [claims.Finding.of("moe-silos", claims.threshold(0, 1, "below"), "x")], {})

    rows = ledger.ledger_rows(tmp_path, SCALES)
    assert [r["claim"] for r in rows] == [c.id for c in claims.CLAIMS]
    by = {r["claim"]: r for r in rows}
    assert by["params-571"]["label"] == "misquoted" and by["params-571"]["scale"] == "ci"
    assert by["cost-5.6m"]["label"] == "holds" and by["cost-5.6m"]["findings"] == 1
    assert by["aux-free-95"]["label"] == "does not hold" and by["aux-free-95"]["scale"] == "classroom"
    assert by["moe-silos"]["label"] == ledger.NOT_MEASURED and by["moe-silos"]["number"] == ""
    counts = ledger.label_counts(rows)
    assert counts["misquoted"] == 1 and counts["holds"] == 1 and counts["does not hold"] == 1
    assert sum(counts.values()) == len(claims.CLAIMS)

    own = claims.Finding.of("moe-silos", claims.threshold(0.0, 1.0, "below"), "computed").record()
    assert ledger.ledger_rows(tmp_path, SCALES, own=[own])[0]["scale"] == "computed here"


def test_the_strongest_finding_wins_over_one_that_cannot_tell(tmp_path):
    from workbench.analysis.stats import Estimate, Verdict

    v = Verdict("A", "B", Estimate(0.0, 0.1, -0.2, 0.2, 5, unit="seeds"), metric="m", knob="seeds")
    cannot = claims.Finding.of("moe-silos", claims.judge(v, holds=["a"], fails=["b"]), "unclear", verdicts=[v])
    holds = claims.Finding.of("moe-silos", claims.threshold(0.0, 1.0, "below"), "clear")
    _write(tmp_path, "03_expert_routing.ipynb", [cannot, holds], {})
    row = ledger.ledger_rows(tmp_path, SCALES)[0]
    assert row["label"] == "holds" and row["number"] == "clear" and row["findings"] == 2


def test_a_tampered_label_is_refused(tmp_path):
    f = claims.Finding.of("params-571", claims.compare_figure(571e9, 671.03e9), "671.03B counted")
    out = _finding_output(f)
    out["metadata"][claims.CLAIM_KEY]["label"] = "holds"  # the rule says misquoted
    nb = {"cells": [{"cell_type": "code", "source": "", "outputs": [out]}], "metadata": {}, "nbformat": 4}
    (tmp_path / "05_economics.ipynb").write_text(json.dumps(nb))
    with pytest.raises(ValueError, match="label its rule does not give"):
        ledger.ledger_rows(tmp_path, SCALES)


def test_scale_names_and_markdown(tmp_path):
    assert ledger.scale_of({"metadata": {}}, "x.ipynb", SCALES).startswith("unknown")
    assert ledger.scale_of({"metadata": {"papermill": {"parameters": {"a": 1}}}}, "x.ipynb", SCALES).startswith(
        "custom"
    )
    rows = ledger.ledger_rows(tmp_path / "absent", SCALES)
    assert all(r["label"] == ledger.NOT_MEASURED for r in rows)
    table = ledger.markdown_table(rows)
    assert "(05_economics.ipynb#" in table and "(05_economics.html#" in ledger.markdown_table(rows, ".html")
    with pytest.raises(ValueError, match="link_ext"):
        ledger.markdown_table(rows, "html")
    assert table.count("\n") == len(rows) + 1
    assert "$" not in table.replace("\\$", "")  # every dollar sign escaped: money, not math
    assert claims.escape_dollars("a $5 and \\$6") == "a \\$5 and \\$6"
    f = claims.Finding.of("cost-5.6m", claims.compare_figure(5.6e6, 5.576e6), "$5.576M")
    assert "\\$5.576M" in f.markdown()
