"""The comparison's scripts: ``vertical_compare.py`` runs a plan, skips what its rows hold, prints the table;
``make_vertical_base.py`` refuses an output folder that is not a model folder before it trains anything."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
COMPARE = ROOT / "scripts" / "vertical_compare.py"
MAKE_BASE = ROOT / "scripts" / "make_vertical_base.py"


def _run(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    env = {"PYTHONHASHSEED": "0", "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"}
    return subprocess.run([sys.executable, *map(str, args)], capture_output=True, text=True, timeout=timeout, env=env)


@pytest.mark.slow
def test_a_plan_runs_appends_rows_skips_them_again_and_tabulates(tmp_path):
    rows = tmp_path / "rows.jsonl"
    r = _run(COMPARE, "run", "--plan", "ci", "--rows", rows)
    assert r.returncode == 0, r.stderr
    lines = rows.read_text().splitlines()
    assert len(lines) == 3 and r.stdout.count("borrow ") == 3
    again = _run(COMPARE, "run", "--plan", "ci", "--rows", rows)  # an interrupted plan continues: nothing to redo
    assert again.returncode == 0 and again.stdout.count("skip (in ") == 3
    assert rows.read_text().splitlines() == lines
    t = _run(COMPARE, "table", rows)
    assert t.returncode == 0 and "| borrow | add-base | full |" in t.stdout and "| 3 | 0,1 |" in t.stdout


def test_bad_plans_bases_and_folders_are_refused_before_any_training(tmp_path):
    r = _run(COMPARE, "run", "--plan", "nope", "--rows", tmp_path / "r.jsonl")
    assert r.returncode != 0 and "unknown plan 'nope'" in r.stderr and "Traceback" not in r.stderr
    r = _run(COMPARE, "run", "--plan", "ci", "--rows", tmp_path / "r.jsonl", "--base", tmp_path / "nothing")
    assert r.returncode != 0 and "is not a model folder" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "r.jsonl").exists()
    r = _run(COMPARE, "table", tmp_path / "missing.jsonl")
    assert r.returncode != 0 and "is not a file of rows" in r.stderr and "Traceback" not in r.stderr
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    r = _run(MAKE_BASE, "--read", "--out", mine)
    assert r.returncode == 2 and "is not a model folder" in r.stderr and "Traceback" not in r.stderr
    assert sorted(p.name for p in mine.iterdir()) == ["notes.txt"] and (mine / "notes.txt").read_text() == "keep me"
    for bad in (["--steps", "0"], ["--threads", "0"]):
        r = _run(MAKE_BASE, *bad, "--out", tmp_path / "new")
        assert r.returncode == 2 and bad[0] in r.stderr and not (tmp_path / "new").exists()
