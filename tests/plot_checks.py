"""Structural checks of written figures (not their pixels): capture the ``Figure`` a plot function
saves, then ask where its legends and texts are drawn.

Example::

    figures = capture_figures(monkeypatch)
    plots.plot_roc_curves(scores, tmp_path / "roc.png")
    (figure,) = figures
    assert not legends_over_axes(figure) and not clipped_texts(figure)
"""

from __future__ import annotations

import matplotlib
import pytest
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.legend import Legend
from matplotlib.text import Text
from matplotlib.transforms import Bbox

matplotlib.use("Agg")

__all__ = ["capture_figures", "clipped_texts", "data_axes", "legends_over_axes"]


def capture_figures(monkeypatch: pytest.MonkeyPatch) -> list[Figure]:
    """The figures saved (``Figure.savefig``) from now on, in order; they are still written."""
    saved: list[Figure] = []
    savefig = Figure.savefig

    def recording(self: Figure, *args, **kwargs):
        saved.append(self)
        return savefig(self, *args, **kwargs)

    monkeypatch.setattr(Figure, "savefig", recording)
    return saved


def _renderer(figure: Figure):
    """A renderer of ``figure`` laid out (constrained layout) as it was saved."""
    canvas = figure.canvas if isinstance(figure.canvas, FigureCanvasAgg) else FigureCanvasAgg(figure)
    if figure.stale:
        canvas.draw()
    return canvas.get_renderer()


def data_axes(figure: Figure) -> list:
    """The visible axes of ``figure`` (twin axes included)."""
    return [axis for axis in figure.axes if axis.get_visible() and axis.axison]


def legends_over_axes(figure: Figure) -> list[tuple[Legend, object]]:
    """``(legend, axes)`` pairs where a legend's box overlaps the data area of an axes."""
    renderer = _renderer(figure)
    legends = [*figure.legends, *(axis.get_legend() for axis in figure.axes if axis.get_legend() is not None)]
    found = []
    for legend in legends:
        box = legend.get_window_extent(renderer)
        for axis in data_axes(figure):
            inside = Bbox.intersection(box, axis.get_window_extent(renderer))
            if inside is not None and inside.width > 1 and inside.height > 1:  # touching edges is not covering
                found.append((legend, axis))
    return found


def clipped_texts(figure: Figure) -> list[str]:
    """The visible, non-empty texts (titles, labels, tick labels, legend entries, annotations) that
    reach beyond the figure's canvas."""
    renderer = _renderer(figure)
    canvas = figure.bbox
    undrawn = set()  # the labels of ticks outside the view limits exist but are not drawn
    for axis in figure.axes:
        for scale in (axis.xaxis, axis.yaxis):
            low, high = sorted(scale.get_view_interval())
            for tick in (*scale.get_major_ticks(), *scale.get_minor_ticks()):
                if not low - 1e-9 * abs(high - low) <= tick.get_loc() <= high + 1e-9 * abs(high - low):
                    undrawn.update((tick.label1, tick.label2))
    clipped = []
    for text in figure.findobj(Text):
        if text in undrawn or not text.get_visible() or not text.get_text().strip():
            continue
        box = text.get_window_extent(renderer)
        if box.x0 < canvas.x0 - 1 or box.y0 < canvas.y0 - 1 or box.x1 > canvas.x1 + 1 or box.y1 > canvas.y1 + 1:
            clipped.append(text.get_text())
    return clipped
