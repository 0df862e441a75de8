"""``pyro-moe evaluate`` and ``pyro-moe compare``: calibration (and OoD detection with ``--ood-data``) of a saved
posterior or of guide families fitted on the spot, against the deterministic model and temperature scaling;
``evaluate --text``: the held-out perplexity of a saved posterior and of the deterministic model."""

from __future__ import annotations

import argparse
import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pyro_moe.cli.errors import BadInput
from pyro_moe.cli.inputs import Inputs, check_path, load_inputs, load_text_inputs, text_batches_of
from pyro_moe.cli.options import (
    add_allow_other_model,
    add_common,
    add_data_options,
    add_model_options,
    add_posterior_options,
)
from pyro_moe.cli.posterior import check_guides, fit_guides, parse_sites, resolve_layers
from pyro_moe.cli.settings import CommandEntry, DataOptions, FittingOptions, ModelOptions, RunOptions

__all__ = ["EvaluateOptions", "add_parser", "evaluate_text", "run_evaluate"]


@dataclass(frozen=True)
class EvaluateOptions:
    """``evaluate`` and ``compare``: the model, the calibration and test (and OoD) data, the ``--guides`` to fit
    with the ``fitting`` options, and (``evaluate``) a saved ``--posterior`` with ``--allow-other-model``;
    ``draws``: ``per-batch`` or ``per-question`` (the lm-eval model's draws)."""

    run: RunOptions
    model: ModelOptions
    data: DataOptions
    fitting: FittingOptions
    draws: str = "per-batch"
    guides: tuple[str, ...] | None = None
    posterior: Path | None = None
    allow_other_model: bool = False


def add_parser(commands: argparse._SubParsersAction) -> None:
    """Adds ``evaluate`` and ``compare`` and their options."""
    for name, text in (
        ("evaluate", "calibration and OoD of a saved posterior or fitted guides vs deterministic and temperature"),
        ("compare", "calibration and OoD of several guide families side by side"),
    ):
        command = commands.add_parser(name, help=text)
        add_model_options(command)
        held_out = "plain-text file, one document per line: held-out perplexity of --posterior instead"
        add_data_options(command, ood=True, text=held_out if name == "evaluate" else None)
        add_posterior_options(command, guide=False)
        command.add_argument(
            "--guides", nargs="+", help="guide families to fit, e.g. mean-field mfvr swag (an unknown name lists all)"
        )
        if name == "evaluate":
            command.add_argument("--posterior", type=Path, help="a posterior folder written by pyro-moe fit")
            add_allow_other_model(command)
        command.add_argument(
            "--draws",
            choices=("per-batch", "per-question"),
            default="per-batch",
            help="per-batch (default): one seeded stream of posterior draws over the batches; per-question: "
            "every question predicted alone (batch 1) with a seed from --seed and its prompt tokens, which "
            "reproduces the draws of `pyro-moe lm-eval` (the harness model) on the same questions and --seed",
        )
        add_common(command, "S, posterior samples per prediction (default 16)")
        command.set_defaults(run=CommandEntry(EvaluateOptions, run_evaluate), samples=16)


def _posteriors(options: EvaluateOptions, inputs: Inputs, guides: list[str]) -> dict[str, Any]:
    """The saved ``--posterior`` (on its own copy of the model) and the ``guides`` fitted by name."""
    from pyro_moe.inference.fitting import FittedPosterior

    posteriors: dict[str, Any] = {}
    if options.posterior is not None:
        check_path(options.posterior, "posterior")
        posteriors["posterior"] = FittedPosterior.load(
            options.posterior, copy.deepcopy(inputs.model), allow_other_model=options.allow_other_model
        )
    if guides:
        layers = resolve_layers(options.fitting, inputs, options.data, options.run.seed)
        posteriors.update(fit_guides(inputs, guides, layers, options.fitting, options.data, options.run.seed))
    return posteriors


def evaluate_text(options: EvaluateOptions) -> None:
    """``evaluate --text``: held-out perplexity of ``--posterior`` (both modes where it has them) and of
    the deterministic model on the first ``--examples`` documents, written as ``perplexity/``."""
    from pyro_moe.experiments.evaluation import PredictionSettings, write_results
    from pyro_moe.experiments.perplexity import perplexity_experiment
    from pyro_moe.inference.fitting import FittedPosterior

    if options.guides:
        raise BadInput(
            "evaluate --text measures a saved --posterior (fit one with pyro-moe fit --text); --guides fits on "
            "MCQA questions."
        )
    if options.posterior is None:
        raise BadInput("evaluate --text needs --posterior (a folder written by pyro-moe fit).")
    if options.draws != "per-batch":
        raise BadInput("--draws per-question is for MCQA questions; evaluate --text draws per batch.")
    check_path(options.posterior, "posterior")
    settings = PredictionSettings(num_samples=options.run.samples, seed=options.run.seed)
    inputs = load_text_inputs(options.model, options.data)
    batches = text_batches_of(inputs, options.data, options.data.examples)
    model = copy.deepcopy(inputs.model)
    posterior = FittedPosterior.load(options.posterior, model, allow_other_model=options.allow_other_model)
    results = perplexity_experiment(inputs.model, batches, {"posterior": posterior}, settings)
    paths = write_results(results, options.run.out / "perplexity")
    print(results.to_markdown())
    print("written:", paths["metrics"], paths["report"])


def run_evaluate(options: EvaluateOptions) -> None:
    """``evaluate`` and ``compare``: calibration, and OoD detection when there are OoD splits; ``evaluate
    --text``: held-out perplexity (:func:`evaluate_text`)."""
    from pyro_moe.experiments.calibration import CalibrationSettings, calibration_experiment
    from pyro_moe.experiments.evaluation import write_results
    from pyro_moe.experiments.ood import OoDSettings, ood_experiment

    if options.data.text is not None:
        evaluate_text(options)
        return
    command, out = options.run.command, options.run.out
    guides = check_guides(options.guides or [])
    parse_sites(options.fitting)
    if command == "compare" and len(guides) < 2:
        raise BadInput("compare needs at least two --guides, e.g. --guides mean-field mfvr swag.")
    if command == "evaluate" and options.posterior is None and not guides:
        raise BadInput("evaluate needs --posterior (a folder written by pyro-moe fit) or --guides to fit.")
    inputs = load_inputs(options.model, options.data, ["calibration", "test"])
    ood_splits = [name for name in inputs.splits if "ood" in name]
    posteriors = _posteriors(options, inputs, guides)
    common = {
        "num_samples": options.run.samples,
        "batch_size": options.data.batch_size,
        "seed": options.run.seed,
        "draws": options.draws,
    }
    calibration = calibration_experiment(
        inputs.model,
        inputs.tokenizer,
        inputs.splits,
        posteriors,
        CalibrationSettings(test_examples=options.data.examples, **common),
        answer_token_ids=inputs.answer_token_ids,
    )
    paths = [write_results(calibration, out / "calibration")["report"]]
    if ood_splits:
        ood = ood_experiment(
            inputs.model,
            inputs.tokenizer,
            inputs.splits,
            posteriors,
            OoDSettings(ood_splits=ood_splits, examples=options.data.examples, **common),
            answer_token_ids=inputs.answer_token_ids,
        )
        paths.append(write_results(ood, out / "ood")["report"])
    print(calibration.to_markdown())
    print("written:", *paths)
