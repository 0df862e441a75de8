"""The objective study: the plain ELBO against the importance-weighted bound with learned prior scales.

On the embedded benchmark, per-token router logits of every layer get a Normal prior around the
deterministic logits and an amortized ``mfvr`` guide that starts at that prior (zero residual,
the prior's scale). Two fits on the calibration split, same data, steps and seed:

* ``elbo``: the plain ELBO with the prior scale fixed. The ELBO scores the expected
  log-likelihood of single draws and ignores the diversity that model averaging turns into
  calibration; its optimum keeps the guide at the prior (``KL(q || p)`` near zero): collapse to
  the prior.
* ``iwae``: the per-example importance-weighted bound (K particles) with the prior scales learned
  per layer (empirical Bayes): the bound scores the K-draw Monte Carlo predictive, so the data
  decide how random the routing is.

Both are compared with the deterministic model and with the unfitted prior (the prior at its
initial scale, no guide) on held-out test questions under ``model-average``, and checked with
:func:`pyro_moe.diagnostics.collapse.collapse_report`.

Example::

    study = run_objective_study(load_benchmark, ObjectiveStudySettings(steps=150))
    study.table                      # one row per predictor: accuracy, nll, ece, brier, flags
    study.write("runs/objectives")   # metrics.json, report.md, elbo.png, collapse_<case>.png

    python -m pyro_moe.experiments.objectives --out runs/objectives
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import pyro
import torch
from torch import Tensor

from pyro_moe.data import mcqa_batches
from pyro_moe.diagnostics.collapse import CollapseReport, collapse_report
from pyro_moe.errors import ConfigurationError
from pyro_moe.evaluation.metrics import calibration_report
from pyro_moe.experiments.benchmark_model import LoadedBenchmark, answer_probabilities
from pyro_moe.experiments.guide_comparison import plot_elbo_curves
from pyro_moe.inference.fitting import FittedPosterior, fit
from pyro_moe.inference.predictive import predict
from pyro_moe.models.router_patch import patch_routers
from pyro_moe.validation import check_integer, check_number

__all__ = ["ObjectiveStudy", "ObjectiveStudySettings", "main", "run_objective_study"]

CASES = ("elbo", "iwae")
"""The fitted cases: the plain ELBO with a fixed prior scale, the importance-weighted bound with learned scales."""


@dataclass(frozen=True)
class ObjectiveStudySettings:
    """What the study fits and evaluates.

    Attributes:
        prior_scale: the logit prior's (initial) standard deviation, also the guide's initial scale.
        layers: the Bayesian layers (as :func:`pyro_moe.patch_routers` takes them).
        train_examples: questions of the calibration split the posteriors are fitted on.
        test_examples: questions of the test split they are evaluated on.
        batch_size: minibatch size of the fits and of evaluation.
        steps: SVI steps per fit.
        lr: Adam step size.
        num_particles: K of the importance-weighted bound.
        num_samples: S joint draws of the ``model-average`` predictive (and of the collapse
            report's ``az.summary``).
        collapse_batches: test batches the collapse report runs on.
        seed: seeds the fits and the predictive draws.
    """

    prior_scale: float = 0.3
    layers: str | tuple[int, ...] = "all"
    train_examples: int = 1000
    test_examples: int = 1000
    batch_size: int = 50
    steps: int = 300
    lr: float = 0.05
    num_particles: int = 4
    num_samples: int = 16
    collapse_batches: int = 4
    seed: int = 0

    def __post_init__(self) -> None:
        for name in (
            "train_examples",
            "test_examples",
            "batch_size",
            "steps",
            "num_particles",
            "num_samples",
            "collapse_batches",
        ):
            check_integer(name, getattr(self, name))
        for name in ("prior_scale", "lr"):
            check_number(name, getattr(self, name))


@dataclass
class ObjectiveStudy:
    """What :func:`run_objective_study` returns.

    Attributes:
        table: one row per predictor (``deterministic``, ``prior``, ``elbo``, ``iwae``):
            ``accuracy, nll, ece, mce, brier, confidence`` on the test questions, the fitted
            ``prior_scales`` (per layer), the smallest ``kl_per_dimension`` over the sites, and
            the collapse flags ``prior_collapse`` and ``deterministic`` (any site).
        posteriors: the two fits, each on its own copy of the model (still patched).
        collapse: the collapse report of each fit on the first test batches.
        settings: the settings of the run.
    """

    table: pd.DataFrame
    posteriors: dict[str, FittedPosterior]
    collapse: dict[str, CollapseReport]
    settings: ObjectiveStudySettings

    def to_json(self) -> dict[str, Any]:
        """The table, the settings and the collapse tables as plain JSON values."""
        return {
            "settings": dataclasses.asdict(self.settings),
            "predictors": json.loads(self.table.to_json(orient="index")),
            "collapse": {
                case: json.loads(report.table.to_json(orient="records")) for case, report in self.collapse.items()
            },
        }

    def to_markdown(self) -> str:
        """The predictors' table as Markdown (figures to three decimals)."""
        columns = ["accuracy", "nll", "ece", "brier", "kl_per_dimension", "prior_collapse", "prior_scales"]
        lines = ["| predictor | " + " | ".join(columns) + " |", "| --- |" + " ---: |" * len(columns)]
        for name, row in self.table.iterrows():
            cells = []
            for column in columns:
                value = row[column]
                if isinstance(value, float):
                    cells.append(f"{value:.3f}")
                elif isinstance(value, list):
                    cells.append(", ".join(f"{v:.2f}" for v in value))
                else:
                    cells.append("" if value is None else str(value))
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
        return "\n".join(lines) + "\n"

    def write(self, folder: str | Path) -> dict[str, Path]:
        """Write ``metrics.json``, ``report.md``, ``elbo.png`` (both fits' loss curves) and
        ``collapse_<case>.png`` into ``folder``; returns the paths."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        paths = {"metrics": folder / "metrics.json", "report": folder / "report.md"}
        paths["metrics"].write_text(json.dumps(self.to_json(), indent=2) + "\n")
        title = "# Plain ELBO against the importance-weighted bound with learned prior scales\n\n"
        paths["report"].write_text(title + self.to_markdown())
        paths["elbo"] = plot_elbo_curves(
            {case: posterior.history for case, posterior in self.posteriors.items()}, folder / "elbo.png"
        )
        for case, report in self.collapse.items():
            paths[f"collapse_{case}"] = report.plot(folder / f"collapse_{case}.png")
        return paths


def _probabilities(
    answer: Callable[[Tensor, Tensor], Tensor], batches: Sequence[Mapping[str, Tensor]], seed: int
) -> Tensor:
    pyro.set_rng_seed(seed)
    with torch.no_grad():
        return torch.cat([answer(batch["input_ids"], batch["attention_mask"]) for batch in batches])


def run_objective_study(
    load: Callable[[], LoadedBenchmark], settings: ObjectiveStudySettings | None = None, progress: bool = False
) -> ObjectiveStudy:
    """Fit both cases and evaluate them against the deterministic model and the unfitted prior.

    Args:
        load: returns a fresh copy of the benchmark (one per fit, so both stay patched), e.g.
            :func:`pyro_moe.experiments.benchmark_model.load_benchmark`.
        settings: what to fit and evaluate (default :class:`ObjectiveStudySettings`).
        progress: show the fits' progress bars.
    """
    settings = settings or ObjectiveStudySettings()
    loaded = load()
    splits, tokenizer, letters = loaded.benchmark.splits, loaded.tokenizer, loaded.answer_token_ids
    for split, wanted in (("calibration", settings.train_examples), ("test", settings.test_examples)):
        if wanted > len(splits[split]):
            raise ConfigurationError(f"the {split} split has {len(splits[split])} questions, {wanted} were asked.")
    train = list(mcqa_batches(splits["calibration"][: settings.train_examples], tokenizer, settings.batch_size))
    test_examples = splits["test"][: settings.test_examples]
    test = list(mcqa_batches(test_examples, tokenizer, settings.batch_size))
    labels = torch.cat([batch["labels"] for batch in test])
    layers = settings.layers if isinstance(settings.layers, str) else list(settings.layers)

    probs = {"deterministic": answer_probabilities(loaded.model, tokenizer, test_examples, settings.batch_size)}
    handle = patch_routers(loaded.model, {"logits": settings.prior_scale}, layers=layers)
    try:
        probs["prior"] = _probabilities(
            lambda ids, mask: (
                predict(handle, ids, mask, answer_token_ids=letters, num_samples=settings.num_samples).probs
            ),
            test,
            settings.seed,
        )
    finally:
        handle.unpatch()

    guide_options = {"mfvr": {"init_scale": settings.prior_scale}}  # the guide starts at the prior
    common = dict(steps=settings.steps, lr=settings.lr, seed=settings.seed, progress=progress)
    posteriors, reports = {}, {}
    for case in CASES:
        model = load().model
        mode = "fixed" if case == "elbo" else "learned"
        patch = patch_routers(model, {"logits": {"scale": settings.prior_scale, "mode": mode}}, layers=layers)
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
        probs[case] = _probabilities(
            lambda ids, mask, p=posterior: p.predict(ids, mask, num_samples=settings.num_samples).probs,
            test,
            settings.seed,
        )
        reports[case] = collapse_report(
            posterior, test[: settings.collapse_batches], summary_draws=settings.num_samples, seed=settings.seed
        )

    rows = {}
    for name, predicted in probs.items():
        row: dict[str, Any] = calibration_report(predicted, labels)
        row.update(prior_scales=None, kl_per_dimension=None, prior_collapse=None, deterministic=None)
        if name in posteriors:
            table = reports[name].table
            row["kl_per_dimension"] = float(table["kl_per_dimension"].min())
            row["prior_collapse"] = bool(table["prior_collapse"].any())
            row["deterministic"] = bool(table["deterministic"].any())
            row["prior_scales"] = _prior_scales(posteriors[name], settings.prior_scale)
        rows[name] = row
    return ObjectiveStudy(pd.DataFrame.from_dict(rows, orient="index"), posteriors, reports, settings)


def _prior_scales(posterior: FittedPosterior, fixed: float) -> list[float]:
    """The logit prior's scale per Bayesian layer: learned ones from the fit (their mean over experts)."""
    learned = posterior.prior_scales()
    sites = [router.site_name("logits") for router in posterior.patch.routers.values()]
    return [float(learned[site].mean()) if site in learned else fixed for site in sites]


def main(argv: Sequence[str] | None = None) -> None:
    """Run the study on the embedded benchmark and write its files."""
    from pyro_moe.experiments.benchmark_model import load_benchmark

    defaults = ObjectiveStudySettings()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("runs/objectives"), help="folder of the results")
    parser.add_argument("--prior-scale", type=float, default=defaults.prior_scale, help="initial logit prior scale")
    parser.add_argument("--steps", type=int, default=defaults.steps, help="SVI steps per fit")
    parser.add_argument("--lr", type=float, default=defaults.lr, help="Adam step size")
    parser.add_argument("--particles", type=int, default=defaults.num_particles, help="K of the iwae bound")
    parser.add_argument("--train-examples", type=int, default=defaults.train_examples, help="calibration questions")
    parser.add_argument("--test-examples", type=int, default=defaults.test_examples, help="test questions")
    parser.add_argument("--samples", type=int, default=defaults.num_samples, help="predictive draws")
    parser.add_argument("--seed", type=int, default=defaults.seed, help="seed of the fits and draws")
    args = parser.parse_args(argv)
    settings = ObjectiveStudySettings(
        prior_scale=args.prior_scale,
        train_examples=args.train_examples,
        test_examples=args.test_examples,
        steps=args.steps,
        lr=args.lr,
        num_particles=args.particles,
        num_samples=args.samples,
        seed=args.seed,
    )
    study = run_objective_study(load_benchmark, settings, progress=True)
    paths = study.write(args.out)
    print(study.to_markdown())
    print("written:", ", ".join(str(path) for path in paths.values()))


if __name__ == "__main__":
    main()
