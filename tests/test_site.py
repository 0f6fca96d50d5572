"""The Jupyter Book site: builds offline with warnings as errors, and its pages draw their plotly figures
in a real browser (headless Chromium; skipped with a reason where none is installed)."""

from __future__ import annotations

import functools
import http.server
import shutil
import socketserver
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))
LESSONS = ROOT / "book" / "lessons"
HTML = ROOT / "book" / "_build" / "html"


def _chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    return None


@pytest.fixture(scope="module")
def site():
    pytest.importorskip("jupyter_book")
    pytest.importorskip("papermill")
    from build_book import build_site, execute, lesson_notebooks, scale_parameters

    # test_notebooks.py leaves the executed lessons in book/lessons; execute any that are missing
    LESSONS.mkdir(parents=True, exist_ok=True)
    params = scale_parameters("ci")
    for nb in lesson_notebooks():
        if not (LESSONS / nb.name).exists():
            execute(nb, LESSONS / nb.name, params.get(nb.name, {}))
    return build_site()


@pytest.mark.slow
def test_site_has_a_page_per_lesson(site):
    assert (site / "index.html").exists()
    for nb in (ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb"):
        page = site / "lessons" / f"{nb.stem}.html"
        assert page.exists(), page
        text = page.read_text()
        assert "Plotly.newPlot" in text
        assert text.count("plotly.js v") <= 2, "plotly.js should be embedded once per page"


@pytest.mark.slow
def test_lesson_page_renders_its_plotly_figures_in_chromium(site):
    chromium = _chromium()
    if chromium is None:
        pytest.skip("no Chromium installed (Debian: apt-get install chromium); .ci/run installs it")
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(site))
    with socketserver.TCPServer(("127.0.0.1", 0), handler) as server:
        threading.Thread(target=server.serve_forever, daemon=True).start()
        url = f"http://127.0.0.1:{server.server_address[1]}/lessons/01_tour.html"
        with tempfile.TemporaryDirectory() as profile:
            dom = subprocess.run(
                [
                    chromium,
                    "--headless",
                    "--no-sandbox",
                    "--disable-gpu",
                    "--disable-quic",
                    "--no-first-run",
                    "--disable-background-networking",
                    "--disable-component-update",
                    "--disable-sync",
                    f"--user-data-dir={profile}",
                    "--window-size=1280,8000",
                    "--virtual-time-budget=15000",
                    "--dump-dom",
                    url,
                ],
                capture_output=True,
                text=True,
                timeout=120,
            ).stdout
        server.shutdown()
    # plotly draws into <svg class="main-svg"> elements once Plotly.newPlot has run
    assert dom.count('class="main-svg"') >= 2, "plotly figures did not render (empty divs)"
    assert "js-plotly-plot" in dom
