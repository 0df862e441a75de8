"""Shared pieces of the evaluation experiments (stability, calibration, OoD, efficiency, generation),
gathered here from their modules, and the embedded benchmark as the command lines' default input.

* :mod:`~pyro_moe.experiments.checks`: the checks every experiment makes before any work
  (:func:`check_splits`, :func:`check_posteriors`, ...) and the baselines' names;
* :mod:`~pyro_moe.experiments.named_fits`: guide families by name fitted on the splits
  (:func:`fit_named_families`, through the presets of :mod:`pyro_moe.inference.presets`), each on its own
  copy of the model, and recipes by name (:func:`fit_named_recipes`, :mod:`pyro_moe.inference.recipe_fit`)
  on the fit split with the validation split for their selection, checks and calibration, as
  :class:`FitSettings` says (every number checked when the settings are built, before any fit);
* :mod:`~pyro_moe.experiments.predictions`: the deterministic model's answer logits
  (:func:`deterministic_logits`) and a posterior's predictions with their uncertainty scores
  (:func:`predict_batches`, drawn from one stream over the batches or per question: :data:`DRAWS`) on MCQA
  batches, as :class:`PredictionSettings` (the base of the experiments' own settings) and
  :class:`MCQAPredictionSettings` (how the answers' draws are taken) say;
* :mod:`~pyro_moe.experiments.reports`: Markdown tables, the cells and verdict lines of the paired
  bootstrap comparisons against a named baseline (:func:`interval_cells`, :func:`verdict_line`) and the
  writing of ``metrics.json``, ``report.md`` and the PNGs (:func:`write_results`);
* :mod:`~pyro_moe.experiments.command_options`: the command-line options the experiment CLIs share;
  :func:`run_on_benchmark` runs an experiment on the embedded benchmark (:func:`benchmark_inputs`),
  as :mod:`~pyro_moe.experiments.runner` does for every experiment's command line.

A posterior is anything with the :class:`Posterior` ``predict`` method, e.g. a
:class:`pyro_moe.FittedPosterior`.

Example::

    posteriors = fit_named_families(model, tokenizer, splits, ["mean-field", "mfvr", "swag"], FitSettings(steps=200),
                                    answer_token_ids=letters)
    logits = deterministic_logits(model, test_batches, letters)      # (examples, choices)
    scored = predict_batches(posteriors["mfvr"], test_batches, "model-average", 16, scores=True)
    PredictionSettings(num_samples=0)                                # ConfigurationError, nothing fitted
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from torch import Tensor, nn

from pyro_moe.data import MCQAExample
from pyro_moe.experiments.checks import (
    DETERMINISTIC,
    MODES,
    TEMPERATURE_SCALING,
    Posterior,
    check_count,
    check_modes,
    check_posteriors,
    check_splits,
    posterior_modes,
)
from pyro_moe.experiments.command_options import (
    DEFAULT_FAMILIES,
    add_benchmark_size_arguments,
    add_common_arguments,
    benchmark_extension,
    fit_settings,
)
from pyro_moe.experiments.named_fits import FitSettings, fit_named_families, fit_named_recipes
from pyro_moe.experiments.predictions import (
    DRAWS,
    PER_BATCH,
    PER_QUESTION,
    MCQAPredictionSettings,
    Predictions,
    PredictionSettings,
    default_answer_token_ids,
    deterministic_logits,
    fit_temperature_scaling,
    predict_batches,
    split_batches,
    split_labels,
)
from pyro_moe.experiments.reports import (
    Results,
    interval_cells,
    interval_note,
    markdown_table,
    slug,
    verdict_line,
    write_results,
)

__all__ = [
    "DEFAULT_FAMILIES",
    "DETERMINISTIC",
    "DRAWS",
    "MODES",
    "PER_BATCH",
    "PER_QUESTION",
    "TEMPERATURE_SCALING",
    "BenchmarkInputs",
    "FitSettings",
    "MCQAPredictionSettings",
    "Posterior",
    "PredictionSettings",
    "Predictions",
    "Results",
    "add_benchmark_size_arguments",
    "add_common_arguments",
    "benchmark_extension",
    "benchmark_inputs",
    "check_count",
    "check_modes",
    "check_posteriors",
    "check_splits",
    "default_answer_token_ids",
    "deterministic_logits",
    "fit_named_families",
    "fit_named_recipes",
    "fit_settings",
    "fit_temperature_scaling",
    "interval_cells",
    "interval_note",
    "markdown_table",
    "posterior_modes",
    "predict_batches",
    "run_on_benchmark",
    "slug",
    "split_batches",
    "split_labels",
    "verdict_line",
    "write_results",
]


@dataclass
class BenchmarkInputs:
    """The embedded benchmark's model, tokenizer, answer-letter ids and splits (CLI default input)."""

    model: nn.Module
    tokenizer: Any
    answer_token_ids: Tensor
    splits: dict[str, list[MCQAExample]]


def benchmark_inputs(extend_to: Mapping[str, int] | None = None) -> BenchmarkInputs:
    """Load the embedded benchmark offline (:func:`pyro_moe.experiments.benchmark_model.load_benchmark`),
    its evaluation splits enlarged as ``extend_to`` says (e.g. ``{"test": 5000}``; fresh questions
    appended, disjoint from train and calibration)."""
    from pyro_moe.experiments.benchmark_model import load_benchmark

    loaded = load_benchmark(extend_to=extend_to)
    return BenchmarkInputs(loaded.model, loaded.tokenizer, loaded.answer_token_ids, loaded.benchmark.splits)


def run_on_benchmark(
    run: Callable[..., Results],
    families: Sequence[str],
    settings: Any,
    fitting: FitSettings,
    extend_to: Mapping[str, int] | None = None,
) -> Results:
    """An experiment's ``run`` (``run_calibration``, ``run_ood``, ...) of ``families`` on the embedded
    benchmark (its evaluation splits enlarged as ``extend_to`` says), as its command line runs it (the
    settings are built first, so bad numbers never load it)."""
    inputs = benchmark_inputs(extend_to)
    return run(
        inputs.model,
        inputs.tokenizer,
        inputs.splits,
        families,
        settings=settings,
        fitting=fitting,
        answer_token_ids=inputs.answer_token_ids,
    )
