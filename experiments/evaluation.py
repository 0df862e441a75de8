"""Shared pieces of the evaluation experiments (stability, calibration, OoD, efficiency).

* guide families by name are fitted on the splits (:func:`fit_named_families`, through the presets
  of :mod:`pyro_moe.inference.presets`), each on its own copy of the model, and recipes by name
  (:func:`fit_named_recipes`, :mod:`pyro_moe.inference.recipe_fit`) on the fit split with the
  validation split for their selection, checks and calibration;
* the deterministic model's answer logits (:func:`deterministic_logits`) and a posterior's
  predictions with their uncertainty scores (:func:`predict_batches`) on MCQA batches;
* the settings of the fits by name (:class:`FitSettings`) and of the posteriors' predictions
  (:class:`PredictionSettings`, the base of the experiments' own settings), every number checked
  when the settings are built, so a bad value is refused before any fit starts;
* the checks every experiment makes before any work (:func:`check_splits`,
  :func:`check_posteriors`), Markdown tables and the writing of ``metrics.json``, ``report.md``
  and the PNGs (:func:`write_results`);
* the cells and verdict lines of the paired bootstrap comparisons against a named baseline
  (:func:`interval_cells`, :func:`verdict_line`; the intervals come from
  :mod:`pyro_moe.evaluation.bootstrap`);
* the command-line options and inputs the four experiment CLIs share, defaulting to the
  embedded benchmark.

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

import argparse
import copy
import json
import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import pyro
import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from pyro_moe.atomic_files import write_text_atomically
from pyro_moe.core.handlers import at_prior_mean
from pyro_moe.core.readout import last_token_logits
from pyro_moe.core.routing_context import PredictiveMode
from pyro_moe.data import MCQAExample, mcqa_batches
from pyro_moe.data import answer_token_ids as letter_token_ids
from pyro_moe.errors import ConfigurationError
from pyro_moe.evaluation.bootstrap import BootstrapSettings, PairedComparison
from pyro_moe.evaluation.metrics import mutual_information, router_logit_variance
from pyro_moe.evaluation.temperature_scaling import TemperatureScaling, fit_temperature
from pyro_moe.inference.fitting import FittedPosterior
from pyro_moe.inference.predictive import RoutedPrediction
from pyro_moe.inference.presets import FamilySpec, family_specs, fit_families
from pyro_moe.inference.recipe_fit import RecipeFit, run_recipe
from pyro_moe.inference.recipes import Recipe, named_recipe
from pyro_moe.inference.resume import CheckpointOptions
from pyro_moe.validation import check_integer

__all__ = [
    "DEFAULT_FAMILIES",
    "DETERMINISTIC",
    "MODES",
    "TEMPERATURE_SCALING",
    "BenchmarkInputs",
    "FitSettings",
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

DETERMINISTIC = "deterministic"
"""Name of the deterministic model (every router at its prior mean) in tables and plots."""

TEMPERATURE_SCALING = "temperature scaling"
"""Name of the temperature-scaled deterministic model in tables and plots."""

MODES = (PredictiveMode.MODEL_AVERAGE.value, PredictiveMode.ROUTING_AVERAGE.value)
"""The predictive modes, ``model-average`` (Bayesian model averaging) and ``routing-average`` (the thesis' rule)."""

DEFAULT_FAMILIES = ("mean-field", "mfvr")
"""Families the experiment CLIs fit by default: router weights (mean-field) and per-token logits (MFVR)."""


class Posterior(Protocol):
    """A fitted posterior the experiments can predict with (e.g. :class:`pyro_moe.FittedPosterior`)."""

    def predict(self, input_ids: Tensor, attention_mask: Tensor | None = None, **options: Any) -> RoutedPrediction:
        """:func:`pyro_moe.predict` options: ``num_samples``, ``mode``, ``return_samples``, ``return_router_logits``."""


# ---------------------------------------------------------------------------------------------- checks


def check_splits(splits: Mapping[str, Sequence[MCQAExample]], required: Sequence[str]) -> None:
    """Every split in ``required`` is present in ``splits`` and non-empty; the error names the
    missing split and the splits there are."""
    if not isinstance(splits, Mapping):
        raise ConfigurationError(f"splits must be a mapping from split names to examples, got {type(splits).__name__}.")
    for name in required:
        if name not in splits:
            raise ConfigurationError(f"unknown split {name!r}; the splits given are {sorted(splits)}.")
        if len(splits[name]) == 0:
            raise ConfigurationError(f"split {name!r} is empty: give it at least one question.")


def check_posteriors(posteriors: Mapping[str, Posterior]) -> dict[str, Posterior]:
    """The posteriors as a dict, each with a ``predict`` method and a name free of the baselines' names."""
    if not isinstance(posteriors, Mapping):
        raise ConfigurationError(f"posteriors must be a mapping from names to fitted posteriors, got {posteriors!r}.")
    for name, posterior in posteriors.items():
        if name in (DETERMINISTIC, TEMPERATURE_SCALING):
            raise ConfigurationError(f"the name {name!r} is taken by the baseline of that name; rename the posterior.")
        if not callable(getattr(posterior, "predict", None)):
            raise ConfigurationError(
                f"posterior {name!r} has no predict method; pass fitted posteriors (pyro_moe.fit) or guide names."
            )
    return dict(posteriors)


def check_modes(modes: Sequence[str]) -> tuple[str, ...]:
    """``modes`` (one or several) as a tuple, each one of :data:`MODES`."""
    modes = (modes,) if isinstance(modes, str) else tuple(modes)
    unknown = [mode for mode in modes if mode not in MODES]
    if not modes or unknown:
        raise ConfigurationError(f"unknown predictive modes {unknown or modes!r}; accepted: {list(MODES)}.")
    return modes


def check_count(name: str, value: object) -> int | None:
    """``value`` if it is ``None`` (all) or a positive integer: how many questions of a split to use."""
    return None if value is None else check_integer(name, value)


def posterior_modes(posterior: Posterior, modes: Sequence[str]) -> tuple[str, ...]:
    """The ``modes`` ``posterior`` predicts in: those of its patch (``predictive_modes``; expert-weight
    posteriors run their own experts per joint sample, so they have ``model-average`` only)."""
    patch = getattr(posterior, "patch", None)
    if patch is None:
        return tuple(modes)
    return tuple(mode for mode in modes if mode in patch.predictive_modes)


# ---------------------------------------------------------------------------------------------- families


@dataclass(frozen=True, kw_only=True)
class FitSettings:
    """How :func:`fit_named_families` fits guide families by name (the fits of the ``run_*``
    experiments). The numbers are checked when the settings are built, before any fit.

    Example::

        fitting = FitSettings(examples=256, layers=[2], steps=100)
        posteriors = fit_named_families(model, tokenizer, splits, ["mfvr"], fitting, answer_token_ids=letters)

    Attributes:
        split: the split the families are fitted on.
        examples: its first this many questions are used (``None``: all).
        sites: the router sites of every named family (as :func:`pyro_moe.patch_routers` takes
            them) instead of the defaults of its guide scopes (:data:`DEFAULT_SITES`); not of
            ``expert-laplace``, whose sites are the experts.
        layers: the Bayesian decoder layers, ``"all"`` or indices.
        steps: SVI steps per family (SWAG's default schedule follows them); 0 fits the post-hoc (Laplace)
            families alone, at the model's weights, and is refused for the others before any fit.
        batch_size: questions per shuffled training batch.
        seed: seed of the shuffling and the fits.
        progress: show the fits' progress bars.
        validation_split: where the families that choose their prior precision (expert Laplace)
            measure the validation NLL.
        validation_examples: its first this many questions are used (``None``: all).
        checkpoint: run checkpoints of the fit and resuming one (one family or recipe;
            :class:`~pyro_moe.inference.resume.CheckpointOptions`); ``None``: none.
    """

    split: str = "train"
    examples: int | None = 512
    sites: Mapping[str, Any] | None = None
    layers: str | Sequence[int] = "all"
    steps: int = 200
    batch_size: int = 32
    seed: int = 0
    progress: bool = True
    validation_split: str = "calibration"
    validation_examples: int | None = 200
    checkpoint: CheckpointOptions | None = None

    def __post_init__(self) -> None:
        check_count("examples", self.examples)
        check_integer("steps", self.steps, minimum=0)  # 0: post-hoc families only (fit_families says so)
        check_integer("batch_size", self.batch_size)
        check_integer("seed", self.seed, minimum=0)
        check_count("validation_examples", self.validation_examples)


@dataclass(frozen=True, kw_only=True)
class PredictionSettings:
    """How the experiments predict with the posteriors; the base of the experiments' own settings
    (e.g. :class:`pyro_moe.experiments.calibration.CalibrationSettings`). The numbers and modes
    are checked when the settings are built, before any fit.

    Attributes:
        num_samples: S, samples of the routing per prediction.
        modes: the predictive modes of the posteriors (see :data:`MODES`), a tuple once built.
        batch_size: questions per prediction batch.
        seed: seed of the sampling.
    """

    num_samples: int = 16
    modes: Sequence[str] = MODES
    batch_size: int = 100
    seed: int = 0

    def __post_init__(self) -> None:
        check_integer("num_samples", self.num_samples)
        object.__setattr__(self, "modes", check_modes(self.modes))
        check_integer("batch_size", self.batch_size)
        check_integer("seed", self.seed, minimum=0)


def fit_named_families(
    model: nn.Module,
    tokenizer: Any,
    splits: Mapping[str, Sequence[MCQAExample]],
    families: Sequence[str | FamilySpec],
    fitting: FitSettings = FitSettings(),
    *,
    answer_token_ids: Tensor,
    in_place: bool = False,
) -> dict[str, FittedPosterior]:
    """Check the families, their options and the splits, then fit every family
    (:func:`family_specs`, :func:`fit_families`) as ``fitting`` says: on the first
    ``fitting.examples`` questions of ``splits[fitting.split]`` in shuffled batches; families that
    choose a prior precision do so on the validation split; ``in_place`` (one family): on ``model``
    itself, not a copy. No families, no fits: ``{}``."""
    if not families:
        return {}
    specs = family_specs(families, fitting.sites, fitting.steps)
    tuned = any(spec.tune is not None for spec in specs)
    check_splits(splits, [fitting.split, *([fitting.validation_split] if tuned else [])])
    examples = splits[fitting.split][: fitting.examples]
    batches = list(mcqa_batches(examples, tokenizer, fitting.batch_size, shuffle=True, seed=fitting.seed))
    validation = None
    if tuned:
        validation = split_batches(splits[fitting.validation_split], tokenizer, 100, fitting.validation_examples)
    return fit_families(
        model,
        batches,
        specs,
        answer_token_ids=answer_token_ids,
        layers=fitting.layers,
        steps=fitting.steps,
        seed=fitting.seed,
        progress=fitting.progress,
        validation_batches=validation,
        in_place=in_place,
        checkpoint=fitting.checkpoint,
    )


def fit_named_recipes(
    model: nn.Module,
    tokenizer: Any,
    splits: Mapping[str, Sequence[MCQAExample]],
    recipes: Sequence[str | Recipe],
    fitting: FitSettings = FitSettings(),
    *,
    answer_token_ids: Tensor,
    steps: int | None = None,
    in_place: bool = False,
    scale: float | None = None,
    scale_grid: Sequence[float] | None = None,
    selection: str | None = None,
) -> dict[str, RecipeFit]:
    """Run every recipe (:func:`pyro_moe.inference.recipe_fit.run_recipe`) as ``fitting`` says, each on its own
    copy of ``model`` (``in_place``, one recipe: on ``model`` itself); returns ``{recipe name: RecipeFit}``.

    The fit reads the first ``fitting.examples`` questions of ``splits[fitting.split]`` in shuffled batches;
    the scale selection and the calibration the first ``fitting.validation_examples`` questions of
    ``splits[fitting.validation_split]``; no other split is read (a test split in ``splits`` is never
    touched). ``fitting.layers`` are the Bayesian layers, ``fitting.seed`` seeds the recipes' fits and
    draws; ``fitting.steps`` is for guide families: a recipe keeps its own steps unless ``steps`` is given.
    ``scale`` (one starting scale) or ``scale_grid`` (the candidates) replace every recipe's own grid,
    ``selection`` (``"raw"``, ``"calibrated"``) its selection objective
    (:func:`~pyro_moe.inference.recipe_fit.run_recipe`).

    Raises:
        ConfigurationError: an unknown recipe, two of the same name, ``fitting.sites`` (a recipe patches its
            own sites), a missing or empty split, a bad ``steps``; before any work.
    """
    if isinstance(recipes, str) or not recipes:
        raise ConfigurationError(f"recipes must be a non-empty list of recipe names or Recipes, got {recipes!r}.")
    overrides = {"seed": fitting.seed} | ({} if steps is None else {"steps": check_integer("steps", steps)})
    chosen = [(named_recipe(r) if isinstance(r, str) else r).with_training(**overrides) for r in recipes]
    names = [recipe.name for recipe in chosen]
    if len(set(names)) != len(names):
        raise ConfigurationError(f"recipe names must be distinct, got {names}.")
    if fitting.sites is not None:
        raise ConfigurationError("recipes patch their own logit sites: leave FitSettings.sites unset for them.")
    if in_place and len(chosen) != 1:
        raise ConfigurationError(f"in_place runs one recipe on the model itself, got {len(chosen)} recipes.")
    if fitting.checkpoint is not None and len(chosen) != 1:
        raise ConfigurationError(f"a checkpoint folder holds one fit, got {len(chosen)} recipes.")
    check_splits(splits, [fitting.split, fitting.validation_split])
    examples = splits[fitting.split][: fitting.examples]
    train = list(mcqa_batches(examples, tokenizer, fitting.batch_size, shuffle=True, seed=fitting.seed))
    calibration = split_batches(splits[fitting.validation_split], tokenizer, 100, fitting.validation_examples)
    results = {}
    for recipe in tqdm(chosen, desc="recipes", disable=not fitting.progress or len(chosen) < 2):
        target = model if in_place else copy.deepcopy(model)
        results[recipe.name] = run_recipe(
            target,
            recipe,
            train,
            calibration,
            answer_token_ids=answer_token_ids,
            layers=fitting.layers,
            scale=scale,
            scale_grid=scale_grid,
            selection=selection,
            progress=fitting.progress,
            checkpoint=fitting.checkpoint,
        )
    return results


# ---------------------------------------------------------------------------------------------- predictions


def split_batches(
    examples: Sequence[MCQAExample], tokenizer: Any, batch_size: int, limit: int | None = None
) -> list[dict[str, Tensor]]:
    """Left-padded batches (:func:`pyro_moe.data.mcqa_batches`) of the first ``limit`` examples (all by default)."""
    if limit is not None:
        examples = examples[:limit]
    return list(mcqa_batches(examples, tokenizer, batch_size))


def split_labels(examples: Sequence[MCQAExample]) -> Tensor:
    """Indices ``(examples,)`` (int64) of the correct choices."""
    return torch.tensor([example.answer for example in examples], dtype=torch.long)


def default_answer_token_ids(tokenizer: Any, examples: Sequence[MCQAExample]) -> Tensor:
    """Token ids ``(choices,)`` of the letters ``A, B, ...`` of the questions' choices."""
    return letter_token_ids(tokenizer, list("ABCDEFGHIJ"[: len(examples[0].choices)]))


def slug(text: str) -> str:
    """``text`` as a file-name part: lower case, runs of other characters as ``-``."""
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def _model_device(model: nn.Module) -> torch.device:
    return model.get_input_embeddings().weight.device


@torch.no_grad()
def deterministic_logits(model: nn.Module, batches: Sequence[Mapping[str, Tensor]], answer_token_ids: Tensor) -> Tensor:
    """Answer logits ``(examples, choices)`` (the model's dtype, float32 at least; CPU) of the
    deterministic model: every router site at its prior mean (:func:`pyro_moe.at_prior_mean`), so a
    patched model gives the HF model."""
    device = _model_device(model)
    answer_token_ids = answer_token_ids.to(device)
    chunks = []
    with at_prior_mean():
        for batch in tqdm(batches, desc="deterministic predictions", leave=False):
            logits = last_token_logits(model, batch["input_ids"].to(device), batch["attention_mask"].to(device))
            chunks.append(logits[0][:, answer_token_ids].cpu())
    return torch.cat(chunks)


def fit_temperature_scaling(
    model: nn.Module, tokenizer: Any, examples: Sequence[MCQAExample], answer_token_ids: Tensor, batch_size: int
) -> TemperatureScaling:
    """Temperature scaling of the deterministic model's answer logits, fitted on ``examples``
    (:func:`pyro_moe.evaluation.temperature_scaling.fit_temperature`)."""
    logits = deterministic_logits(model, split_batches(examples, tokenizer, batch_size), answer_token_ids)
    return fit_temperature(logits, split_labels(examples))


@dataclass(frozen=True)
class Predictions:
    """A posterior's predictions on a split.

    Attributes:
        probs: ``(examples, choices)`` predictive answer probabilities.
        mutual_information: ``(examples,)`` mutual information of the answer (``model-average``
            only: ``routing-average`` returns one answer distribution), or ``None``.
        router_logit_variance: ``(examples,)`` variance of the sampled router logits, or ``None``.
    """

    probs: Tensor
    mutual_information: Tensor | None = None
    router_logit_variance: Tensor | None = None


def predict_batches(
    posterior: Posterior,
    batches: Sequence[Mapping[str, Tensor]],
    mode: str,
    num_samples: int,
    *,
    scores: bool = False,
    seed: int = 0,
) -> Predictions:
    """``posterior.predict`` over ``batches`` in predictive ``mode``, results on the CPU.

    With ``scores``, also the mutual information (``model-average``) and the router-logit
    variance per example, computed batch by batch so the sampled logits are never all kept.
    """
    pyro.set_rng_seed(seed)
    probs, information, variance = [], [], []
    for batch in tqdm(batches, desc=f"predictions, {mode}", leave=False):
        prediction = posterior.predict(
            batch["input_ids"],
            batch["attention_mask"],
            num_samples=num_samples,
            mode=mode,
            return_samples=scores,
            return_router_logits=scores,
        )
        probs.append(prediction.probs.float().cpu())
        if scores:
            if mode == PredictiveMode.MODEL_AVERAGE.value:
                information.append(mutual_information(prediction.sample_probs).cpu())
            if prediction.router_logits and num_samples > 1:
                mask = batch["attention_mask"].to(prediction.probs.device)
                variance.append(router_logit_variance(prediction.router_logits, mask).cpu())
    return Predictions(
        probs=torch.cat(probs),
        mutual_information=torch.cat(information) if information else None,
        router_logit_variance=torch.cat(variance) if variance else None,
    )


# ---------------------------------------------------------------------------------------------- results


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return "n/a" if math.isnan(value) else f"{value:.4g}" if abs(value) >= 1e4 else f"{value:.3f}"
    return str(value)


def markdown_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[str]) -> str:
    """A Markdown table of ``rows`` with ``columns`` (numbers right-aligned, floats to 3 decimals)."""
    numeric = [all(isinstance(row.get(c), int | float) for row in rows) and bool(rows) for c in columns]
    lines = [
        "| " + " | ".join(columns) + " |",
        "| " + " | ".join("---:" if n else "---" for n in numeric) + " |",
    ]
    lines += ["| " + " | ".join(_cell(row.get(c, "")) for c in columns) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def interval_cells(row: Mapping[str, Any], comparisons: Mapping[str, PairedComparison] | None) -> dict[str, Any]:
    """``row`` with every compared metric's cell as ``'0.526 (-0.016 [-0.024, -0.009])'`` (its value,
    its difference from the baseline and the interval of that difference); ``row`` itself when it
    has no comparisons (the baseline's own row)."""
    if not comparisons:
        return dict(row)
    return {**row, **{metric: comparison.format() for metric, comparison in comparisons.items()}}


def interval_note(baseline: str, bootstrap: BootstrapSettings, questions: str) -> str:
    """The sentence under a report's title that says how to read the intervals; ``questions`` says
    which, e.g. ``"300 test questions"``."""
    return (
        f"Each metric of the other rows shows its difference from **{baseline}** on the same {questions} "
        f"and the paired bootstrap {bootstrap.level:.0%} interval of that difference ({bootstrap.resamples} "
        "resamples of the questions, percentile method); the verdicts come from the intervals: an interval that "
        "holds 0 is a tie."
    )


def verdict_line(label: str, comparisons: Mapping[str, PairedComparison]) -> str:
    """``'mfvr (model-average) against temperature scaling: beats on nll, ece; ties on accuracy.'``:
    the verdicts of the intervals (never of the point estimates), one clause per verdict."""
    if not comparisons:
        raise ConfigurationError(f"no comparisons for {label!r}: nothing to give a verdict on.")
    baseline = next(iter(comparisons.values())).baseline
    clauses = []
    for verdict in ("beats", "ties", "loses"):
        metrics = [metric for metric, comparison in comparisons.items() if comparison.verdict == verdict]
        if metrics:
            clauses.append(f"{verdict} on {', '.join(metrics)}")
    return f"{label} against {baseline}: {'; '.join(clauses)}."


class Results(Protocol):
    """What every experiment returns."""

    def to_json(self) -> dict[str, Any]:
        """The figures as JSON-ready data."""

    def to_markdown(self) -> str:
        """The tables (``report.md``)."""

    def plot(self, folder: str | Path) -> list[Path]:
        """Write the PNG figures into ``folder``; returns their paths."""


def _json_ready(value: Any) -> Any:
    """NaN becomes ``None`` (JSON has no NaN); containers are converted recursively."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Mapping):
        return {str(k): _json_ready(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_ready(v) for v in value]
    return value


def write_results(results: Results, folder: str | Path) -> dict[str, Path | list[Path]]:
    """Write ``metrics.json``, ``report.md`` and the PNGs of ``results`` into ``folder``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    metrics, report = folder / "metrics.json", folder / "report.md"
    write_text_atomically(metrics, json.dumps(_json_ready(results.to_json()), indent=2) + "\n")
    write_text_atomically(report, results.to_markdown())
    return {"metrics": metrics, "report": report, "plots": results.plot(folder)}


# ---------------------------------------------------------------------------------------------- command line


def add_common_arguments(
    parser: argparse.ArgumentParser, *, families: Sequence[str], steps: int, fit_examples: int = 512
) -> None:
    """The options the experiment CLIs share (the embedded benchmark is the default input)."""
    parser.add_argument("--out", type=Path, required=True, help="folder for metrics.json, report.md and the PNGs")
    parser.add_argument(
        "--families",
        nargs="*",
        default=list(families),
        help=f"guide names fitted with pyro_moe.fit, e.g. mean-field mfvr map+mfvr (default: {' '.join(families)})",
    )
    parser.add_argument("--steps", type=int, default=steps, help=f"SVI steps per family (default {steps})")
    parser.add_argument("--samples", type=int, default=16, help="S, samples of the routing per prediction (default 16)")
    parser.add_argument(
        "--sites",
        type=json.loads,
        default=None,
        help="sites of every family as JSON, e.g. '{\"logits\": 2.0}' (default: per guide scope, see DEFAULT_SITES)",
    )
    parser.add_argument(
        "--layers", type=int, nargs="+", default=None, help="Bayesian decoder layers (default: all MoE layers)"
    )
    parser.add_argument("--fit-split", default="train", help="split the families are fitted on (default train)")
    parser.add_argument(
        "--fit-examples",
        type=int,
        default=fit_examples,
        help=f"questions of the fit split used to fit (default {fit_examples})",
    )
    parser.add_argument("--batch-size", type=int, default=100, help="questions per prediction batch (default 100)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the fits and the sampling (default 0)")


def add_benchmark_size_arguments(
    parser: argparse.ArgumentParser, *, test_size: int | None = None, ood_size: int | None = None
) -> None:
    """``--test-size`` and ``--ood-size``: the embedded benchmark's evaluation splits enlarged with fresh
    questions (:func:`benchmark_extension`); ``test_size`` and ``ood_size`` are the experiment's defaults
    (``None``: the splits as shipped, 1000 questions each)."""
    parser.add_argument(
        "--test-size",
        type=int,
        default=test_size,
        help="enlarge the benchmark's test split to this many questions (fresh ones appended after its 1000, "
        "disjoint from train and calibration; 1000 + a multiple of 5); default: "
        + ("the 1000 as shipped" if test_size is None else str(test_size)),
    )
    parser.add_argument(
        "--ood-size",
        type=int,
        default=ood_size,
        help="enlarge near_ood and far_ood to this many questions each (1000 + a multiple of 20); default "
        + ("1000" if ood_size is None else str(ood_size)),
    )


def benchmark_extension(args: argparse.Namespace) -> dict[str, int]:
    """The ``extend_to`` of :func:`pyro_moe.experiments.benchmark_data.generate_benchmark` that
    :func:`add_benchmark_size_arguments`' options ask for (``{}``: the splits as shipped)."""
    extend_to = {} if args.test_size is None else {"test": args.test_size}
    if args.ood_size is not None:
        extend_to |= {"near_ood": args.ood_size, "far_ood": args.ood_size}
    return extend_to


def fit_settings(args: argparse.Namespace) -> FitSettings:
    """The :class:`FitSettings` of the options :func:`add_common_arguments` adds (no ``--layers``: all);
    the ``--families`` are checked with them (names, and 0 ``--steps`` for post-hoc families only)."""
    settings = FitSettings(
        split=args.fit_split,
        examples=args.fit_examples,
        sites=args.sites,
        layers=args.layers or "all",
        steps=args.steps,
        seed=args.seed,
    )
    if args.families:  # an empty list is the experiment's to judge
        family_specs(args.families, args.sites, args.steps)
    return settings


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
