"""OoD experiment: how well uncertainty scores tell in-distribution questions from near- and far-OoD ones.

Scores (higher means more out-of-distribution), per method and predictive mode:

* ``max probability``: ``1 - max_c p(c)``;
* ``predictive entropy`` of the answer distribution;
* ``mutual information`` of the answer and the sampled model (``model-average`` only: the
  ``routing-average`` rule returns a single answer distribution);
* ``router-logit variance``: the variance of the sampled router logits (families with sampled
  logits, S >= 2).

The deterministic model and temperature scaling (fitted on the calibration split) have the first
two. AUROC and AUPRC (OoD the positive class) come from :func:`pyro_moe.evaluation.metrics.ood_auroc` and
:func:`pyro_moe.evaluation.metrics.ood_auprc` (scikit-learn); one ROC figure per OoD split and method.

Every AUROC but the baseline's carries its difference from the AUROC of a named baseline score
(``settings.baseline`` with ``settings.baseline_score``: temperature scaling's predictive entropy by
default) on the same in-distribution and OoD questions, with the paired bootstrap 95% interval of
that difference (:func:`pyro_moe.evaluation.bootstrap.compare_auroc`: both groups resampled, the
AUROC recomputed on every resample); the tables show ``0.892 (+0.284 [+0.250, +0.318])`` and the
report's verdict lines say "beats", "ties" or "loses" from the intervals.

Example::

    results = ood_experiment(model, tokenizer, benchmark.splits, {"mfvr": fitted_mfvr})
    results.auroc("mfvr", "model-average", "far_ood", "mutual information")
    results.comparisons["far_ood", "mfvr", "model-average", "mutual information"].verdict
    write_results(results, "runs/ood")

    results = run_ood(model, tokenizer, benchmark.splits, ["mfvr"], settings=OoDSettings(ood_splits=["far_ood"]))

    python -m pyro_moe.experiments.ood --out runs/ood      # on the embedded benchmark
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from torch import Tensor, nn

from pyro_moe.data import MCQAExample
from pyro_moe.errors import ConfigurationError
from pyro_moe.evaluation.bootstrap import (
    BootstrapSettings,
    PairedComparison,
    auroc_statistic,
    bootstrap_interval,
    compare_auroc,
)
from pyro_moe.evaluation.metrics import ood_auprc, ood_auroc, predictive_entropy
from pyro_moe.evaluation.plots import plot_roc_curves
from pyro_moe.experiments.evaluation import (
    DEFAULT_FAMILIES,
    DETERMINISTIC,
    TEMPERATURE_SCALING,
    FitSettings,
    MCQAPredictionSettings,
    Posterior,
    Predictions,
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
    verdict_line,
)
from pyro_moe.experiments.runner import experiment_command
from pyro_moe.inference.presets import FamilySpec

__all__ = [
    "SCORES",
    "OoDResults",
    "OoDSettings",
    "RocResults",
    "auroc_rows",
    "comparisons_json",
    "main",
    "ood_experiment",
    "run_ood",
    "uncertainty_scores",
]

SCORES = ("max probability", "predictive entropy", "mutual information", "router-logit variance")
"""The uncertainty scores, in table order."""

COLUMNS = ("ood_split", "method", "mode", "score", "auroc", "auprc", "in_examples", "ood_examples")
BASELINE_MODE = "any"


def uncertainty_scores(predictions: Predictions) -> dict[str, Tensor]:
    """The scores ``{name: (examples,)}`` a prediction has (see :data:`SCORES`), higher = more OoD."""
    scores = {
        "max probability": 1.0 - predictions.probs.max(-1).values,
        "predictive entropy": predictive_entropy(predictions.probs),
    }
    if predictions.mutual_information is not None:
        scores["mutual information"] = predictions.mutual_information
    if predictions.router_logit_variance is not None:
        scores["router-logit variance"] = predictions.router_logit_variance
    return scores


@dataclass(frozen=True, kw_only=True)
class OoDSettings(MCQAPredictionSettings):
    """Which splits :func:`ood_experiment` tells apart, besides the prediction settings it inherits
    (``num_samples``, ``modes``, ``batch_size``, ``seed``, ``draws``); checked when built.

    Attributes:
        in_split: the in-distribution split.
        ood_splits: the OoD splits (at least one, not ``in_split``), a tuple once built.
        calibration_split: where temperature scaling is fitted.
        examples: use the first this many questions of each in-distribution and OoD split
            (``None``: all).
        baseline: the method whose score every AUROC is compared with, :data:`TEMPERATURE_SCALING`
            or :data:`DETERMINISTIC`.
        baseline_score: that method's score (``"predictive entropy"`` or ``"max probability"``).
        bootstrap: resamples, level and seed of the paired bootstrap intervals.
    """

    in_split: str = "test"
    ood_splits: Sequence[str] = ("near_ood", "far_ood")
    calibration_split: str = "calibration"
    examples: int | None = None
    baseline: str = TEMPERATURE_SCALING
    baseline_score: str = "predictive entropy"
    bootstrap: BootstrapSettings = field(default_factory=BootstrapSettings)

    def __post_init__(self) -> None:
        super().__post_init__()
        ood_splits = (self.ood_splits,) if isinstance(self.ood_splits, str) else tuple(self.ood_splits)
        if not ood_splits or self.in_split in ood_splits:
            raise ConfigurationError(
                f"give at least one OoD split other than the in-distribution split {self.in_split!r}, "
                f"got {list(ood_splits)}."
            )
        object.__setattr__(self, "ood_splits", ood_splits)
        check_count("examples", self.examples)
        if self.baseline not in (TEMPERATURE_SCALING, DETERMINISTIC):
            raise ConfigurationError(
                f"unknown baseline {self.baseline!r}; accepted: {[TEMPERATURE_SCALING, DETERMINISTIC]}."
            )
        if self.baseline_score not in SCORES[:2]:
            raise ConfigurationError(
                f"unknown baseline score {self.baseline_score!r}; the baselines have {list(SCORES[:2])}."
            )
        if not isinstance(self.bootstrap, BootstrapSettings):
            raise ConfigurationError(f"bootstrap must be BootstrapSettings, got {type(self.bootstrap).__name__}.")


def comparisons_json(
    comparisons: Mapping[tuple[str, str, str, str], PairedComparison], bootstrap: BootstrapSettings
) -> dict[str, Any]:
    """``bootstrap`` (how the intervals resampled) and ``comparisons`` (every row's paired AUROC interval against
    the baseline, keyed ``(ood split, method, mode, score)``) for the OoD experiments' ``to_json``."""
    return {
        "bootstrap": {"resamples": bootstrap.resamples, "level": bootstrap.level, "seed": bootstrap.seed},
        "comparisons": [
            {"ood_split": split, "method": method, "mode": mode, "score": score, **comparison.to_json()}
            for (split, method, mode, score), comparison in comparisons.items()
        ],
    }


def auroc_rows(
    scores: Mapping[str, Mapping[tuple[str, str], Mapping[str, Tensor]]],
    in_split: str,
    ood_splits: Sequence[str],
    score_names: Sequence[str],
    baseline: tuple[str, str, str],
    bootstrap: BootstrapSettings,
    *,
    intervals: bool = False,
) -> tuple[list[dict[str, Any]], dict[tuple[str, str, str, str], PairedComparison]]:
    """The OoD experiments' AUROC rows and paired comparisons from per-question scores.

    Args:
        scores: ``{split: {(method, mode): {score: (examples,)}}}`` of ``in_split`` and every OoD split.
        score_names: the scores, in row order (a method lacking one has no row for it).
        baseline: ``(method, mode, score)`` every other row's AUROC is compared with, on the same questions.
        intervals: also each AUROC's own bootstrap interval (``auroc_low``, ``auroc_high``).

    Returns:
        One row per OoD split, method, mode and score (AUROC, AUPRC, example counts), and
        ``{(ood split, method, mode, score): PairedComparison}`` of every row but the baseline's.
    """
    rows, comparisons = [], {}
    label = f"{baseline[0]}, {baseline[2]}"
    for split in ood_splits:
        reference = tuple(scores[part][baseline[:2]][baseline[2]] for part in (in_split, split))
        for (method, mode), ood_scores in scores[split].items():
            in_scores = scores[in_split][method, mode]
            for score in score_names:
                if score not in ood_scores:
                    continue
                pair = (in_scores[score], ood_scores[score])
                row = {"ood_split": split, "method": method, "mode": mode, "score": score, "auroc": ood_auroc(*pair)}
                if intervals:
                    _, row["auroc_low"], row["auroc_high"] = bootstrap_interval(
                        auroc_statistic(*pair), [len(pair[0]), len(pair[1])], settings=bootstrap
                    )
                rows.append(
                    {**row, "auprc": ood_auprc(*pair), "in_examples": len(pair[0]), "ood_examples": len(pair[1])}
                )
                if (method, mode, score) != baseline:
                    comparisons[split, method, mode, score] = compare_auroc(
                        pair, reference, baseline=label, settings=bootstrap
                    )
    return rows, comparisons


@dataclass
class RocResults:
    """Rows of AUROC figures and the scores behind their ROC curves; shared by the OoD experiments
    (:class:`OoDResults`, :class:`~pyro_moe.experiments.generation.GenerationResults`).

    Attributes:
        rows: one per OoD split, method, mode and score (``COLUMNS``).
        scores: ``{split: {(method, mode): {score: (examples,)}}}`` of the in-distribution split and
            every OoD split (for the ROC curves; not written to JSON).
        in_split: the in-distribution split.
    """

    rows: list[dict[str, Any]]
    scores: dict[str, dict[tuple[str, str], dict[str, Tensor]]]
    in_split: str

    roc_prefix: ClassVar[str] = "roc"
    """How the ROC plots' file names begin."""
    roc_title: ClassVar[str] = "OoD detection"
    """How the ROC plots' titles begin."""

    @property
    def ood_splits(self) -> list[str]:
        """The OoD splits, in order."""
        return [split for split in self.scores if split != self.in_split]

    def auroc(self, method: str, mode: str, ood_split: str, score: str) -> float:
        """The AUROC of one row (``mode`` ``"any"`` for the baselines, which draw nothing)."""
        for row in self.rows:
            if (row["method"], row["mode"], row["ood_split"], row["score"]) == (method, mode, ood_split, score):
                return row["auroc"]
        raise KeyError((method, mode, ood_split, score))

    @classmethod
    def _roc_name(cls, split: str, method: str, mode: str) -> str:
        suffix = "" if mode == BASELINE_MODE else f"_{slug(mode)}"
        return f"{cls.roc_prefix}_{slug(split)}_{slug(method)}{suffix}.png"

    def plot(self, folder: str | Path) -> list[Path]:
        """``<roc_prefix>_<split>_<method>[_<mode>].png``: the ROC curves of every score of one method."""
        paths = []
        for split in self.ood_splits:
            for (method, mode), ood_scores in self.scores[split].items():
                in_scores = self.scores[self.in_split][method, mode]
                label = method if mode == BASELINE_MODE else f"{method}, {mode}"
                paths.append(
                    plot_roc_curves(
                        {name: (in_scores[name], ood_scores[name]) for name in ood_scores},
                        Path(folder) / self._roc_name(split, method, mode),
                        title=f"{self.roc_title}, {self.in_split} vs {split}: {label}",
                    )
                )
        return paths


@dataclass
class OoDResults(RocResults):
    """What :func:`ood_experiment` returns.

    Attributes:
        rows: one per OoD split, method, mode and score (``COLUMNS``).
        scores: ``{split: {(method, mode): {score: (examples,)}}}`` of the in-distribution split and
            every OoD split (for the ROC curves; not written to JSON).
        in_split: the in-distribution split.
        temperature: the temperature of temperature scaling.
        num_samples: S per prediction.
        baseline: ``(method, score)`` every AUROC is compared with.
        comparisons: ``{(ood split, method, mode, score): PairedComparison}`` of every row's AUROC
            but the baseline's, against the baseline's AUROC on the same questions.
        bootstrap: the settings of the intervals.
    """

    temperature: float
    num_samples: int
    baseline: tuple[str, str]
    comparisons: dict[tuple[str, str, str, str], PairedComparison]
    bootstrap: BootstrapSettings

    def to_json(self) -> dict[str, Any]:
        """Settings and rows."""
        return {
            "experiment": "ood",
            "in_split": self.in_split,
            "ood_splits": self.ood_splits,
            "temperature": self.temperature,
            "num_samples": self.num_samples,
            "rows": self.rows,
            "baseline": {"method": self.baseline[0], "score": self.baseline[1]},
            **comparisons_json(self.comparisons, self.bootstrap),
        }

    @staticmethod
    def _key(row: dict[str, Any]) -> tuple[str, str, str, str]:
        return row["ood_split"], row["method"], row["mode"], row["score"]

    def to_markdown(self) -> str:
        """One table per OoD split; the best AUROC of each split is named under it."""
        lines = [
            "# OoD detection",
            "",
            f"In-distribution split `{self.in_split}`; OoD is the positive class; S = {self.num_samples} samples; "
            f"temperature scaling T = {self.temperature:.3f}. Scores: 1 - max probability, predictive entropy, "
            "mutual information (model-average only), router-logit variance (sampled logits). "
            + interval_note(
                f"{self.baseline[0]}, {self.baseline[1]}",
                self.bootstrap,
                f"{self.in_split} and OoD questions (each group resampled on its own)",
            ),
            "",
        ]
        for split in self.ood_splits:
            rows = [row for row in self.rows if row["ood_split"] == split]
            best = max(rows, key=lambda row: row["auroc"])
            shown = [
                interval_cells(
                    row, {"auroc": self.comparisons[self._key(row)]} if self._key(row) in self.comparisons else None
                )
                for row in rows
            ]
            lines += [f"## {split}", "", markdown_table(shown, COLUMNS)]
            lines += [
                f"Best AUROC: {best['auroc']:.3f} ({best['method']}, {best['mode']}, {best['score']}).",
                "",
            ]
            lines += [
                f"- {verdict_line(self._label(method, mode, score), {'auroc': comparison})}"
                for (row_split, method, mode, score), comparison in self.comparisons.items()
                if row_split == split
            ] + [""]
            lines += [
                f"![ROC {split} {method} {mode}]({self._roc_name(split, method, mode)})"
                for method, mode in self.scores[split]
            ]
            lines.append("")
        return "\n".join(lines)

    @staticmethod
    def _label(method: str, mode: str, score: str) -> str:
        return f"{method}, {score}" if mode == BASELINE_MODE else f"{method} ({mode}), {score}"


def ood_experiment(
    model: nn.Module,
    tokenizer: Any,
    splits: Mapping[str, Sequence[MCQAExample]],
    posteriors: Mapping[str, Posterior],
    settings: OoDSettings = OoDSettings(),
    *,
    answer_token_ids: Tensor | None = None,
) -> OoDResults:
    """AUROC and AUPRC of every score, method and mode; see the module docstring.

    Args:
        model: the (unpatched, or patched at its prior mean) model the posteriors were fitted on.
        tokenizer: its tokenizer.
        splits: ``{split name: questions}``.
        posteriors: ``{name: fitted posterior}``.
        settings: the splits, sizes, samples and modes.
        answer_token_ids: ``(choices,)`` ids of the answer letters; default the tokenizer's ``A, B, ...``.

    Raises:
        ConfigurationError: an unknown or empty split, a posterior without ``predict``; before
            any prediction.
    """
    in_split, ood_splits, num_samples = settings.in_split, settings.ood_splits, settings.num_samples
    check_splits(splits, [in_split, *ood_splits, settings.calibration_split])
    posteriors = check_posteriors(posteriors)
    if answer_token_ids is None:
        answer_token_ids = default_answer_token_ids(tokenizer, splits[in_split])
    calibration = splits[settings.calibration_split]
    scaling = fit_temperature_scaling(model, tokenizer, calibration, answer_token_ids, settings.batch_size)

    scores: dict[str, dict[tuple[str, str], dict[str, Tensor]]] = {}
    for split in [in_split, *ood_splits]:
        batches = split_batches(splits[split], tokenizer, settings.batch_size, settings.examples)
        logits = deterministic_logits(model, batches, answer_token_ids)
        scores[split] = {
            (DETERMINISTIC, BASELINE_MODE): uncertainty_scores(Predictions(logits.softmax(-1))),
            (TEMPERATURE_SCALING, BASELINE_MODE): uncertainty_scores(Predictions(scaling.probs(logits))),
        }
        for name, posterior in posteriors.items():
            for mode in posterior_modes(posterior, settings.modes):
                predictions = predict_batches(
                    posterior, batches, mode, num_samples, scores=True, seed=settings.seed, draws=settings.draws
                )
                scores[split][name, mode] = uncertainty_scores(predictions)

    baseline = (settings.baseline, settings.baseline_score)
    rows, comparisons = auroc_rows(
        scores, in_split, ood_splits, SCORES, (baseline[0], BASELINE_MODE, baseline[1]), settings.bootstrap
    )
    return OoDResults(
        rows,
        scores,
        in_split,
        scaling.temperature,
        num_samples,
        baseline=baseline,
        comparisons=comparisons,
        bootstrap=settings.bootstrap,
    )


def run_ood(
    model: nn.Module,
    tokenizer: Any,
    splits: Mapping[str, Sequence[MCQAExample]],
    families: Sequence[str | FamilySpec] = DEFAULT_FAMILIES,
    *,
    settings: OoDSettings = OoDSettings(),
    fitting: FitSettings = FitSettings(),
    answer_token_ids: Tensor | None = None,
) -> OoDResults:
    """Fit ``families`` by name as ``fitting`` says, each on a copy of ``model``, then run
    :func:`ood_experiment` with ``settings``. The numbers (when the settings were built), the
    families, SWAG's schedule and the splits are checked before anything is fitted."""
    check_splits(splits, [settings.in_split, *settings.ood_splits, settings.calibration_split])
    if answer_token_ids is None:
        answer_token_ids = default_answer_token_ids(tokenizer, splits[settings.in_split])
    posteriors = fit_named_families(model, tokenizer, splits, families, fitting, answer_token_ids=answer_token_ids)
    return ood_experiment(model, tokenizer, splits, posteriors, settings, answer_token_ids=answer_token_ids)


@experiment_command("python -m pyro_moe.experiments.ood", OoDSettings, benchmark_sizes=True)
def main(parser: argparse.ArgumentParser) -> Callable[..., OoDResults]:
    """OoD detection (AUROC, AUPRC, ROC curves) of max-probability, entropy, mutual information and router-logit
    variance for the deterministic model, temperature scaling and Bayesian guide families, test against near_ood
    and far_ood of the embedded benchmark."""
    parser.add_argument(
        "--examples", type=int, default=None, help="questions per in-distribution and OoD split (default all)"
    )
    parser.add_argument(
        "--ood-splits", nargs="+", default=["near_ood", "far_ood"], help="OoD splits (default near_ood far_ood)"
    )
    return run_ood


if __name__ == "__main__":
    main()
