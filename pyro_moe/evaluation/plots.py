"""PNG figures of the evaluation: reliability diagrams, per-layer stability violins, ROC curves,
efficiency bars and the trajectories of learned prior scales.

Figures are drawn on matplotlib's Agg canvas without pyplot, so nothing opens a window and the
global backend is left alone. Every function writes one PNG (creating its folder), with a title,
axis labels and a legend outside the data, and returns its path.

Example::

    from pyro_moe.evaluation import metrics, plots
    diagrams = {"deterministic": metrics.reliability_diagram_data(p, y), "MFVR": metrics.reliability_diagram_data(q, y)}
    plots.plot_reliability_diagram(diagrams, "out/reliability.png", references=["deterministic"])
    plots.plot_stability_violins(stability, "out/stability.png", threshold=0.9)
    plots.plot_roc_curves({"mutual information": (mi_in, mi_ood)}, "out/roc.png")
    plots.plot_efficiency_bars({"deterministic": {"latency (ms)": 12.0}, "MFVR": {"latency (ms)": 30.0}},
                               "out/efficiency.png", baseline="deterministic")
    plots.plot_scale_trajectories({"layer 0": {0: 1.0, 50: 1.2, 100: 1.25}}, "out/scales.png")
"""

from __future__ import annotations

import math
import textwrap
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib
import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter
from sklearn.metrics import roc_curve
from torch import Tensor

from pyro_moe.atomic_files import write_atomically
from pyro_moe.errors import ConfigurationError
from pyro_moe.evaluation.metrics import ReliabilityDiagram, ood_auroc
from pyro_moe.evaluation.stability import DEFAULT_GAMMA, RoutingStability

__all__ = [
    "plot_efficiency_bars",
    "plot_reliability_diagram",
    "plot_roc_curves",
    "plot_scale_trajectories",
    "plot_stability_violins",
]

DPI = 120
"""Resolution of the written PNGs."""

RELIABILITY_COLUMNS = 4
"""Panels per row of the reliability diagram."""

METHOD_COLOUR = "C0"
"""The colour of each panel's own method in the reliability diagram."""

REFERENCE_COLOURS = ("black", "C1", "C2", "C4")
"""The colours of the faint reference methods in the reliability diagram, in order."""


def _png_path(path: str | Path) -> Path:
    path = Path(path)
    if path.suffix.lower() != ".png":
        raise ConfigurationError(f"plots are written as PNG: the path must end in .png, got {str(path)!r}.")
    return path


def _save(figure: Figure, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    FigureCanvasAgg(figure)
    write_atomically(path, lambda temporary: figure.savefig(temporary, dpi=DPI))
    return path


def _wrapped(title: str, width: float) -> str:
    """``title`` broken between words into lines that fit ``width`` inches at the ``"medium"`` font size."""
    return textwrap.fill(title, width=max(20, int(width * 11)), break_on_hyphens=False, break_long_words=False)


def _non_empty(mapping: Mapping, what: str) -> None:
    if not isinstance(mapping, Mapping) or not mapping:
        raise ConfigurationError(f"{what} must be a non-empty mapping from names to values.")


def plot_reliability_diagram(
    diagrams: Mapping[str, ReliabilityDiagram] | ReliabilityDiagram,
    path: str | Path,
    *,
    title: str = "Reliability diagram",
    references: Sequence[str] = (),
) -> Path:
    """Small multiples: one panel per method (shared axes) of accuracy against confidence per bin over
    the diagonal of perfect calibration, its ECE in the panel's title, the ``references`` drawn faintly
    in every other panel, and under each panel a strip of the number of examples per bin (written on
    the bars). One legend below the panels.

    Args:
        diagrams: ``{method: ReliabilityDiagram}`` (from :func:`pyro_moe.evaluation.metrics.reliability_diagram_data`),
            or one diagram; all with the same bins.
        path: the ``.png`` to write.
        title: the figure title.
        references: methods among ``diagrams`` drawn faintly in every panel (e.g. the deterministic
            model and temperature scaling).
    """
    path = _png_path(path)
    if isinstance(diagrams, ReliabilityDiagram):
        diagrams = {"model": diagrams}
    _non_empty(diagrams, "diagrams")
    edges = next(iter(diagrams.values())).edges
    for name, diagram in diagrams.items():
        if not isinstance(diagram, ReliabilityDiagram) or diagram.edges.shape != edges.shape:
            raise ConfigurationError(f"diagram {name!r} must be a ReliabilityDiagram with {len(edges) - 1} bins.")
    unknown = [name for name in references if name not in diagrams]
    if isinstance(references, str) or unknown:
        raise ConfigurationError(
            f"references must be a sequence of methods among {list(diagrams)}, got {references!r}."
        )
    edges = edges.double().cpu().numpy()
    curves = {name: _reliability_curve(diagram) for name, diagram in diagrams.items()}
    reference_colours = dict(zip(references, REFERENCE_COLOURS, strict=False))
    largest = max(int(diagram.count.max()) for diagram in diagrams.values())

    columns = min(len(diagrams), RELIABILITY_COLUMNS)
    rows = math.ceil(len(diagrams) / columns)
    figure = Figure(figsize=(0.6 + 3.0 * columns, 0.9 + 3.9 * rows), layout="constrained")
    grid = figure.add_gridspec(2 * rows, columns, height_ratios=(3, 1) * rows)
    panels: list[Any] = []
    strips: list[Any] = []
    for number, (name, diagram) in enumerate(diagrams.items()):
        row, column = divmod(number, columns)
        first_panel, first_strip = (panels[0], strips[0]) if panels else (None, None)
        panel = figure.add_subplot(grid[2 * row, column], sharex=first_panel, sharey=first_panel)
        strip = figure.add_subplot(grid[2 * row + 1, column], sharex=panel, sharey=first_strip)
        panels.append(panel)
        strips.append(strip)
        panel.plot([0, 1], [0, 1], linestyle="--", color="grey", linewidth=1, label="perfect calibration")
        for reference, colour in reference_colours.items():
            if reference != name:
                panel.plot(
                    *curves[reference], color=colour, alpha=0.45, linewidth=1.2, label=f"{reference} (reference)"
                )
        panel.plot(
            *curves[name], marker="o", markersize=4, color=METHOD_COLOUR, linewidth=2, label="the panel's method"
        )
        panel.set_title(f"{name}\nECE {diagram.expected_calibration_error:.3f}", fontsize="medium")
        panel.grid(alpha=0.3)
        panel.tick_params(labelbottom=False)
        count = diagram.count.cpu().numpy()
        bars = strip.bar(edges[:-1], count, width=np.diff(edges), align="edge", color="0.6", label="examples per bin")
        strip.bar_label(bars, labels=[str(c) if c else "" for c in count], fontsize=6, padding=1)
        strip.set_xlabel("confidence" if number + columns >= len(diagrams) else "")
        if column == 0:
            panel.set_ylabel("accuracy")
            strip.set_ylabel("examples")
        else:
            panel.tick_params(labelleft=False)
            strip.tick_params(labelleft=False)
    panels[0].set(xlim=(0, 1), ylim=(0, 1))
    strips[0].set_ylim(0, 1.35 * max(largest, 1))  # room for the counts written above the bars
    handles = {}
    for axis in (*panels, strips[0]):  # each label once
        for handle, label in zip(*axis.get_legend_handles_labels(), strict=True):
            handles.setdefault(label, handle)
    order = ["the panel's method", *(f"{name} (reference)" for name in references), "perfect calibration"]
    handles = {label: handles[label] for label in [*order, "examples per bin"] if label in handles}
    figure.legend(handles.values(), handles.keys(), loc="outside lower center", ncols=min(len(handles), columns, 3))
    figure.suptitle(title)
    return _save(figure, path)


def _reliability_curve(diagram: ReliabilityDiagram) -> tuple[np.ndarray, np.ndarray]:
    """Mean confidence and accuracy ``(filled bins,)`` of the non-empty bins."""
    filled = (diagram.count > 0).cpu().numpy()
    confidence = diagram.confidence.double().cpu().numpy()[filled]
    return confidence, diagram.accuracy.double().cpu().numpy()[filled]


def _colour(number: int, total: int) -> Any:
    """Distinct colours for up to 20 series: matplotlib's ``tab10``, ``tab20`` beyond ten."""
    return f"C{number}" if total <= 10 else matplotlib.colormaps["tab20"](number % 20)


def plot_stability_violins(
    result: RoutingStability,
    path: str | Path,
    *,
    gamma: float = DEFAULT_GAMMA,
    threshold: float | None = None,
    title: str | None = None,
) -> Path:
    """Per-layer violins of the tokens' Jaccard similarities at noise level ``gamma``, means
    marked; with a ``threshold`` line, layers whose mean falls below it are coloured as susceptible.

    Args:
        result: from :func:`pyro_moe.evaluation.stability.routing_stability`.
        path: the ``.png`` to write.
        gamma: the noise level to show (one of ``result.gammas``).
        threshold: the Jaccard level below which a layer counts as susceptible.
        title: the figure title (default names gamma).
    """
    path = _png_path(path)
    if not isinstance(result, RoutingStability):
        raise ConfigurationError("result must be a RoutingStability (from routing_stability).")
    if threshold is not None and not 0 <= threshold <= 1:
        raise ConfigurationError(f"threshold must be a Jaccard similarity in [0, 1], got {threshold!r}.")
    values = result.values[:, result.gamma_index(gamma)].double().numpy()  # (routers, tokens)
    means = values.mean(-1)
    positions = np.arange(len(result.layers))

    figure = Figure(figsize=(max(8.0, 0.6 * len(positions) + 4), 4.8), layout="constrained")
    axis = figure.subplots()
    parts = axis.violinplot(list(values), positions=positions, showmeans=False, showextrema=True)
    susceptible = means < threshold if threshold is not None else np.zeros(len(means), dtype=bool)
    for body, low in zip(parts["bodies"], susceptible, strict=True):
        body.set_facecolor("tab:red" if low else "tab:blue")
        body.set_alpha(0.5)
    for lines in ("cmins", "cmaxes", "cbars"):
        parts[lines].set_color("grey")
    handles = []
    if not susceptible.all():
        handles.append(axis.scatter([], [], marker="s", color="tab:blue", alpha=0.5, label="per-token Jaccard"))
    if susceptible.any():
        handles.append(
            axis.scatter([], [], marker="s", color="tab:red", alpha=0.5, label="per-token Jaccard, susceptible layer")
        )
    handles.append(axis.scatter(positions, means, marker="o", color="black", zorder=3, s=14, label="mean"))
    if threshold is not None:
        handles.append(axis.axhline(threshold, color="tab:red", linestyle="--", label=f"threshold {threshold:g}"))
    axis.set(
        xticks=positions,
        xticklabels=[str(layer) for layer in result.layers],
        xlabel="decoder layer",
        ylabel="Jaccard similarity of Top-K experts",
        ylim=(-0.02, 1.02),
    )
    figure.suptitle(title or f"Routing stability under router-input noise (gamma = {gamma:g})")  # spans the legend
    axis.grid(axis="y", alpha=0.3)
    axis.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    return _save(figure, path)


def _scores(value: Tensor, name: str, which: str) -> np.ndarray:
    if not isinstance(value, Tensor) or value.dim() != 1 or value.numel() == 0:
        raise ConfigurationError(f"{which} scores of {name!r} must be a non-empty 1-D tensor.")
    return value.detach().double().cpu().numpy()


def plot_roc_curves(
    scores: Mapping[str, tuple[Tensor, Tensor]],
    path: str | Path,
    *,
    title: str = "OoD detection: ROC curves",
) -> Path:
    """ROC curves of telling OoD from in-distribution examples, one per score, AUROC in the legend.

    Args:
        scores: ``{score name: (in-distribution scores (n_in,), OoD scores (n_ood,))}``, higher
            meaning more OoD.
        path: the ``.png`` to write.
        title: the figure title.
    """
    path = _png_path(path)
    _non_empty(scores, "scores")
    curves = []
    for name, pair in scores.items():
        if not isinstance(pair, tuple | list) or len(pair) != 2:
            raise ConfigurationError(f"scores[{name!r}] must be a pair (in-distribution scores, OoD scores).")
        in_scores, ood_scores = _scores(pair[0], name, "in-distribution"), _scores(pair[1], name, "OoD")
        labels = np.r_[np.zeros(len(in_scores)), np.ones(len(ood_scores))]
        false_positive, true_positive, _ = roc_curve(labels, np.r_[in_scores, ood_scores])
        curves.append((name, false_positive, true_positive, ood_auroc(pair[0], pair[1])))

    width = 6.4
    figure = Figure(figsize=(width, 5.6 + 0.25 * len(curves)), layout="constrained")
    axis = figure.subplots()
    for number, (name, false_positive, true_positive, auroc) in enumerate(curves):
        axis.plot(
            false_positive, true_positive, color=_colour(number, len(curves)), label=f"{name} (AUROC {auroc:.3f})"
        )
    axis.plot([0, 1], [0, 1], linestyle="--", color="grey", label="chance (AUROC 0.5)")
    axis.set(
        xlim=(0, 1),
        ylim=(0, 1.01),
        aspect="equal",
        xlabel="false positive rate (in-distribution flagged as OoD)",
        ylabel="true positive rate (OoD detected)",
    )
    axis.set_title(_wrapped(title, width), fontsize="medium")
    axis.grid(alpha=0.3)
    figure.legend(loc="outside lower center", ncols=2 if len(curves) > 3 else 1, fontsize="small")  # off the curves
    return _save(figure, path)


def plot_efficiency_bars(
    figures: Mapping[str, Mapping[str, float]],
    path: str | Path,
    *,
    baseline: str | None = None,
    title: str = "Cost against the deterministic model",
) -> Path:
    """Bars of each method's cost figures, one panel per figure (latency, peak memory, FLOPs per
    token, ...), values written on the bars; ``baseline``'s value is drawn as a dashed line.

    Args:
        figures: ``{method: {figure name with unit: value}}``; every method has the same figures.
        path: the ``.png`` to write.
        baseline: the method to compare against (e.g. ``"deterministic"``).
        title: the figure title.
    """
    path = _png_path(path)
    _non_empty(figures, "figures")
    names = list(next(iter(figures.values())))
    if not names:
        raise ConfigurationError("figures must name at least one cost figure per method.")
    for method, values in figures.items():
        if not isinstance(values, Mapping) or list(values) != names:
            raise ConfigurationError(f"method {method!r} must give the figures {names} (in this order).")
        if not all(isinstance(v, int | float) and math.isfinite(v) for v in values.values()):
            raise ConfigurationError(f"the figures of {method!r} must be finite numbers.")
    if baseline is not None and baseline not in figures:
        raise ConfigurationError(f"baseline {baseline!r} is not among the methods {list(figures)}.")

    methods = list(figures)
    positions = np.arange(len(methods))
    colours = [_colour(i, len(methods)) for i in range(len(methods))]
    figure = Figure(figsize=(len(names) * max(4.0, 1.5 + 0.7 * len(methods)), 4.8), layout="constrained")
    axes = np.atleast_1d(figure.subplots(1, len(names)))
    for axis, name in zip(axes, names, strict=True):
        heights = [float(figures[method][name]) for method in methods]
        bars = axis.bar(positions, heights, color=colours)
        axis.bar_label(bars, labels=[f"{h:.0f}" if h >= 100 else f"{h:.3g}" for h in heights], fontsize="small")
        if baseline is not None:
            axis.axhline(figures[baseline][name], color="black", linestyle="--", linewidth=1)
        axis.set(xticks=positions, xlabel="method", ylabel=name, title=name)
        axis.set_ylim(top=1.12 * max(max(heights), 0.0) or None)  # room for the values above the bars
        axis.set_xticklabels(methods, rotation=30, ha="right")  # the methods are named under their bars
        axis.grid(axis="y", alpha=0.3)
    figure.suptitle(title if baseline is None else f"{title} (dashed line: {baseline})")
    return _save(figure, path)


MINOR_LABELS = 6
"""At most this many minor ticks are labelled on a log axis with fewer than three major ticks in view."""


def _minor_log_labels(axis: Any) -> FuncFormatter:
    """Plain-number labels of the minor ticks of ``axis``'s log y axis where its major ticks are too
    few to read values from (fewer than three in view, as over a narrow range), thinned to at most
    :data:`MINOR_LABELS`; none otherwise."""

    def label(value: float, _: int) -> str:
        low, high = axis.get_ylim()
        if sum(low <= tick <= high for tick in axis.get_yticks()) >= 3:
            return ""
        in_view = [tick for tick in axis.yaxis.get_minorticklocs() if low <= tick <= high]
        if not in_view:
            return ""
        index = int(np.argmin(np.abs(np.array(in_view) - value)))
        return f"{value:g}" if index % math.ceil(len(in_view) / MINOR_LABELS) == 0 else ""

    return FuncFormatter(label)


def plot_scale_trajectories(
    trajectories: Mapping[str, Mapping[int, float | Sequence[float]]],
    path: str | Path,
    *,
    title: str = "Learned prior scales during training",
) -> Path:
    """Learned prior scales against the training step, one colour per site: one line for a scale per
    layer, one thin line per expert for scales per expert (log scale on the y axis).

    Args:
        trajectories: ``{site label: {step: scale or [scale per expert]}}``, positive finite scales.
        path: the ``.png`` to write.
        title: the figure title.
    """
    path = _png_path(path)
    _non_empty(trajectories, "trajectories")
    series = {}
    for label, trajectory in trajectories.items():
        _non_empty(trajectory, f"the trajectory of {label!r}")
        steps = sorted(trajectory)
        try:
            values = np.array([np.atleast_1d(np.asarray(trajectory[step], dtype=float)) for step in steps])
        except (TypeError, ValueError):
            values = np.empty(0)
        if values.ndim != 2 or not np.isfinite(values).all() or (values <= 0).any():
            raise ConfigurationError(f"the scales of {label!r} must be positive finite numbers of one shape per step.")
        series[label] = (np.array(steps), values)
    figure = Figure(figsize=(7.5, 4.8 + 0.2 * len(series)), layout="constrained")
    axis = figure.subplots()
    for number, (label, (steps, values)) in enumerate(series.items()):
        colour = _colour(number, len(series))
        width = 1.8 if values.shape[1] == 1 else 0.8
        for column in range(values.shape[1]):
            axis.plot(steps, values[:, column], color=colour, linewidth=width, label=label if column == 0 else None)
    axis.set_yscale("log")
    axis.yaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))  # plain numbers on the log axis
    axis.yaxis.set_minor_formatter(_minor_log_labels(axis))
    axis.set(xlabel="training step", ylabel="prior scale (log scale)")
    axis.set_title(_wrapped(title, 7.5), fontsize="medium")
    axis.grid(alpha=0.3, which="both")
    figure.legend(loc="outside lower center", ncols=2 if len(series) > 3 else 1, fontsize="small")  # off the lines
    return _save(figure, path)
