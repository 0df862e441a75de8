"""The objective study: the plain ELBO against the importance-weighted bound with learned prior scales.

On the embedded benchmark, per-token router logits of every layer get a Normal prior around the
deterministic logits and an amortized ``mfvr`` guide that starts at that prior (zero residual,
the prior's scale). The calibration split is cut in two: a fit part (its first questions) and a
held-out selection part (its last ones). Two fits on the fit part, same data, steps and seed:

* ``elbo``: the plain ELBO with the prior scale fixed. The ELBO scores the expected
  log-likelihood of single draws and ignores the diversity that model averaging turns into
  calibration; its optimum keeps the guide at the prior (``KL(q || p)`` near zero): collapse to
  the prior.
* ``iwae``: the per-example importance-weighted bound (K particles) with the prior scales learned
  per layer (empirical Bayes): the bound scores the K-draw Monte Carlo predictive, so the data
  decide how random the routing is.

Both are compared on held-out test questions under ``model-average`` with the deterministic model
and two unfitted priors (no guide): the prior at the fits' initial scale, and the prior at the
scale of a grid with the lowest NLL on the selection part
(:func:`pyro_moe.inference.selection.select_prior`, the baseline a learned scale has to beat; the
test split is never read to choose it). Every row also gets the AUROC of its mutual
information against the ``near_ood`` and ``far_ood`` splits
(:func:`pyro_moe.evaluation.metrics.ood_auroc`), and the fits are checked with
:func:`pyro_moe.diagnostics.collapse.collapse_report`.

Every row but the deterministic model's shows its difference from the deterministic model on the same
questions with the paired bootstrap 95% interval of that difference
(:mod:`pyro_moe.evaluation.bootstrap`): accuracy, NLL, ECE and Brier, and the mutual information's
AUROC against the deterministic model's predictive-entropy AUROC (it has no mutual information);
the report's verdict lines come from the intervals.

Example::

    study = run_objective_study(load_benchmark, ObjectiveStudySettings(steps=150))
    study.table                      # one row per predictor: accuracy, nll, ece, brier, OoD AUROC, flags
    study.selected_scale             # the grid scale with the lowest selection-part NLL
    study.write("runs/objectives")   # metrics.json, report.md, elbo.png, collapse_<case>.png

    python -m pyro_moe.experiments.objectives --out runs/objectives
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from torch import Tensor

from pyro_moe.core.routing_context import PredictiveMode
from pyro_moe.data import mcqa_batches
from pyro_moe.diagnostics.collapse import collapse_report
from pyro_moe.errors import ConfigurationError
from pyro_moe.evaluation.bootstrap import compare_auroc, compare_calibration
from pyro_moe.evaluation.metrics import calibration_report, ood_auroc, predictive_entropy
from pyro_moe.experiments.benchmark_model import LoadedBenchmark, answer_probabilities
from pyro_moe.experiments.evaluation import DETERMINISTIC, Predictions, predict_batches
from pyro_moe.experiments.objective_results import ObjectiveStudy
from pyro_moe.experiments.objective_settings import ObjectiveStudySettings
from pyro_moe.experiments.runner import parse_settings
from pyro_moe.inference.fitting import FittedPosterior, fit
from pyro_moe.inference.predictive import RoutedPrediction, predict
from pyro_moe.inference.selection import select_prior
from pyro_moe.models.router_patch import RouterPatch, patch_routers

__all__ = ["ObjectiveStudy", "ObjectiveStudySettings", "main", "run_objective_study"]

CASES = ("elbo", "iwae")
"""The fitted cases: the plain ELBO with a fixed prior scale, the importance-weighted bound with learned scales."""

SELECTED_PRIOR = "prior (selected scale)"
"""The row of the unfitted prior at the grid scale chosen on the selection part."""

OOD_SPLITS = ("near_ood", "far_ood")
"""The OoD splits every row's mutual information is scored against (AUROC, the test split in-distribution)."""

MODEL_AVERAGE = PredictiveMode.MODEL_AVERAGE.value

COMPARED = ("accuracy", "nll", "ece", "brier")
"""The test metrics compared with the deterministic model."""


class _UnfittedPrior:
    """The priors of a patch as a posterior (no guide): what :func:`predict_batches` predicts with."""

    def __init__(self, patch: RouterPatch, answer_token_ids: Tensor) -> None:
        self.patch, self.answer_token_ids = patch, answer_token_ids

    def predict(self, input_ids: Tensor, attention_mask: Tensor | None = None, **options: Any) -> RoutedPrediction:
        """:func:`pyro_moe.predict` with the priors alone."""
        return predict(self.patch, input_ids, attention_mask, answer_token_ids=self.answer_token_ids, **options)


def _prior_predictions(
    model: torch.nn.Module,
    scale: float,
    layers: str | list[int],
    answer_token_ids: Tensor,
    batches: Mapping[str, Sequence[Mapping[str, Tensor]]],
    settings: ObjectiveStudySettings,
) -> dict[str, Predictions]:
    """``model-average`` predictions, with their mutual information, of the unfitted logit prior at
    ``scale`` on every split of ``batches``; the model is patched for the call only."""
    handle = patch_routers(model, {"logits": scale}, layers=layers)
    try:
        prior = _UnfittedPrior(handle, answer_token_ids)
        return {
            split: predict_batches(
                prior, split_batches, MODEL_AVERAGE, settings.num_samples, scores=True, seed=settings.seed
            )
            for split, split_batches in batches.items()
        }
    finally:
        handle.unpatch()


def _check_sizes(splits: Mapping[str, Sequence[Any]], settings: ObjectiveStudySettings) -> None:
    """Every split holds the questions the settings ask for; the fit and selection parts do not overlap."""
    calibration = len(splits["calibration"])
    if settings.train_examples + settings.selection_examples > calibration:
        raise ConfigurationError(
            f"the calibration split has {calibration} questions, {settings.train_examples} (fit part) + "
            f"{settings.selection_examples} (selection part) were asked; the two parts must not overlap."
        )
    for split, wanted in (("test", settings.test_examples), *((s, settings.ood_examples) for s in OOD_SPLITS)):
        if wanted > len(splits[split]):
            raise ConfigurationError(f"the {split} split has {len(splits[split])} questions, {wanted} were asked.")


def run_objective_study(
    load: Callable[[], LoadedBenchmark], settings: ObjectiveStudySettings | None = None, progress: bool = False
) -> ObjectiveStudy:
    """Choose the baseline's prior scale, fit both cases, and evaluate them against the deterministic
    model and the two unfitted priors.

    The fits see the fit part of the calibration split only, the scale selection its selection part
    only; the test and OoD splits are read for evaluation alone.

    Args:
        load: returns a fresh copy of the benchmark (one per fit, so both stay patched), e.g.
            :func:`pyro_moe.experiments.benchmark_model.load_benchmark`.
        settings: what to fit and evaluate (default :class:`ObjectiveStudySettings`).
        progress: show the fits' progress bars.

    Raises:
        ConfigurationError: a split smaller than asked, or fit and selection parts that would
            overlap; before any prediction or fit.
    """
    settings = settings or ObjectiveStudySettings()
    loaded = load()
    splits, tokenizer, letters = loaded.benchmark.splits, loaded.tokenizer, loaded.answer_token_ids
    _check_sizes(splits, settings)
    calibration = splits["calibration"]
    train = list(mcqa_batches(calibration[: settings.train_examples], tokenizer, settings.batch_size))
    selection = list(mcqa_batches(calibration[-settings.selection_examples :], tokenizer, settings.batch_size))
    test_examples = splits["test"][: settings.test_examples]
    evaluation = {"test": list(mcqa_batches(test_examples, tokenizer, settings.batch_size))}
    for split in OOD_SPLITS:
        evaluation[split] = list(mcqa_batches(splits[split][: settings.ood_examples], tokenizer, settings.batch_size))
    test = evaluation["test"]
    labels = torch.cat([batch["labels"] for batch in test])
    layers = settings.layers if isinstance(settings.layers, str) else list(settings.layers)

    prior_selection = select_prior(
        loaded.model,
        selection,
        answer_token_ids=letters,
        scales=settings.selection_scales,
        layer_sets=[layers],
        num_samples=settings.num_samples,
        seed=settings.seed,
    )
    selection_nll = {candidate.scale: nll for candidate, nll in prior_selection.scores.items()}
    selected = prior_selection.chosen.scale

    ood_examples = {split: splits[split][: settings.ood_examples] for split in OOD_SPLITS}
    predictions: dict[str, dict[str, Predictions]] = {
        DETERMINISTIC: {
            split: Predictions(answer_probabilities(loaded.model, tokenizer, examples, settings.batch_size))
            for split, examples in {"test": test_examples, **ood_examples}.items()
        },
        "prior": _prior_predictions(loaded.model, settings.prior_scale, layers, letters, evaluation, settings),
        SELECTED_PRIOR: _prior_predictions(loaded.model, selected, layers, letters, evaluation, settings),
    }

    guide_options = {"mfvr": {"init_scale": settings.prior_scale}}  # the guide starts at the prior
    common = dict(steps=settings.steps, lr=settings.lr, seed=settings.seed, progress=progress)
    posteriors, reports = {}, {}
    for case in CASES:
        model = load().model
        mode = "fixed" if case == "elbo" else "learned"
        patch = patch_routers(model, {"logits": {"scale": settings.prior_scale, "mode": mode}}, layers=layers)
        bayesian_layers = len(patch.routers)
        particles = 1 if case == "elbo" else settings.num_particles
        posteriors[case] = posterior = fit(
            patch,
            train,
            "mfvr",
            answer_token_ids=letters,
            guide_options=guide_options,
            objective=case,
            num_particles=particles,
            **common,
        )
        predictions[case] = {
            split: predict_batches(
                posterior, batches, MODEL_AVERAGE, settings.num_samples, scores=True, seed=settings.seed
            )
            for split, batches in evaluation.items()
        }
        reports[case] = collapse_report(
            posterior, test[: settings.collapse_batches], summary_draws=settings.num_samples, seed=settings.seed
        )

    fixed_scales = {"prior": settings.prior_scale, SELECTED_PRIOR: selected}
    rows = {}
    for name, predicted in predictions.items():
        row: dict[str, Any] = calibration_report(predicted["test"].probs, labels)
        information = predicted["test"].mutual_information
        for split in OOD_SPLITS:
            row[f"{split}_auroc_mi"] = (
                None if information is None else ood_auroc(information, predicted[split].mutual_information)
            )
        row.update(prior_scales=None, kl_per_dimension=None, prior_collapse=None, deterministic=None)
        if name in fixed_scales:
            row["prior_scales"] = [fixed_scales[name]] * bayesian_layers
        if name in posteriors:
            table = reports[name].table
            row["kl_per_dimension"] = float(table["kl_per_dimension"].min())
            row["prior_collapse"] = bool(table["prior_collapse"].any())
            row["deterministic"] = bool(table["deterministic"].any())
            row["prior_scales"] = _prior_scales(posteriors[name], settings.prior_scale)
        rows[name] = row
    table = pd.DataFrame.from_dict(rows, orient="index")
    probs = {name: predicted["test"].probs for name, predicted in predictions.items()}
    entropy = {split: predictive_entropy(p.probs) for split, p in predictions[DETERMINISTIC].items()}
    comparisons = {}
    for name, predicted in predictions.items():
        if name == DETERMINISTIC:
            continue
        found = compare_calibration(
            probs[name],
            probs[DETERMINISTIC],
            labels,
            baseline=DETERMINISTIC,
            metrics=COMPARED,
            settings=settings.bootstrap,
        )
        for split in OOD_SPLITS:
            found[f"{split}_auroc_mi"] = compare_auroc(
                (predicted["test"].mutual_information, predicted[split].mutual_information),
                (entropy["test"], entropy[split]),
                baseline=f"{DETERMINISTIC}, predictive entropy",
                settings=settings.bootstrap,
            )
        comparisons[name] = found
    return ObjectiveStudy(table, selection_nll, posteriors, reports, settings, comparisons, probs, labels)


def _prior_scales(posterior: FittedPosterior, fixed: float) -> list[float]:
    """The logit prior's scale per Bayesian layer: learned ones from the fit (their mean over experts)."""
    learned = posterior.prior_scales()
    sites = [router.site_name("logits") for router in posterior.patch.routers.values()]
    return [float(learned[site].mean()) if site in learned else fixed for site in sites]


def main(argv: Sequence[str] | None = None) -> None:
    """Run the study on the embedded benchmark and write its files."""
    from pyro_moe.experiments.benchmark_data import DEFAULT_SIZES
    from pyro_moe.experiments.benchmark_model import load_benchmark

    defaults = ObjectiveStudySettings()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("runs/objectives"), help="folder of the results")
    parser.add_argument("--prior-scale", type=float, default=defaults.prior_scale, help="initial logit prior scale")
    parser.add_argument("--steps", type=int, default=defaults.steps, help="SVI steps per fit")
    parser.add_argument("--lr", type=float, default=defaults.lr, help="Adam step size")
    parser.add_argument("--particles", type=int, default=defaults.num_particles, help="K of the iwae bound")
    parser.add_argument(
        "--selection-scales",
        type=float,
        nargs="+",
        default=list(defaults.selection_scales),
        help="grid of fixed prior scales the selected-prior baseline is chosen from",
    )
    parser.add_argument(
        "--train-examples", type=int, default=defaults.train_examples, help="fit part: the first calibration questions"
    )
    parser.add_argument(
        "--selection-examples",
        type=int,
        default=defaults.selection_examples,
        help="selection part: the last calibration questions, where the baseline's scale is chosen",
    )
    parser.add_argument(
        "--test-examples",
        type=int,
        default=defaults.test_examples,
        help="test questions; beyond the shipped 1000 the test split is enlarged with fresh questions, disjoint from "
        "train and calibration (1000 + a multiple of 5)",
    )
    parser.add_argument(
        "--ood-examples",
        type=int,
        default=defaults.ood_examples,
        help="questions per OoD split; beyond 1000 both are enlarged with fresh questions (1000 + a multiple of 20)",
    )
    parser.add_argument("--samples", type=int, default=defaults.num_samples, help="predictive draws")
    parser.add_argument("--seed", type=int, default=defaults.seed, help="seed of the fits and draws")
    args, settings = parse_settings(
        parser, ObjectiveStudySettings, argv, {"num_samples": "samples", "num_particles": "particles"}
    )
    extend_to = {"test": settings.test_examples} if settings.test_examples > DEFAULT_SIZES["test"] else {}
    if settings.ood_examples > DEFAULT_SIZES["far_ood"]:
        extend_to |= {split: settings.ood_examples for split in OOD_SPLITS}
    study = run_objective_study(lambda: load_benchmark(extend_to=extend_to), settings, progress=True)
    paths = study.write(args.out)
    print(study.to_markdown())
    print("written:", ", ".join(str(path) for path in paths.values()))


if __name__ == "__main__":
    main()
