"""Calibration experiment: ACC, NLL, ECE, MCE and Brier on the test split for the deterministic
model, temperature scaling and every Bayesian family, under both predictive modes.

The deterministic model is the model with every router at its prior mean; temperature scaling
divides its answer logits by one temperature fitted on the calibration split
(:mod:`pyro_moe.evaluation.temperature_scaling`). Both are independent of the predictive mode and appear in
the table of each mode beside the families. Figures come from :func:`pyro_moe.evaluation.metrics.calibration_report`
(equal-width bins); one reliability diagram per mode (small multiples: a panel per method).

Every other row carries, for accuracy, NLL, ECE and Brier, its difference from a named baseline
(``settings.baseline``, temperature scaling by default) on the same test questions and the paired
bootstrap 95% interval of that difference (:func:`pyro_moe.evaluation.bootstrap.compare_calibration`;
ECE recomputed on every resample); the tables show ``0.526 (-0.016 [-0.024, -0.009])`` and the
report's verdict lines say "beats", "ties" or "loses" from the intervals. The per-question
probabilities stay in the results (:attr:`CalibrationResults.probs`) for further comparisons
(:meth:`CalibrationResults.compare`).

Example::

    results = calibration_experiment(model, tokenizer, benchmark.splits, {"mfvr": fitted_mfvr})
    results.rows                      # one dict per method and mode
    results.comparisons["mfvr", "model-average"]["nll"].verdict      # against temperature scaling
    write_results(results, "runs/calibration")

    settings = CalibrationSettings(num_samples=8, test_examples=300)
    results = run_calibration(model, tokenizer, benchmark.splits, ["mean-field", "mfvr"], settings=settings,
                              fitting=FitSettings(steps=200))

    python -m pyro_moe.experiments.calibration --out runs/calibration   # the embedded benchmark, 5,000 test questions
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import Tensor, nn

from pyro_moe.data import MCQAExample
from pyro_moe.errors import ConfigurationError
from pyro_moe.evaluation.bootstrap import BootstrapSettings, PairedComparison, compare_calibration
from pyro_moe.evaluation.metrics import DEFAULT_BINS, ReliabilityDiagram, calibration_report, reliability_diagram_data
from pyro_moe.evaluation.plots import plot_reliability_diagram
from pyro_moe.experiments.evaluation import (
    DEFAULT_FAMILIES,
    DETERMINISTIC,
    TEMPERATURE_SCALING,
    FitSettings,
    MCQAPredictionSettings,
    Posterior,
    check_count,
    check_posteriors,
    check_splits,
    default_answer_token_ids,
    deterministic_logits,
    fit_named_families,
    fit_temperature_scaling,
    interval_cells,
    interval_note,
    markdown_table,
    posterior_modes,
    predict_batches,
    slug,
    split_batches,
    split_labels,
    verdict_line,
)
from pyro_moe.experiments.runner import experiment_command
from pyro_moe.inference.presets import FamilySpec
from pyro_moe.validation import check_integer

__all__ = [
    "DEFAULT_TEST_SIZE",
    "CalibrationResults",
    "CalibrationSettings",
    "calibration_experiment",
    "main",
    "run_calibration",
]

COLUMNS = ("method", "mode", "accuracy", "nll", "ece", "mce", "brier", "confidence", "count")
COMPARED = ("accuracy", "nll", "ece", "brier")
"""The metrics compared with the baseline (paired bootstrap intervals)."""
BASELINE_MODE = "any"
"""The mode column of the deterministic model and temperature scaling (they draw no samples)."""
DEFAULT_TEST_SIZE = 5000
"""The command line's ``--test-size`` default: the benchmark's test split enlarged to 5,000 questions (1,000
cannot resolve NLL differences of a few thousandths); ``--test-size 1000`` measures the split as shipped."""


@dataclass(frozen=True, kw_only=True)
class CalibrationSettings(MCQAPredictionSettings):
    """What :func:`calibration_experiment` measures, besides the prediction settings it inherits
    (``num_samples``, ``modes``, ``batch_size``, ``seed``, ``draws``); checked when built.

    Attributes:
        test_split: where the figures are measured.
        calibration_split: where temperature scaling is fitted.
        test_examples: measure on the first this many test questions (``None``: all).
        n_bins: equal-width bins of ECE, MCE and the reliability diagrams.
        baseline: the method every other row is compared with, :data:`TEMPERATURE_SCALING` or
            :data:`DETERMINISTIC`.
        bootstrap: resamples, level and seed of the paired bootstrap intervals.
    """

    test_split: str = "test"
    calibration_split: str = "calibration"
    test_examples: int | None = None
    n_bins: int = DEFAULT_BINS
    baseline: str = TEMPERATURE_SCALING
    bootstrap: BootstrapSettings = field(default_factory=BootstrapSettings)

    def __post_init__(self) -> None:
        super().__post_init__()
        check_count("test_examples", self.test_examples)
        check_integer("n_bins", self.n_bins)
        if self.baseline not in (TEMPERATURE_SCALING, DETERMINISTIC):
            raise ConfigurationError(
                f"unknown baseline {self.baseline!r}; accepted: {[TEMPERATURE_SCALING, DETERMINISTIC]}."
            )
        if not isinstance(self.bootstrap, BootstrapSettings):
            raise ConfigurationError(f"bootstrap must be BootstrapSettings, got {type(self.bootstrap).__name__}.")


@dataclass
class CalibrationResults:
    """What :func:`calibration_experiment` returns.

    Attributes:
        rows: one per method and mode (``COLUMNS``); the deterministic model and temperature
            scaling once each, with mode ``"any"``.
        diagrams: ``{mode: {method: ReliabilityDiagram}}``, baselines included in every mode.
        temperature: the fitted temperature.
        test_split, calibration_split: the split names.
        num_samples: S per prediction.
        n_bins: bins of ECE and MCE.
        probs: ``{(method, mode): (examples, choices)}`` the test probabilities of every row.
        labels: ``(examples,)`` the test labels.
        baseline: the method the other rows are compared with.
        comparisons: ``{(method, mode): {metric: PairedComparison}}`` of every row but the
            baseline's, against the baseline (metrics :data:`COMPARED`).
        bootstrap: the settings of the intervals.
    """

    rows: list[dict[str, Any]]
    diagrams: dict[str, dict[str, ReliabilityDiagram]]
    temperature: float
    test_split: str
    calibration_split: str
    num_samples: int
    n_bins: int
    probs: dict[tuple[str, str], Tensor]
    labels: Tensor
    baseline: str
    comparisons: dict[tuple[str, str], dict[str, PairedComparison]]
    bootstrap: BootstrapSettings

    def compare(self, method: str, mode: str, against: tuple[str, str]) -> dict[str, PairedComparison]:
        """``{metric: PairedComparison}`` of the row ``(method, mode)`` against the row ``against``
        (``(method, mode)``, e.g. a recipe against its own starting prior), on the same resamples as
        :attr:`comparisons`."""
        for key in ((method, mode), against):
            if key not in self.probs:
                raise ConfigurationError(f"no row {key!r}; the rows are {sorted(self.probs)}.")
        return compare_calibration(
            self.probs[method, mode],
            self.probs[against],
            self.labels,
            baseline=f"{against[0]} ({against[1]})" if against[1] != BASELINE_MODE else against[0],
            metrics=COMPARED,
            n_bins=self.n_bins,
            settings=self.bootstrap,
        )

    def row(self, method: str, mode: str = BASELINE_MODE) -> dict[str, Any]:
        """The row of ``method`` in ``mode``."""
        for row in self.rows:
            if row["method"] == method and row["mode"] == mode:
                return row
        raise KeyError((method, mode))

    def mode_rows(self, mode: str) -> list[dict[str, Any]]:
        """The baselines' rows and the families' rows in ``mode``."""
        return [row for row in self.rows if row["mode"] in (BASELINE_MODE, mode)]

    def to_json(self) -> dict[str, Any]:
        """Settings and rows."""
        return {
            "experiment": "calibration",
            "test_split": self.test_split,
            "calibration_split": self.calibration_split,
            "temperature": self.temperature,
            "num_samples": self.num_samples,
            "n_bins": self.n_bins,
            "rows": self.rows,
            "baseline": self.baseline,
            "bootstrap": {
                "resamples": self.bootstrap.resamples,
                "level": self.bootstrap.level,
                "seed": self.bootstrap.seed,
            },
            "comparisons": [
                {"method": method, "mode": mode, **comparison.to_json()}
                for (method, mode), found in self.comparisons.items()
                for comparison in found.values()
            ],
        }

    def verdicts(self, mode: str) -> list[str]:
        """One verdict line per compared row of ``mode`` (and the other baseline), from the intervals."""
        return [
            verdict_line(method if row_mode == BASELINE_MODE else f"{method} ({row_mode})", found)
            for (method, row_mode), found in self.comparisons.items()
            if row_mode in (BASELINE_MODE, mode)
        ]

    def to_markdown(self) -> str:
        """One table per predictive mode, each with the deterministic model and temperature scaling."""
        lines = [
            "# Calibration",
            "",
            f"Split `{self.test_split}`; temperature scaling fitted on `{self.calibration_split}` "
            f"(T = {self.temperature:.3f}); S = {self.num_samples} samples; ECE and MCE with {self.n_bins} "
            "equal-width bins; NLL in nats; confidence is the mean top-label probability. "
            + interval_note(self.baseline, self.bootstrap, f"{self.labels.shape[0]} {self.test_split} questions"),
            "",
        ]
        for mode in self.diagrams:
            rows = [
                interval_cells(row, self.comparisons.get((row["method"], row["mode"]))) for row in self.mode_rows(mode)
            ]
            lines += [f"## {mode}", "", markdown_table(rows, COLUMNS)]
            lines += [f"- {line}" for line in self.verdicts(mode)] + [""]
            lines += [f"![reliability diagram, {mode}](reliability_{slug(mode)}.png)", ""]
        return "\n".join(lines)

    def plot(self, folder: str | Path) -> list[Path]:
        """``reliability_<mode>.png`` per mode: one panel per method with its per-bin counts, the
        deterministic model and temperature scaling drawn faintly in each."""
        return [
            plot_reliability_diagram(
                diagrams,
                Path(folder) / f"reliability_{slug(mode)}.png",
                title=f"Reliability diagram, {self.test_split} split, {mode}",
                references=[name for name in (DETERMINISTIC, TEMPERATURE_SCALING) if name in diagrams],
            )
            for mode, diagrams in self.diagrams.items()
        ]


def calibration_experiment(
    model: nn.Module,
    tokenizer: Any,
    splits: Mapping[str, Sequence[MCQAExample]],
    posteriors: Mapping[str, Posterior],
    settings: CalibrationSettings = CalibrationSettings(),
    *,
    answer_token_ids: Tensor | None = None,
) -> CalibrationResults:
    """Calibration of the deterministic model, temperature scaling and ``posteriors``; see the module docstring.

    Args:
        model: the (unpatched, or patched at its prior mean) model the posteriors were fitted on.
        tokenizer: its tokenizer (left padding, a pad token).
        splits: ``{split name: questions}``.
        posteriors: ``{name: fitted posterior}`` (e.g. from :func:`run_calibration`'s fitting).
        settings: the splits, sizes, samples, modes and bins.
        answer_token_ids: ``(choices,)`` ids of the answer letters; default the tokenizer's ``A, B, ...``.

    Raises:
        ConfigurationError: an unknown or empty split, a posterior without ``predict``; before
            any prediction.
    """
    test_split, calibration_split = settings.test_split, settings.calibration_split
    num_samples, batch_size, n_bins = settings.num_samples, settings.batch_size, settings.n_bins
    check_splits(splits, [test_split, calibration_split])
    posteriors = check_posteriors(posteriors)
    test = list(splits[test_split][: settings.test_examples])
    if answer_token_ids is None:
        answer_token_ids = default_answer_token_ids(tokenizer, test)
    test_batches = split_batches(test, tokenizer, batch_size)
    labels = split_labels(test)

    scaling = fit_temperature_scaling(model, tokenizer, splits[calibration_split], answer_token_ids, batch_size)
    test_logits = deterministic_logits(model, test_batches, answer_token_ids)
    baselines = {DETERMINISTIC: test_logits.softmax(-1), TEMPERATURE_SCALING: scaling.probs(test_logits)}

    rows = [
        {"method": name, "mode": BASELINE_MODE, **calibration_report(probs, labels, n_bins)}
        for name, probs in baselines.items()
    ]
    every_probs = {(name, BASELINE_MODE): probs for name, probs in baselines.items()}
    baseline_diagrams = {name: reliability_diagram_data(probs, labels, n_bins) for name, probs in baselines.items()}
    diagrams = {mode: dict(baseline_diagrams) for mode in settings.modes}
    for name, posterior in posteriors.items():
        for mode in posterior_modes(posterior, settings.modes):
            probs = predict_batches(
                posterior, test_batches, mode, num_samples, seed=settings.seed, draws=settings.draws
            ).probs
            rows.append({"method": name, "mode": mode, **calibration_report(probs, labels, n_bins)})
            diagrams[mode][name] = reliability_diagram_data(probs, labels, n_bins)
            every_probs[name, mode] = probs
    reference = every_probs[settings.baseline, BASELINE_MODE]
    comparisons = {
        key: compare_calibration(
            probs,
            reference,
            labels,
            baseline=settings.baseline,
            metrics=COMPARED,
            n_bins=n_bins,
            settings=settings.bootstrap,
        )
        for key, probs in every_probs.items()
        if key != (settings.baseline, BASELINE_MODE)
    }
    return CalibrationResults(
        rows=rows,
        diagrams=diagrams,
        temperature=scaling.temperature,
        test_split=test_split,
        calibration_split=calibration_split,
        num_samples=num_samples,
        n_bins=n_bins,
        probs=every_probs,
        labels=labels,
        baseline=settings.baseline,
        comparisons=comparisons,
        bootstrap=settings.bootstrap,
    )


def run_calibration(
    model: nn.Module,
    tokenizer: Any,
    splits: Mapping[str, Sequence[MCQAExample]],
    families: Sequence[str | FamilySpec] = DEFAULT_FAMILIES,
    *,
    settings: CalibrationSettings = CalibrationSettings(),
    fitting: FitSettings = FitSettings(),
    answer_token_ids: Tensor | None = None,
) -> CalibrationResults:
    """Fit ``families`` by name as ``fitting`` says
    (:func:`pyro_moe.experiments.evaluation.fit_named_families`), each on a copy of ``model``, then
    run :func:`calibration_experiment` with ``settings``.

    Everything is checked before anything is fitted: the numbers when the settings were built, the
    families against the guide registry, SWAG's schedule, the splits."""
    check_splits(splits, [settings.test_split, settings.calibration_split])
    if answer_token_ids is None:
        answer_token_ids = default_answer_token_ids(tokenizer, splits[settings.test_split])
    posteriors = fit_named_families(model, tokenizer, splits, families, fitting, answer_token_ids=answer_token_ids)
    return calibration_experiment(model, tokenizer, splits, posteriors, settings, answer_token_ids=answer_token_ids)


@experiment_command(
    "python -m pyro_moe.experiments.calibration",
    CalibrationSettings,
    option_names={"num_samples": "samples", "n_bins": "bins"},
    benchmark_sizes=True,
    test_size=DEFAULT_TEST_SIZE,
)
def main(parser: argparse.ArgumentParser) -> Callable[..., CalibrationResults]:
    """Calibration (ACC, NLL, ECE, MCE, Brier) of the deterministic model, temperature scaling and Bayesian guide
    families under both predictive modes, on the embedded benchmark."""
    parser.add_argument("--test-examples", type=int, default=None, help="test questions to use (default all)")
    parser.add_argument("--bins", type=int, default=DEFAULT_BINS, help=f"ECE bins (default {DEFAULT_BINS})")
    return run_calibration


if __name__ == "__main__":
    main()
