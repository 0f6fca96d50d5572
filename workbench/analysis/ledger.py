"""The claims ledger as a table: every claim of the popular accounts, the lesson that tests it, and its label.

Each lesson shows its findings where it measures them (``claims.Finding.show()``); this module gathers
them from the executed lessons into one row per claim, for lesson 12 and for anyone who wants the
table without the book:

    rows = ledger_rows("book/lessons", scales=json.load(open("notebooks/scales.json")))
    print(markdown_table(rows))

A row carries the claim, the label its finding earned (re-derived from the finding's rule, never
trusted from the stored text), the figure behind it, a link to the section that measures it, and the
**scale** the lesson was executed at. The scale matters: a CI-scale run is the smallest that still shows
every figure, and most of its verdicts honestly say "cannot tell"; the labels worth quoting come from
the classroom scale (the notebooks' own defaults, which inject no parameters).

Where it simplifies: a claim measured in several lessons (or several times in one) keeps every
finding, and the row shows the one with the strongest evidence: the first that concludes
(misquoted, does not hold, holds) over one that cannot tell. A claim whose lesson was not executed gets
the row "not measured", never a label.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

from workbench.analysis.claims import CLAIMS, LABELS, anchor, collect_findings, escape_dollars, expected_label

LEDGER_NOTEBOOK = "12_claims_ledger.ipynb"  # the lesson that shows this table (never read as a source)
NOT_MEASURED = "not measured"
STRENGTH = {"misquoted": 0, "does not hold": 1, "holds": 2, "cannot tell at this scale": 3}


def scale_of(executed: dict[str, Any], name: str, scales: dict[str, Any] | None) -> str:
    """The scale an executed notebook ran at, from the parameters papermill injected into it: none is the
    classroom scale; the entry of a named scale in ``scales`` (notebooks/scales.json) is that scale."""
    params = executed.get("metadata", {}).get("papermill", {}).get("parameters")
    if params is None:
        return "unknown (not executed by papermill)"
    if not params:
        return "classroom"
    for scale, entries in (scales or {}).items():
        if not scale.startswith("_") and isinstance(entries, dict) and entries.get(name) == params:
            return scale
    return "custom: " + json.dumps(params, sort_keys=True)


def _scales_by_lesson(folder: Path, scales: dict[str, Any] | None) -> dict[str, str]:
    out = {}
    for path in sorted(folder.glob("[0-9][0-9]_*.ipynb")):
        try:
            out[path.name] = scale_of(json.loads(path.read_text()), path.name, scales)
        except (OSError, ValueError) as e:
            out[path.name] = f"unreadable ({type(e).__name__})"
    return out


def ledger_rows(
    executed: str | Path, scales: dict[str, Any] | None = None, own: list[dict] | None = None
) -> list[dict]:
    """One row per claim, in the order of ``claims.CLAIMS``.

    executed: the folder of executed lessons (book/lessons); the ledger's own notebook there is skipped.
    scales: notebooks/scales.json, to name the scale each lesson ran at.
    own: ``Finding.record()``s computed by the caller itself (the ledger lesson's own rows).
    """
    folder = Path(executed)
    found = {cid: [f for f in fs if f["executed"] != LEDGER_NOTEBOOK] for cid, fs in collect_findings(folder).items()}
    for rec in own or []:
        found.setdefault(rec["claim"], []).append({**rec, "executed": LEDGER_NOTEBOOK})
    scale = _scales_by_lesson(folder, scales) if folder.is_dir() else {}
    rows = []
    for c in CLAIMS:
        findings = found.get(c.id, [])
        for f in findings:  # a label is never taken on trust: it must follow from its own rule
            if expected_label(f["rule"]) != f["label"] or f["label"] not in LABELS:
                raise ValueError(f"the finding for {c.id!r} in {f['executed']} carries a label its rule does not give")
        row = {"claim": c.id, "text": c.text, "lesson": c.lesson, "section": c.section, "test": c.test}
        if not findings:
            rows.append({**row, "label": NOT_MEASURED, "number": "", "note": "", "scale": "", "findings": 0})
            continue
        best = min(findings, key=lambda f: STRENGTH[f["label"]])
        where = best["executed"]
        rows.append(
            {
                **row,
                "label": best["label"],
                "number": best["number"],
                "note": best.get("note", ""),
                "scale": "computed here" if where == LEDGER_NOTEBOOK else scale.get(where, "unknown"),
                "findings": len(findings),
            }
        )
    return rows


def label_counts(rows: list[dict]) -> dict[str, int]:
    """How many claims earned each label (and how many are not measured), in a fixed order."""
    counts = Counter(r["label"] for r in rows)
    return {label: counts.get(label, 0) for label in (*LABELS, NOT_MEASURED)}


def _cell(text: str) -> str:
    return escape_dollars(str(text).replace("|", "\\|").replace("\n", " "))


def markdown_table(rows: list[dict], link_ext: str = ".ipynb") -> str:
    """The ledger as a Markdown table (claim, label, the figure behind it, where it is measured, scale).

    link_ext: what the links to the lessons end in: ".ipynb" in JupyterLab, ".html" on the book's pages
    (a link inside a cell's output is not rewritten by the book builder).
    """
    if link_ext not in (".ipynb", ".html"):
        raise ValueError(f"link_ext must be '.ipynb' (JupyterLab) or '.html' (the book), got {link_ext!r}")
    lines = ["| claim | label | what was measured | where | scale |", "|---|---|---|---|---|"]
    for r in rows:
        figure = r["number"] or f"({r['test']})"
        target = r["lesson"].removesuffix(".ipynb") + link_ext + "#" + anchor(r["section"])
        where = f"[{_cell(r['section'])}]({target})"
        lines.append(f"| *{_cell(r['text'])}* | **{r['label']}** | {_cell(figure)} | {where} | {_cell(r['scale'])} |")
    return "\n".join(lines)


__all__ = ["LEDGER_NOTEBOOK", "NOT_MEASURED", "label_counts", "ledger_rows", "markdown_table", "scale_of"]
