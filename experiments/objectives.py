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
import dataclasses
import json
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from torch import Tensor

from pyro_moe.atomic_files import write_text_atomically
from pyro_moe.core.routing_context import PredictiveMode
from pyro_moe.data import mcqa_batches
from pyro_moe.diagnostics.collapse import CollapseReport, collapse_report
from pyro_moe.errors import ConfigurationError
from pyro_moe.evaluation.bootstrap import BootstrapSettings, PairedComparison, compare_auroc, compare_calibration
from pyro_moe.evaluation.metrics import calibration_report, ood_auroc, predictive_entropy
from pyro_moe.experiments.benchmark_model import LoadedBenchmark, answer_probabilities
from pyro_moe.experiments.evaluation import DETERMINISTIC, Predictions, interval_note, predict_batches, verdict_line
from pyro_moe.experiments.guide_comparison import plot_elbo_curves
from pyro_moe.inference.fitting import FittedPosterior, fit
from pyro_moe.inference.predictive import RoutedPrediction, predict
from pyro_moe.inference.selection import select_prior
from pyro_moe.models.router_patch import RouterPatch, patch_routers
from pyro_moe.validation import check_integer, check_number

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


@dataclass(frozen=True)
class ObjectiveStudySettings:
    """What the study fits and evaluates.

    Attributes:
        prior_scale: the logit prior's (initial) standard deviation, also the guide's initial scale.
        selection_scales: the grid of fixed prior scales the selected-prior baseline is chosen from
            (at least one, each positive), a tuple once built.
        layers: the Bayesian layers (as :func:`pyro_moe.patch_routers` takes them).
        train_examples: the fit part: the first this many calibration questions, the only ones the
            posteriors are fitted on.
        selection_examples: the selection part: the last this many calibration questions, where the
            baseline's scale is chosen by NLL; it must not overlap the fit part.
        test_examples: questions of the test split every row is evaluated on.
        ood_examples: questions of each OoD split (``near_ood``, ``far_ood``) the AUROC uses.
        batch_size: minibatch size of the fits and of evaluation.
        steps: SVI steps per fit.
        lr: Adam step size.
        num_particles: K of the importance-weighted bound.
        num_samples: S joint draws of the ``model-average`` predictive (in the scale selection too,
            and in the collapse report's ``az.summary``).
        collapse_batches: test batches the collapse report runs on.
        seed: seeds the fits and the predictive draws.
        bootstrap: resamples, level and seed of the intervals against the deterministic model.
    """

    prior_scale: float = 0.3
    selection_scales: Sequence[float] = (0.3, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0)
    layers: str | tuple[int, ...] = "all"
    train_examples: int = 800
    selection_examples: int = 200
    test_examples: int = 1000
    ood_examples: int = 1000
    batch_size: int = 50
    steps: int = 300
    lr: float = 0.05
    num_particles: int = 4
    num_samples: int = 16
    collapse_batches: int = 4
    seed: int = 0
    bootstrap: BootstrapSettings = field(default_factory=BootstrapSettings)

    def __post_init__(self) -> None:
        for name in (
            "train_examples",
            "selection_examples",
            "test_examples",
            "ood_examples",
            "batch_size",
            "steps",
            "num_particles",
            "num_samples",
            "collapse_batches",
        ):
            check_integer(name, getattr(self, name))
        for name in ("prior_scale", "lr"):
            check_number(name, getattr(self, name))
        scales = self.selection_scales
        if isinstance(scales, str) or not isinstance(scales, Sequence) or not scales:
            raise ConfigurationError(
                f"selection_scales must be a non-empty sequence of positive numbers, got {scales!r}."
            )
        for index, scale in enumerate(scales):
            check_number(f"selection_scales[{index}]", scale)
        object.__setattr__(self, "selection_scales", tuple(float(scale) for scale in scales))


@dataclass
class ObjectiveStudy:
    """What :func:`run_objective_study` returns.

    Attributes:
        table: one row per predictor (``deterministic``, ``prior``, ``prior (selected scale)``,
            ``elbo``, ``iwae``): ``accuracy, nll, ece, mce, brier, confidence`` on the test
            questions, ``near_ood_auroc_mi`` and ``far_ood_auroc_mi`` (AUROC of the mutual
            information, test against each OoD split; missing (NaN) for the deterministic model,
            whose mutual information is 0), the ``prior_scales`` (per layer), and for the fits the
            smallest ``kl_per_dimension`` over the sites and the collapse flags
            ``prior_collapse`` and ``deterministic`` (any site).
        selection_nll: ``{grid scale: NLL of the unfitted prior at that scale on the selection part}``.
        posteriors: the two fits, each on its own copy of the model (still patched).
        collapse: the collapse report of each fit on the first test batches.
        settings: the settings of the run.
        comparisons: ``{predictor: {column: PairedComparison}}`` of every predictor but the
            deterministic model against it (:data:`COMPARED` and the ``*_auroc_mi`` columns).
        probs: ``{predictor: (examples, choices)}`` the test probabilities.
        labels: ``(examples,)`` the test labels.
    """

    table: pd.DataFrame
    selection_nll: dict[float, float]
    posteriors: dict[str, FittedPosterior]
    collapse: dict[str, CollapseReport]
    settings: ObjectiveStudySettings
    comparisons: dict[str, dict[str, PairedComparison]]
    probs: dict[str, Tensor]
    labels: Tensor

    @property
    def selected_scale(self) -> float:
        """The grid scale with the lowest selection-part NLL (the first of the grid on a tie)."""
        return min(self.selection_nll, key=self.selection_nll.__getitem__)

    def to_json(self) -> dict[str, Any]:
        """The table, the settings and the collapse tables as plain JSON values."""
        return {
            "settings": dataclasses.asdict(self.settings),
            "selection": {
                "scales": list(self.selection_nll),
                "nll": list(self.selection_nll.values()),
                "selected_scale": self.selected_scale,
            },
            "predictors": json.loads(self.table.to_json(orient="index")),
            "comparisons": [
                {"predictor": name, "column": column, **comparison.to_json()}
                for name, found in self.comparisons.items()
                for column, comparison in found.items()
            ],
            "collapse": {
                case: json.loads(report.table.to_json(orient="records")) for case, report in self.collapse.items()
            },
        }

    def to_markdown(self) -> str:
        """The predictors' table as Markdown (figures to three decimals) and the scale selection under it."""
        columns = [
            "accuracy",
            "nll",
            "ece",
            "brier",
            "near_ood_auroc_mi",
            "far_ood_auroc_mi",
            "kl_per_dimension",
            "prior_collapse",
            "prior_scales",
        ]
        lines = ["| predictor | " + " | ".join(columns) + " |", "| --- |" + " ---: |" * len(columns)]
        for name, row in self.table.iterrows():
            cells = []
            for column in columns:
                value = row[column]
                if column in self.comparisons.get(name, {}):
                    cells.append(self.comparisons[name][column].format())
                elif value is None or (isinstance(value, float) and math.isnan(value)):
                    cells.append("")
                elif isinstance(value, float):
                    cells.append(f"{value:.3f}")
                elif isinstance(value, list):
                    cells.append(", ".join(f"{v:.2f}" for v in value))
                else:
                    cells.append(str(value))
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
        grid = ", ".join(f"{scale:g}: {nll:.3f}" for scale, nll in self.selection_nll.items())
        questions = f"{self.labels.shape[0]} test questions (the AUROCs: against its predictive entropy's)"
        lines += ["", interval_note(DETERMINISTIC, self.settings.bootstrap, questions), ""]
        lines += [f"- {verdict_line(name, found)}" for name, found in self.comparisons.items()]
        lines += [
            "",
            f"Prior scale selected on the last {self.settings.selection_examples} calibration questions "
            f"(not fitted on): {self.selected_scale:g}; selection NLL per scale: {grid}.",
        ]
        return "\n".join(lines) + "\n"

    def write(self, folder: str | Path) -> dict[str, Path]:
        """Write ``metrics.json``, ``report.md``, ``elbo.png`` (both fits' loss curves) and
        ``collapse_<case>.png`` into ``folder``; returns the paths."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        paths = {"metrics": folder / "metrics.json", "report": folder / "report.md"}
        write_text_atomically(paths["metrics"], json.dumps(self.to_json(), indent=2) + "\n")
        title = "# Plain ELBO against the importance-weighted bound with learned prior scales\n\n"
        write_text_atomically(paths["report"], title + self.to_markdown())
        paths["elbo"] = plot_elbo_curves(
            {case: posterior.history for case, posterior in self.posteriors.items()}, folder / "elbo.png"
        )
        for case, report in self.collapse.items():
            paths[f"collapse_{case}"] = report.plot(folder / f"collapse_{case}.png")
        return paths


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
    args = parser.parse_args(argv)
    settings = ObjectiveStudySettings(
        prior_scale=args.prior_scale,
        selection_scales=args.selection_scales,
        train_examples=args.train_examples,
        selection_examples=args.selection_examples,
        test_examples=args.test_examples,
        ood_examples=args.ood_examples,
        steps=args.steps,
        lr=args.lr,
        num_particles=args.particles,
        num_samples=args.samples,
        seed=args.seed,
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
