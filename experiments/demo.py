"""The demo on the embedded benchmark: stability, eight Bayesian methods, calibration, OoD, ArviZ, collapse.

One offline run on the embedded benchmark (:func:`pyro_moe.experiments.benchmark_model.load_benchmark`),
composed of the experiments' own functions:

1. routing stability of the deterministic model picks the susceptible layers
   (:func:`~pyro_moe.experiments.stability.stability_experiment`);
2. the methods of :data:`DEMO_FAMILIES` are fitted on those layers: guide families with short fits
   (:func:`~pyro_moe.experiments.evaluation.fit_named_families`; expert Laplace on the last layer's
   experts), the per-token logits by the recipe ``mfvr-iwae-layer`` (starting scale chosen on calibration
   questions, iwae with learned per-layer scales, a temperature per mode;
   :func:`~pyro_moe.experiments.evaluation.fit_named_recipes`);
3. their routing stability on the same questions (:func:`~pyro_moe.experiments.stability.posterior_stability`);
4. calibration and OoD detection against the deterministic model and temperature scaling under both
   predictive modes (:func:`~pyro_moe.experiments.calibration.calibration_experiment`,
   :func:`~pyro_moe.experiments.ood.ood_experiment`);
5. ArviZ ``InferenceData`` of the mean-field weight posterior as netCDF
   (:func:`pyro_moe.diagnostics.arviz_export.to_inference_data`) and the collapse report of the
   recipe's logit guide (:func:`pyro_moe.diagnostics.collapse.collapse_report`);
6. ``report.md`` with the headline table (every method's accuracy, NLL, ECE and AUROCs with their
   difference from temperature scaling and its paired bootstrap 95% interval,
   :func:`headline_comparisons`), the experiments' tables, the recipe's selection, learned scales and
   temperatures, and the plots.

    pyro-moe demo --out runs/demo            # what `make demo` runs
    pyro-moe demo --out runs/quick --quick   # the same path, few steps and questions
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from pyro_moe.atomic_files import write_atomically, write_text_atomically
from pyro_moe.core.routing_context import PredictiveMode
from pyro_moe.diagnostics.arviz_export import to_inference_data
from pyro_moe.diagnostics.collapse import collapse_report
from pyro_moe.errors import ConfigurationError
from pyro_moe.evaluation.bootstrap import PairedComparison
from pyro_moe.experiments.calibration import CalibrationSettings, calibration_experiment
from pyro_moe.experiments.evaluation import (
    DETERMINISTIC,
    MODES,
    TEMPERATURE_SCALING,
    BenchmarkInputs,
    FitSettings,
    benchmark_inputs,
    check_count,
    fit_named_families,
    fit_named_recipes,
    interval_cells,
    markdown_table,
    posterior_modes,
    slug,
    split_batches,
    verdict_line,
    write_results,
)
from pyro_moe.experiments.ood import OoDSettings, ood_experiment
from pyro_moe.experiments.stability import (
    StabilityResults,
    StabilitySettings,
    posterior_stability,
    stability_experiment,
)
from pyro_moe.inference.recipes import RECIPES
from pyro_moe.validation import check_integer

__all__ = [
    "DEMO_FAMILIES",
    "HEADLINE_COLUMNS",
    "QUICK",
    "DemoSettings",
    "headline_comparisons",
    "headline_rows",
    "run_demo",
]

DEMO_FAMILIES = (
    "mean-field",
    "mfvr-iwae-layer",
    "fcvr",
    "low-rank-logits",
    "vtsr",
    "mc-dropout",
    "swag",
    "expert-laplace",
)
"""Router weights (mean-field, MC dropout, SWAG), per-token logits (the recipe ``mfvr-iwae-layer``, FCVR,
low-rank), per-token temperatures (VTSR) and the last layer's expert weights (expert Laplace): guide
families by name, and recipes by name (:data:`pyro_moe.inference.recipes.RECIPES`)."""

HEADLINE_COLUMNS = ("method", "accuracy", "nll", "ece", "jaccard", "auroc near_ood", "auroc far_ood")
HEADLINE_SCORE = "predictive entropy"
MODEL_AVERAGE = PredictiveMode.MODEL_AVERAGE.value
ROUTING_AVERAGE = PredictiveMode.ROUTING_AVERAGE.value


@dataclass(frozen=True)
class DemoSettings:
    """Sizes of the demo run, checked when built (before any work).

    Attributes:
        steps: SVI steps per family.
        recipe_steps: SVI steps per recipe (``None``: each recipe's own).
        fit_examples: train questions the families are fitted on.
        examples: questions per evaluated split (test, near_ood, far_ood; ``None``: all) and of the
            calibration split used to choose expert Laplace's prior precision.
        stability_examples: test questions of the stability measurements.
        susceptible: the number of least stable layers made Bayesian.
        samples: S per prediction.
        draws: posterior draws of the ArviZ export and the collapse report.
        diagnostic_examples: held-out calibration questions of the ArviZ export and the collapse report.
        families: the guide families and recipes fitted (a recipe name runs the recipe).
        collapse: the method (one of ``families``) whose collapse report the demo writes.
        seed: seed of the fits, the noise and the sampling.
    """

    steps: int = 150
    recipe_steps: int | None = None
    fit_examples: int = 512
    examples: int | None = 300
    stability_examples: int = 100
    susceptible: int = 2
    samples: int = 8
    draws: int = 50
    diagnostic_examples: int = 50
    families: tuple[str, ...] = DEMO_FAMILIES
    collapse: str = "mfvr-iwae-layer"
    seed: int = 0

    def __post_init__(self) -> None:
        for name in (
            "steps",
            "fit_examples",
            "stability_examples",
            "susceptible",
            "samples",
            "draws",
            "diagnostic_examples",
        ):
            check_integer(name, getattr(self, name))
        check_count("examples", self.examples)
        check_count("recipe_steps", self.recipe_steps)
        check_integer("seed", self.seed, minimum=0)
        if self.collapse not in self.families:
            raise ConfigurationError(
                f"collapse names {self.collapse!r}, which is not among the families {self.families}."
            )


QUICK = DemoSettings(
    steps=12,
    recipe_steps=12,
    fit_examples=32,
    examples=40,
    stability_examples=10,
    samples=2,
    draws=4,
    diagnostic_examples=8,
)
"""The reduced demo the tests run: the same code path with few steps, questions and draws."""


def headline_rows(calibration: Any, ood: Any, stability: StabilityResults) -> list[dict[str, Any]]:
    """One row per method (``model-average`` for the families): accuracy, NLL, ECE on the test
    split, the mean Jaccard over the susceptible layers at the stability gamma, and the AUROC of the
    predictive entropy against each OoD split."""
    rows = []
    methods = [DETERMINISTIC, TEMPERATURE_SCALING] + [
        row["method"] for row in calibration.rows if row["mode"] == MODEL_AVERAGE
    ]
    for method in methods:
        mode = MODEL_AVERAGE if method not in (DETERMINISTIC, TEMPERATURE_SCALING) else "any"
        figures = calibration.row(method, mode)
        row = {"method": method, "accuracy": figures["accuracy"], "nll": figures["nll"], "ece": figures["ece"]}
        result = stability.stability.get(method if method != TEMPERATURE_SCALING else DETERMINISTIC)
        if result is not None:
            column = result.gamma_index(stability.gamma)
            means = [
                result.mean[i, column].item() for i, layer in enumerate(result.layers) if layer in stability.susceptible
            ]
            row["jaccard"] = sum(means) / len(means)
        for split in ood.ood_splits:
            aurocs = [
                r["auroc"]
                for r in ood.rows
                if r["method"] == method
                and r["mode"] == mode
                and r["ood_split"] == split
                and r["score"] == HEADLINE_SCORE
            ]
            if aurocs:
                row[f"auroc {split}"] = aurocs[0]
        rows.append(row)
    return rows


def headline_comparisons(calibration: Any, ood: Any) -> dict[str, dict[str, PairedComparison]]:
    """``{method: {column: PairedComparison}}`` of the headline rows against temperature scaling (the
    calibration experiment's and the OoD experiment's intervals; the AUROCs of the
    :data:`HEADLINE_SCORE` against temperature scaling's)."""
    found: dict[str, dict[str, PairedComparison]] = {}
    for (method, mode), comparisons in calibration.comparisons.items():
        if mode in ("any", MODEL_AVERAGE):
            found[method] = {metric: comparisons[metric] for metric in ("accuracy", "nll", "ece")}
    for (split, method, mode, score), comparison in ood.comparisons.items():
        if mode in ("any", MODEL_AVERAGE) and score == HEADLINE_SCORE:
            found.setdefault(method, {})[f"auroc {split}"] = comparison
    return found


def _report(
    settings: DemoSettings,
    headline: list[dict[str, Any]],
    comparisons: dict[str, dict[str, PairedComparison]],
    parts: dict[str, Path],
    stability: StabilityResults,
    recipes: dict[str, tuple[str, Path]],
    collapse_table: str,
    netcdf: Path,
    collapse_plot: Path,
) -> str:
    lines = [
        "# pyro-moe demo on the embedded benchmark",
        "",
        f"Bayesian layers (the {settings.susceptible} least stable of the deterministic model at gamma "
        f"{stability.gamma:g}): **{stability.susceptible}**; {settings.steps} SVI steps per family on "
        f"{settings.fit_examples} train questions (recipes: their own steps, their starting scale and "
        f"temperatures chosen on the first {settings.examples or 'all'} calibration questions); "
        f"S = {settings.samples}; evaluated on the first {settings.examples or 'all'} questions of each split. "
        "Expert Laplace puts its sites on the last layer's experts.",
        "",
        "## Headline",
        "",
        f"Test split, families under `{MODEL_AVERAGE}`; NLL in nats; ECE with equal-width bins; jaccard: mean "
        f"Jaccard of the Top-K sets over the Bayesian layers at gamma {stability.gamma:g} (routing-average; "
        f"blank for expert-weight sites; for per-token logit sites it is mostly the disagreement of two "
        f"independent S-sample selections, see the gamma 0 column below); AUROC of the {HEADLINE_SCORE} "
        "against each OoD split. Every figure but temperature scaling's shows its difference from temperature "
        "scaling on the same questions and the paired bootstrap 95% interval of that difference; on "
        f"{settings.examples or 'all'} test questions the intervals are wide: differences of a few thousandths "
        "of NLL are ties here (the recipe study measures on more questions).",
        "",
        markdown_table([interval_cells(row, comparisons.get(row["method"])) for row in headline], HEADLINE_COLUMNS),
        *(f"- {verdict_line(method, found)}" for method, found in comparisons.items()),
        "",
    ]
    for name, folder in parts.items():
        text = (folder / "report.md").read_text()
        text = text.replace("](", f"]({folder.name}/").replace("\n# ", "\n## ")
        lines += [f"## {name}", "", text.removeprefix("# ").split("\n", 1)[1], ""]
    for markdown, plot in recipes.values():  # each recipe's section, its title one level down
        lines += ["#" + markdown, f"![learned prior scales]({plot.name})", ""]
    lines += [
        "## Posterior inspection",
        "",
        f"ArviZ InferenceData of the mean-field weight posterior: `{netcdf.name}` (`az.from_netcdf`).",
        "",
        f"Collapse report of {settings.collapse} on held-out calibration questions:",
        "",
        collapse_table,
        f"![collapse report]({collapse_plot.name})",
        "",
    ]
    return "\n".join(lines)


def run_demo(
    out: str | Path,
    settings: DemoSettings = DemoSettings(),
    inputs: BenchmarkInputs | None = None,
    progress: bool = True,
) -> list[dict[str, Any]]:
    """Run the demo into ``out`` (see the module docstring); returns the headline rows.

    ``inputs`` default to the embedded benchmark (:func:`~pyro_moe.experiments.evaluation.benchmark_inputs`)."""
    out = Path(out)
    inputs = inputs or benchmark_inputs()
    model, tokenizer, splits, letters = inputs.model, inputs.tokenizer, inputs.splits, inputs.answer_token_ids
    seed, samples = settings.seed, settings.samples
    measured = StabilitySettings(
        examples=settings.stability_examples, k=settings.susceptible, num_samples=samples, seed=seed
    )
    fitting = FitSettings(
        examples=settings.fit_examples,
        steps=settings.steps,
        seed=seed,
        progress=progress,
        validation_examples=settings.examples,
    )
    calibration_settings = CalibrationSettings(num_samples=samples, test_examples=settings.examples, seed=seed)
    ood_settings = OoDSettings(num_samples=samples, examples=settings.examples, seed=seed)

    stability = stability_experiment(model, tokenizer, splits, {}, measured)
    fitting = replace(fitting, layers=stability.susceptible)
    families = [name for name in settings.families if name not in RECIPES]
    recipe_names = [name for name in settings.families if name in RECIPES]
    fitted = fit_named_families(model, tokenizer, splits, families, fitting, answer_token_ids=letters)
    recipes = {}
    if recipe_names:
        recipes = fit_named_recipes(
            model, tokenizer, splits, recipe_names, fitting, answer_token_ids=letters, steps=settings.recipe_steps
        )
    posteriors = {name: recipes[name].posterior if name in recipes else fitted[name] for name in settings.families}
    batches = split_batches(splits[measured.split], tokenizer, measured.batch_size, measured.examples)
    for name in settings.families:
        if ROUTING_AVERAGE in posterior_modes(posteriors[name], MODES):
            stability.stability[name] = posterior_stability(posteriors[name], batches, measured.gammas, samples, seed)
        else:
            stability.skipped.append(name)
    calibration = calibration_experiment(
        model, tokenizer, splits, posteriors, calibration_settings, answer_token_ids=letters
    )
    ood = ood_experiment(model, tokenizer, splits, posteriors, ood_settings, answer_token_ids=letters)

    out.mkdir(parents=True, exist_ok=True)
    parts = {"Routing stability": out / "stability", "Calibration": out / "calibration", "OoD detection": out / "ood"}
    for results, folder in zip((stability, calibration, ood), parts.values(), strict=True):
        write_results(results, folder)

    held_out = split_batches(splits["calibration"], tokenizer, 50, settings.diagnostic_examples)
    netcdf = out / "posterior_mean-field.nc"
    idata = to_inference_data(posteriors["mean-field"], held_out, num_draws=settings.draws, seed=seed)
    write_atomically(netcdf, idata.to_netcdf)
    collapse = collapse_report(
        posteriors[settings.collapse],
        held_out,
        num_draws=settings.draws,
        local_draws=2,
        summary_draws=settings.draws,
        seed=seed,
    )
    write_atomically(
        out / f"collapse_{slug(settings.collapse)}.csv", lambda path: collapse.table.to_csv(path, index=False)
    )
    collapse_plot = collapse.plot(out / f"collapse_{slug(settings.collapse)}.png")
    columns = ["site", "sd_ratio", "kl_per_dimension", "active_fraction", "deterministic", "prior_collapse"]
    collapse_rows = collapse.table[[c for c in columns if c in collapse.table]].to_dict("records")
    collapse_table = markdown_table(collapse_rows, [c for c in columns if c in collapse.table])

    recipe_parts = {}
    for name, result in recipes.items():
        write_text_atomically(out / f"recipe_{slug(name)}.json", json.dumps(result.to_json(), indent=2) + "\n")
        recipe_parts[name] = (result.to_markdown(), result.plot(out / f"recipe_{slug(name)}_scales.png"))
    headline = headline_rows(calibration, ood, stability)
    comparisons = headline_comparisons(calibration, ood)
    intervals = [
        {"method": method, "column": column, **comparison.to_json()}
        for method, found in comparisons.items()
        for column, comparison in found.items()
    ]
    write_text_atomically(
        out / "headline.json",
        json.dumps({"settings": asdict(settings), "rows": headline, "comparisons": intervals}, indent=2) + "\n",
    )
    report = _report(
        settings, headline, comparisons, parts, stability, recipe_parts, collapse_table, netcdf, collapse_plot
    )
    write_text_atomically(out / "report.md", report)
    return headline
