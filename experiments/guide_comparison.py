"""Guide and prior comparison: the same model fitted with several guide families and priors.

For every :class:`GuideCase` (sites with their priors, a guide, an objective) the model is patched
afresh and fitted on the same training batches; the comparison then reports, per case:

* the final ELBO (minus the mean loss of the last tenth of the steps; ``iwae`` cases report
  their bound, ``map`` cases the log joint at the mode, which lacks the entropy term and is not
  comparable; NaN for a family with nothing to train, ``temp-sampling``) and the ELBO curves of all cases on one plot;
* held-out accuracy, NLL and ECE of ``model-average`` predictions, each beside its difference from
  the deterministic model (the unpatched model) on the same questions and the paired bootstrap 95%
  interval of that difference (columns ``<metric> vs deterministic``, e.g.
  ``0.526 (-0.016 [-0.024, -0.009])``; :attr:`GuideComparison.comparisons` holds them with their
  verdicts, :mod:`pyro_moe.evaluation.bootstrap`);
* PSIS-LOO on the training data from the pointwise log-likelihood, with the Pareto ``k``
  diagnostic (maximum and number above 0.7), ranked by ``az.compare`` (stacking weights). Cases
  whose model has only global sites use the importance-corrected ratios
  ``log p(theta, y) - log q(theta) - log p(y_i | theta)`` (the guide's density is available);
  cases with per-token sites treat ``q`` as the posterior (plain PSIS-LOO): the column
  ``loo_method`` says which. A point-mass guide, or one far from the posterior in many
  dimensions, gives Pareto ``k`` above 0.7 (up to ``inf``) under the correction: the diagnostic
  then says that ``q`` cannot be importance-weighted into the posterior;
* a forest plot of the same sites across the cases.

All ArviZ calls go through :mod:`pyro_moe.diagnostics.arviz_export`.

Example::

    cases = [
        GuideCase("mean-field", {"weight": 0.05, "temperature": 0.3}, "mean-field"),
        GuideCase("low-rank", {"weight": 0.05, "temperature": 0.3}, "low-rank"),
        GuideCase("laplace prior", {"weight": {"family": "laplace", "scale": 0.05}, "temperature": 0.3}, "mean-field"),
    ]
    comparison = compare_guides(make_model, cases, train, test, answer_token_ids=letters, layers=[2], steps=200)
    comparison.table                       # one row per case
    comparison.write("runs/guides", forest_variables=["temperature"])

    python -m pyro_moe.experiments.guide_comparison --out runs/guides   # on the embedded benchmark
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import pyro
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from torch import Tensor, nn

from pyro_moe.atomic_files import write_atomically
from pyro_moe.diagnostics.arviz_export import compare, loo, plot_forest, to_inference_data
from pyro_moe.errors import ConfigurationError
from pyro_moe.evaluation.bootstrap import BootstrapSettings, PairedComparison, compare_calibration
from pyro_moe.evaluation.metrics import accuracy, expected_calibration_error, negative_log_likelihood
from pyro_moe.experiments.evaluation import DETERMINISTIC, deterministic_logits
from pyro_moe.inference.fitting import fit
from pyro_moe.models.router_patch import patch_routers
from pyro_moe.validation import check_integer

__all__ = ["GuideCase", "GuideComparison", "compare_guides", "main", "plot_elbo_curves"]

COMPARED = ("accuracy", "nll", "ece")
"""The held-out metrics compared with the deterministic model."""

PARETO_K_LIMIT = 0.7
"""Pareto ``k`` above which a PSIS-LOO term is unreliable (Vehtari et al., 2024)."""


@dataclass(frozen=True)
class GuideCase:
    """One fit of the comparison.

    Attributes:
        name: the label in tables and plots.
        sites: what is random and the priors (as :func:`pyro_moe.patch_routers` takes them).
        guide: the guide's name (see :mod:`pyro_moe.guides.registry`).
        objective: ``"elbo"`` or ``"iwae"``.
        options: further keyword arguments of :func:`pyro_moe.fit` (``num_particles``, ``lr``, ...).
        selection: ``"top-k"`` or ``"sample-k"`` (``temp-sampling`` needs the latter).
    """

    name: str
    sites: Mapping[str, Any]
    guide: str
    objective: str = "elbo"
    options: Mapping[str, Any] = field(default_factory=dict)
    selection: str = "top-k"


@dataclass
class GuideComparison:
    """What :func:`compare_guides` returns.

    Attributes:
        table: one row per case: ``guide, objective, final_elbo, accuracy, nll, ece, elpd_loo,
            elpd_loo_se, p_loo, max_pareto_k, bad_pareto_k, loo_method`` and, per metric of
            :data:`COMPARED`, ``<metric> vs deterministic`` (value, difference and interval).
        ranking: ``az.compare`` of the cases' LOO estimates (best first).
        exports: the cases' ``InferenceData`` (log-likelihood on the training data).
        histories: the cases' ELBO traces.
        comparisons: ``{case: {metric: PairedComparison}}`` against the deterministic model.
        probs: ``{case or "deterministic": (examples, choices)}`` held-out probabilities.
        labels: ``(examples,)`` held-out labels.
    """

    table: pd.DataFrame
    ranking: pd.DataFrame
    exports: dict[str, Any]
    histories: dict[str, list[dict[str, float]]]
    comparisons: dict[str, dict[str, PairedComparison]]
    probs: dict[str, Tensor]
    labels: Tensor

    def write(self, folder: str | Path, forest_variables: Sequence[str]) -> dict[str, Path]:
        """Write ``table.csv``, ``ranking.csv``, ``forest.png`` (``forest_variables`` across the
        cases that have them) and ``elbo.png`` into ``folder``; returns the paths."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        paths = {"table": folder / "table.csv", "ranking": folder / "ranking.csv"}
        write_atomically(paths["table"], self.table.to_csv)
        write_atomically(paths["ranking"], self.ranking.to_csv)
        having = {
            name: export
            for name, export in self.exports.items()
            if all(variable in export.posterior.data_vars for variable in forest_variables)
        }
        if not having:
            raise ConfigurationError(f"no case has the posterior variables {list(forest_variables)} to plot.")
        title = f"{', '.join(forest_variables)} across guides and priors"
        paths["forest"] = plot_forest(having, folder / "forest.png", forest_variables, title)
        paths["elbo"] = plot_elbo_curves(self.histories, folder / "elbo.png")
        return paths


def plot_elbo_curves(histories: Mapping[str, Sequence[Mapping[str, float]]], path: str | Path) -> Path:
    """The ELBO (minus the loss) of every case against the step, on one plot (PNG); returns its path."""
    path = Path(path)
    if path.suffix.lower() != ".png":
        raise ConfigurationError(f"the ELBO plot is written as PNG: the path must end in .png, got {str(path)!r}.")
    if not histories:
        raise ConfigurationError("no ELBO trace to plot.")
    figure = Figure(figsize=(8, 5 + 0.2 * len(histories)), layout="constrained")
    axis = figure.add_subplot()
    for name, history in histories.items():
        axis.plot([record["step"] for record in history], [-record["loss"] for record in history], label=name)
    axis.set_title("ELBO during training (iwae cases: their bound)")
    axis.set_xlabel("SVI step")
    axis.set_ylabel("ELBO (nats, full-data estimate)")
    axis.grid(alpha=0.3)
    figure.legend(loc="outside lower center", ncols=min(len(histories), 3))  # below the axes, off the curves
    path.parent.mkdir(parents=True, exist_ok=True)
    FigureCanvasAgg(figure)
    write_atomically(path, lambda temporary: figure.savefig(temporary, dpi=120))
    return path


def compare_guides(
    model_factory: Callable[[], nn.Module],
    cases: Sequence[GuideCase],
    train: Sequence[Mapping[str, Tensor]],
    test: Sequence[Mapping[str, Tensor]],
    *,
    answer_token_ids: Tensor | Sequence[int],
    layers: str | Sequence[int] = "all",
    steps: int = 200,
    num_draws: int = 64,
    seed: int = 0,
    progress: bool = False,
    bootstrap: BootstrapSettings = BootstrapSettings(),
) -> GuideComparison:
    """Fit every case on ``train`` and compare them; see the module docstring.

    Args:
        model_factory: returns a fresh, unpatched copy of the model (one per case).
        cases: at least two, with distinct names.
        train, test: batches (``input_ids``, ``attention_mask``, ``labels``).
        answer_token_ids: ``(choices,)`` token ids of the answer letters.
        layers: the Bayesian layers (as :func:`pyro_moe.patch_routers` takes them).
        steps: SVI steps per case.
        num_draws: posterior draws for the held-out predictions and LOO.
        seed: the fits' seed.
        progress: show the fits' progress bars.
        bootstrap: resamples, level and seed of the intervals against the deterministic model.
    """
    names = [case.name for case in cases]
    if len(cases) < 2 or len(set(names)) != len(names):
        raise ConfigurationError(f"give at least two cases with distinct names, got {names}.")
    check_integer("num_draws", num_draws)  # before the first fit, not when its predictions start
    labels = torch.cat([batch["labels"] for batch in test])
    letters = torch.as_tensor(answer_token_ids)
    reference = deterministic_logits(model_factory(), test, letters).float().softmax(-1)
    rows, exports, histories, elpds, comparisons = {}, {}, {}, {}, {}
    every_probs = {DETERMINISTIC: reference}
    for case in cases:
        handle = patch_routers(model_factory(), case.sites, layers=layers, selection=case.selection)
        try:
            options = {"objective": case.objective, "seed": seed, "progress": progress, **case.options}
            posterior = fit(handle, train, case.guide, answer_token_ids=answer_token_ids, steps=steps, **options)
            pyro.set_rng_seed(seed)
            probs = torch.cat(
                [posterior.predict(b["input_ids"], b["attention_mask"], num_samples=num_draws).probs for b in test]
            )
            export = to_inference_data(posterior, train, num_draws=num_draws, seed=seed)
        finally:
            handle.unpatch()
        corrected = "lp" in export.sample_stats
        elpd = loo(export, importance_corrected=corrected)
        pareto_k = elpd["pareto_k"].values
        tail = posterior.history[-max(1, len(posterior.history) // 10) :]
        probs = probs.float().cpu()
        every_probs[case.name] = probs
        found = compare_calibration(
            probs, reference, labels, baseline=DETERMINISTIC, metrics=COMPARED, settings=bootstrap
        )
        comparisons[case.name] = found
        rows[case.name] = {
            "guide": case.guide,
            "objective": case.objective,
            "final_elbo": -sum(record["loss"] for record in tail) / len(tail) if tail else math.nan,  # no steps
            "accuracy": accuracy(probs, labels),
            "nll": negative_log_likelihood(probs, labels),
            "ece": expected_calibration_error(probs, labels),
            "elpd_loo": float(elpd["elpd_loo"]),
            "elpd_loo_se": float(elpd["se"]),
            "p_loo": float(elpd["p_loo"]),
            "max_pareto_k": float(pareto_k.max()) if len(pareto_k) else math.nan,
            "bad_pareto_k": int((pareto_k > PARETO_K_LIMIT).sum()),
            "loo_method": "importance-corrected PSIS-LOO" if corrected else "PSIS-LOO, q as the posterior",
            **{f"{metric} vs {DETERMINISTIC}": comparison.format() for metric, comparison in found.items()},
        }
        exports[case.name], histories[case.name], elpds[case.name] = export, list(posterior.history), elpd
    table = pd.DataFrame.from_dict(rows, orient="index")
    return GuideComparison(table, compare(elpds), exports, histories, comparisons, every_probs, labels.cpu())


BENCHMARK_CASES = (
    GuideCase("mean-field, normal", {"weight": 0.05, "temperature": 0.3}, "mean-field"),
    GuideCase("low-rank, normal", {"weight": 0.05, "temperature": 0.3}, "low-rank"),
    GuideCase(
        "mean-field, laplace", {"weight": {"family": "laplace", "scale": 0.05}, "temperature": 0.3}, "mean-field"
    ),
    GuideCase(
        "mean-field, student-t",
        {"weight": {"family": "student-t", "family_params": {"df": 3.0}, "scale": 0.05}, "temperature": 0.3},
        "mean-field",
    ),
)
"""The cases :func:`main` runs on the embedded benchmark (global sites, so LOO is importance-corrected)."""


def main(argv: Sequence[str] | None = None) -> None:
    """Run :data:`BENCHMARK_CASES` on the embedded benchmark model and write the results."""
    from pyro_moe.experiments.benchmark_model import load_benchmark  # the checkpoint ships separately

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("runs/guide_comparison"))
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--draws", type=int, default=64)
    parser.add_argument("--train-examples", type=int, default=256)
    parser.add_argument("--layers", type=int, nargs="+", default=[-1])
    args = parser.parse_args(argv)
    from pyro_moe.data import answer_token_ids, mcqa_batches

    loaded = load_benchmark()
    letters = answer_token_ids(loaded.tokenizer)
    splits = loaded.benchmark.splits
    train = list(mcqa_batches(splits["train"][: args.train_examples], loaded.tokenizer, batch_size=32))
    test = list(mcqa_batches(splits["test"], loaded.tokenizer, batch_size=32))
    comparison = compare_guides(
        lambda: load_benchmark().model,
        BENCHMARK_CASES,
        train,
        test,
        answer_token_ids=letters,
        layers=args.layers,
        steps=args.steps,
        num_draws=args.draws,
        progress=True,
    )
    paths = comparison.write(args.out, forest_variables=["temperature"])
    print(comparison.table.to_string())
    print(comparison.ranking.to_string())
    print("written:", ", ".join(str(path) for path in paths.values()))


if __name__ == "__main__":
    main()
