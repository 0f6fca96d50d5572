"""Figures and knobs for the lessons: plotly set up once for JupyterLab *and* the static book, widgets that redraw.

Plotly's default renderer in a kernel writes only ``application/vnd.plotly.v1+json``, which JupyterLab
draws but nbconvert and Jupyter Book drop. ``setup_notebook()`` selects ``plotly_mimetype+notebook``:
the first part keeps figures interactive in JupyterLab, the second writes ``text/html`` that needs
no network (plotly.js is embedded once per notebook, when the renderer is activated, and every
figure after that reuses it).

``knob(draw, **controls)`` is how a lesson lets a learner turn a knob: the figure is drawn once with
the controls' default values (so a headless papermill run and the book show it), and below it the
ipywidgets controls redraw it when moved in a live kernel.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

RENDERER = "plotly_mimetype+notebook"


def setup_notebook(threads: int | None = None) -> None:
    """Call once at the top of a lesson: plotly renderer for lab + book, and a sane thread count."""
    import plotly.io as pio

    pio.renderers.default = RENDERER
    pio.templates.default = "plotly_white"
    if threads is not None:
        torch.set_num_threads(threads)


def knob(draw: Callable[..., Any], **controls: Any) -> None:
    """Draw ``draw(**defaults)`` once, then show ``controls`` (ipywidgets) that redraw the figure.

    ``draw`` returns a plotly figure.
    """
    import ipywidgets as widgets
    from IPython.display import display

    values = {name: w.value for name, w in controls.items()}
    draw(**values).show()
    if not controls:
        return
    out = widgets.Output()

    def redraw(_change: Any = None) -> None:
        with out:
            out.clear_output(wait=True)
            draw(**{name: w.value for name, w in controls.items()}).show()

    for w in controls.values():
        w.observe(redraw, names="value")
    display(
        widgets.VBox(
            [widgets.HTML("<b>Turn the knob (live kernel only):</b>"), widgets.HBox(list(controls.values())), out]
        )
    )


def line_chart(
    series: dict[str, Sequence[float]],
    x: dict[str, Sequence[float]] | Sequence[float] | None = None,
    title: str = "",
    xaxis: str = "step",
    yaxis: str = "",
    log_y: bool = False,
):
    """One line per named series (x shared, or one x per series)."""
    import plotly.graph_objects as go

    fig = go.Figure()
    for name, ys in series.items():
        xs = x.get(name) if isinstance(x, dict) else x
        fig.add_trace(
            go.Scatter(
                x=list(xs) if xs is not None else list(range(1, len(ys) + 1)), y=list(ys), mode="lines", name=name
            )
        )
    fig.update_layout(title=title, xaxis_title=xaxis, yaxis_title=yaxis, height=420)
    if log_y:
        fig.update_yaxes(type="log")
    return fig


def heatmap(
    z: torch.Tensor | Sequence[Sequence[float]],
    x: Sequence[Any],
    y: Sequence[Any],
    title: str = "",
    xaxis: str = "",
    yaxis: str = "",
    colorscale: str = "Blues",
    zmin: float | None = None,
    zmax: float | None = None,
):
    import plotly.graph_objects as go

    z = z.tolist() if isinstance(z, torch.Tensor) else z
    fig = go.Figure(go.Heatmap(z=z, x=list(x), y=list(y), colorscale=colorscale, zmin=zmin, zmax=zmax))
    fig.update_layout(title=title, xaxis_title=xaxis, yaxis_title=yaxis, height=380)
    return fig


def metric_series(metrics: list[dict[str, Any]], key: str) -> tuple[list[int], list[float]]:
    """Steps and values of one metric from a metrics log (rows without the key are skipped)."""
    rows = [m for m in metrics if key in m]
    return [m["step"] for m in rows], [m[key] for m in rows]
