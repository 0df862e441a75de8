"""Every plot writes a non-empty PNG that matplotlib reads back; bad input raises before drawing."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from matplotlib.image import imread

from pyro_moe.errors import ConfigurationError
from pyro_moe.evaluation import metrics, plots
from pyro_moe.evaluation.stability import DEFAULT_GAMMA, RoutingStability
from tests.plot_checks import capture_figures, clipped_texts, legends_over_axes


def _assert_png(path: Path) -> None:
    assert path.suffix == ".png" and path.stat().st_size > 1000
    image = imread(path)
    assert image.ndim == 3 and image.shape[0] > 200 and image.shape[1] > 200
    assert np.ptp(image[..., :3]) > 0.5  # something is drawn, not a blank canvas


def _stability(layers: int = 4, tokens: int = 30) -> RoutingStability:
    values = torch.rand(layers, 2, tokens, generator=torch.Generator().manual_seed(0))
    values[:, 0] = 1.0
    return RoutingStability(
        tuple(range(layers)), tuple(f"model.layers.{i}.mlp.gate" for i in range(layers)), (0.0, DEFAULT_GAMMA), values
    )


def _diagrams(methods: int, n_bins: int = 10) -> dict[str, metrics.ReliabilityDiagram]:
    generator = torch.Generator().manual_seed(1)
    logits = 3 * torch.randn(200, 4, generator=generator)
    labels = torch.randint(0, 4, (200,), generator=generator)
    return {
        f"method {i}": metrics.reliability_diagram_data((logits / (1 + i)).softmax(-1), labels, n_bins)
        for i in range(methods)
    }


def test_reliability_diagram(tmp_path: Path) -> None:
    diagrams = _diagrams(2)
    path = plots.plot_reliability_diagram(diagrams, tmp_path / "nested" / "reliability.png")
    assert path == tmp_path / "nested" / "reliability.png"
    _assert_png(path)
    _assert_png(plots.plot_reliability_diagram(diagrams["method 0"], tmp_path / "one.png"))


@pytest.mark.parametrize("methods", [1, 3, 6])  # one panel, one row, two rows (the second partial)
def test_reliability_diagram_is_small_multiples_with_references_and_counts(methods, tmp_path, monkeypatch):
    figures = capture_figures(monkeypatch)
    diagrams = _diagrams(methods)
    references = list(diagrams)[:2]
    plots.plot_reliability_diagram(diagrams, tmp_path / "r.png", references=references)
    (figure,) = figures
    panels = [axis for axis in figure.axes if axis.get_ylabel() == "accuracy" or axis.lines]
    strips = [axis for axis in figure.axes if axis not in panels]
    assert len(panels) == len(strips) == methods  # one panel and one count strip per method
    for axis in panels[1:]:  # shared axes
        assert axis.get_shared_x_axes().joined(panels[0], axis) and axis.get_shared_y_axes().joined(panels[0], axis)
    for axis in strips[1:]:
        assert axis.get_shared_y_axes().joined(strips[0], axis)
    for (name, diagram), panel, strip in zip(diagrams.items(), panels, strips, strict=True):
        assert name in panel.get_title() and f"ECE {diagram.expected_calibration_error:.3f}" in panel.get_title()
        filled = diagram.count > 0
        own = [line for line in panel.lines if line.get_label() == "the panel's method"]
        (line,) = own
        np.testing.assert_allclose(line.get_xdata(), diagram.confidence[filled].double().numpy())
        np.testing.assert_allclose(line.get_ydata(), diagram.accuracy[filled].double().numpy())
        faint = {line.get_label(): line for line in panel.lines if line.get_label().endswith("(reference)")}
        assert set(faint) == {f"{r} (reference)" for r in references if r != name}
        assert all(line.get_alpha() < 1 for line in faint.values())
        bars = strip.patches
        assert [bar.get_height() for bar in bars] == diagram.count.tolist()  # the counts are drawn
        written = [text.get_text() for text in strip.texts]
        assert written == [str(c) if c else "" for c in diagram.count.tolist()]  # and written on the bars
    assert not legends_over_axes(figure) and len(figure.legends) == 1
    assert not clipped_texts(figure)
    labels = [text.get_text() for text in figure.legends[0].get_texts()]
    assert labels[0] == "the panel's method" and "examples per bin" in labels
    drawn = [f"{r} (reference)" for r in references] if methods > 1 else []  # a lone panel has no other method
    assert [label for label in labels if label.endswith("(reference)")] == drawn


def test_stability_violins(tmp_path: Path) -> None:
    result = _stability()
    _assert_png(plots.plot_stability_violins(result, tmp_path / "violins.png", threshold=0.5))
    _assert_png(plots.plot_stability_violins(result, tmp_path / "constant.png", gamma=0.0))  # all ones
    _assert_png(plots.plot_stability_violins(_stability(tokens=1), tmp_path / "single.png"))


def test_roc_curves(tmp_path: Path) -> None:
    generator = torch.Generator().manual_seed(2)
    in_scores, ood_scores = torch.randn(100, generator=generator), torch.randn(60, generator=generator) + 1
    scores = {"mutual information": (in_scores, ood_scores), "max probability": (in_scores, -ood_scores)}
    _assert_png(plots.plot_roc_curves(scores, tmp_path / "roc.png"))


def test_efficiency_bars(tmp_path: Path) -> None:
    figures = {
        "deterministic": {"latency (ms)": 10.0, "peak memory (MB)": 300.0},
        "model-average S=16": {"latency (ms)": 120.0, "peak memory (MB)": 800.0},
    }
    _assert_png(plots.plot_efficiency_bars(figures, tmp_path / "efficiency.png", baseline="deterministic"))
    _assert_png(plots.plot_efficiency_bars({"a": {"FLOPs": 1.0}}, tmp_path / "single.png"))


def test_bad_input_raises(tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError, match=r"must end in \.png"):
        plots.plot_roc_curves({"s": (torch.zeros(2), torch.ones(2))}, tmp_path / "roc.pdf")
    with pytest.raises(ConfigurationError, match="non-empty mapping"):
        plots.plot_roc_curves({}, tmp_path / "roc.png")
    with pytest.raises(ConfigurationError, match="OoD scores of 's' must be a non-empty 1-D tensor"):
        plots.plot_roc_curves({"s": (torch.zeros(2), torch.ones(2, 1))}, tmp_path / "roc.png")
    with pytest.raises(ConfigurationError, match=r"gamma 0.01 was not measured"):
        plots.plot_stability_violins(_stability(), tmp_path / "v.png", gamma=0.01)
    with pytest.raises(ConfigurationError, match=r"threshold must be a Jaccard similarity"):
        plots.plot_stability_violins(_stability(), tmp_path / "v.png", threshold=2.0)
    with pytest.raises(ConfigurationError, match=r"'b' must give the figures \['latency'\]"):
        plots.plot_efficiency_bars({"a": {"latency": 1.0}, "b": {"memory": 2.0}}, tmp_path / "e.png")
    with pytest.raises(ConfigurationError, match="baseline 'c' is not among"):
        plots.plot_efficiency_bars({"a": {"latency": 1.0}}, tmp_path / "e.png", baseline="c")
    with pytest.raises(ConfigurationError, match="must be finite numbers"):
        plots.plot_efficiency_bars({"a": {"latency": float("nan")}}, tmp_path / "e.png")
    diagram = metrics.reliability_diagram_data(torch.tensor([[0.7, 0.3]]), torch.tensor([0]), n_bins=5)
    other = metrics.reliability_diagram_data(torch.tensor([[0.7, 0.3]]), torch.tensor([0]), n_bins=10)
    with pytest.raises(ConfigurationError, match="with 5 bins"):
        plots.plot_reliability_diagram({"a": diagram, "b": other}, tmp_path / "r.png")
    with pytest.raises(ConfigurationError, match=r"references must be a sequence of methods among \['a'\]"):
        plots.plot_reliability_diagram({"a": diagram}, tmp_path / "r.png", references=["deterministic"])
    assert not list(tmp_path.iterdir())  # nothing was written


def test_scale_trajectories(tmp_path: Path) -> None:
    trajectories = {
        "layer 0": {0: 1.0, 10: 1.1, 20: 1.15},
        "layer 2 (per expert)": {0: [1.0, 1.0, 1.0], 10: [0.9, 1.2, 1.05], 20: [0.85, 1.3, 1.1]},
    }
    _assert_png(plots.plot_scale_trajectories(trajectories, tmp_path / "scales.png"))
    with pytest.raises(ConfigurationError, match="positive finite"):
        plots.plot_scale_trajectories({"layer 0": {0: 1.0, 10: -1.0}}, tmp_path / "bad.png")
    with pytest.raises(ConfigurationError, match="one shape per step"):
        plots.plot_scale_trajectories({"layer 0": {0: 1.0, 10: [1.0, 2.0]}}, tmp_path / "bad.png")
    with pytest.raises(ConfigurationError, match="non-empty mapping"):
        plots.plot_scale_trajectories({}, tmp_path / "bad.png")
    with pytest.raises(ConfigurationError, match=r"must end in \.png"):
        plots.plot_scale_trajectories(trajectories, tmp_path / "scales.pdf")
    assert not (tmp_path / "bad.png").exists()


def test_legends_sit_off_the_data_and_no_text_is_clipped(tmp_path, monkeypatch):
    """Every plot of this module on inputs with many series and long names: its legends overlap no
    axes and every title, label and tick label lies on the canvas."""
    figures = capture_figures(monkeypatch)
    generator = torch.Generator().manual_seed(3)
    scores = {
        name: (torch.randn(80, generator=generator), torch.randn(50, generator=generator) + 0.1)
        for name in ("max probability", "predictive entropy", "mutual information", "router-logit variance")
    }
    long_title = "OoD detection: ROC curves, test vs far_ood: mfvr-iwae-layer, model-average, a long method name"
    plots.plot_roc_curves(scores, tmp_path / "roc.png", title=long_title)
    steps = range(0, 101, 20)
    trajectories = {f"model.layers.{layer}.mlp.gate.logits": {s: 1.0 + s / 400 for s in steps} for layer in range(5)}
    trajectories["per expert"] = {s: [1.0 + s / 100, 1.0 / (1 + s / 100)] for s in steps}
    plots.plot_scale_trajectories(trajectories, tmp_path / "scales.png", title=long_title)
    plots.plot_stability_violins(_stability(layers=24), tmp_path / "violins.png", threshold=0.5)
    methods = [f"family {i}, routing-average" for i in range(8)]
    figures_per_method = {
        m: {"latency (ms per batch)": 10.0 + i, "peak memory (MiB)": 300.0} for i, m in enumerate(methods)
    }
    plots.plot_efficiency_bars(figures_per_method, tmp_path / "efficiency.png", baseline=methods[0], title=long_title)
    assert len(figures) == 4  # the reliability diagram: its own test
    for figure in figures:
        title = figure.get_suptitle() or figure.axes[0].get_title()
        assert not legends_over_axes(figure), title
        assert not clipped_texts(figure), title
    roc, scales = figures[0], figures[1]
    assert roc.legends and len(roc.legends[0].get_texts()) == len(scores) + 1  # every score and chance
    assert scales.legends and len(scales.legends[0].get_texts()) == len(trajectories)
    assert "\n" in roc.axes[0].get_title()  # the long title wrapped, not cut at the edge
    low, high = scales.axes[0].get_ylim()
    ticks = scales.axes[0].yaxis.get_minor_ticks()
    minor = [tick.label1.get_text() for tick in ticks if low <= tick.get_loc() <= high and tick.label1.get_text()]
    assert 0 < len(minor) <= plots.MINOR_LABELS  # over less than a decade, a few minor ticks carry values
