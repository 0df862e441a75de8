"""``pyro-moe fit`` and ``pyro-moe laplace``: one guide family fitted (SVI, or post-hoc for the Laplace families)
and saved as ``posterior/``; on MCQA questions, or with ``--text`` on plain text (the next-token likelihood);
``fit --recipe``: a recipe by name (:func:`run_recipe`). Both write run checkpoints into
``--out/checkpoint`` and continue one with ``--resume``."""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pyro_moe.atomic_files import remove_folder, write_text_atomically
from pyro_moe.cli.errors import BadInput
from pyro_moe.cli.inputs import load_inputs, load_text_inputs, text_batches_of
from pyro_moe.cli.options import (
    add_common,
    add_data_options,
    add_model_options,
    add_posterior_options,
    integer,
    positive_number,
)
from pyro_moe.cli.posterior import check_guides, fit_guides, fixed_layers, guide_steps, parse_sites, resolve_layers
from pyro_moe.cli.settings import CommandEntry, DataOptions, FittingOptions, ModelOptions, RunOptions

if TYPE_CHECKING:
    from pyro_moe.inference.fitting import FittedPosterior
    from pyro_moe.inference.resume import CheckpointOptions

__all__ = [
    "CHECKPOINT_MINUTES",
    "CHECKPOINT_NAME",
    "CHECKPOINT_STEPS",
    "MIN_ROWS",
    "RESUMABLE_OPTIONS",
    "FitEntry",
    "FitOptions",
    "add_parser",
    "model_record",
    "recorded_options",
    "run_checkpoint",
    "run_fit",
    "run_recipe",
]

CHECKPOINT_NAME = "checkpoint"
"""``fit`` and ``laplace`` write their run checkpoints into ``--out/checkpoint``."""
MIN_ROWS = 4
"""``--min-rows`` default: the fewest usable training rows (questions or documents) a fit accepts."""
CHECKPOINT_STEPS = 100
"""``--checkpoint-every`` default (:data:`pyro_moe.inference.resume.CHECKPOINT_STEPS`; the parser imports no torch)."""
CHECKPOINT_MINUTES = 5
"""The time cadence of the checkpoints (:data:`pyro_moe.inference.resume.CHECKPOINT_SECONDS`), for the help."""
RESUMABLE_OPTIONS = ("checkpoint_every", "device", "device_map", "timeout")
"""Options a ``--resume`` may change (besides ``--resume`` and ``--out``): they do not change what is fitted."""


@dataclass(frozen=True)
class FitOptions:
    """``fit`` and ``laplace``: the model, the training data and how the guide is fitted; ``--guide`` or
    ``--recipe`` with its ``--calibration-examples``, ``--scale`` or ``--scale-grid`` and ``--selection``; the
    checkpoints (``--checkpoint-every``, ``--resume``); ``recorded``: the options that decide what is fitted, as
    the checkpoint keeps them (:func:`recorded_options`)."""

    run: RunOptions
    model: ModelOptions
    data: DataOptions
    fitting: FittingOptions
    guide: str | None = None
    recipe: str | None = None
    calibration_examples: int | None = None
    scale: float | None = None
    scale_grid: tuple[float, ...] | None = None
    selection: str | None = None
    checkpoint_every: int = CHECKPOINT_STEPS
    resume: bool = False
    recorded: dict[str, Any] = field(default_factory=dict)


def add_parser(commands: argparse._SubParsersAction) -> None:
    """Adds ``fit`` and ``laplace`` and their options."""
    for name, text in (
        ("fit", "fit a guide family by SVI (or a recipe) and save it"),
        ("laplace", "fit a Laplace posterior"),
    ):
        command = commands.add_parser(name, help=text)
        add_model_options(command)
        add_data_options(command, text="plain-text file, one document per line: fit with the next-token likelihood")
        add_posterior_options(command, recipe=name == "fit")
        command.add_argument(
            "--timeout",
            type=positive_number,
            default=None,
            help="data-parallel: seconds to wait for the other processes (default: distributed.DEFAULT_TIMEOUT)",
        )
        runs = command.add_argument_group("checkpoints")
        runs.add_argument(
            "--checkpoint-every",
            type=integer(0),
            metavar="N",
            default=CHECKPOINT_STEPS,
            help=f"write a checkpoint into --out/{CHECKPOINT_NAME} every N steps (default {CHECKPOINT_STEPS}; 0: "
            f"none by steps), and at least every {CHECKPOINT_MINUTES:g} minutes, and on Ctrl-C",
        )
        runs.add_argument(
            "--resume",
            action="store_true",
            help=f"continue the fit of the checkpoint in --out/{CHECKPOINT_NAME} (same options): bitwise the "
            "uninterrupted fit",
        )
        command.add_argument(
            "--min-rows",
            type=integer(1),
            metavar="N",
            default=MIN_ROWS,
            help=f"the fewest usable training questions (documents) accepted (default {MIN_ROWS})",
        )
        add_common(command)
        command.set_defaults(run=FitEntry(FitOptions, run_fit))


def recorded_options(args: argparse.Namespace) -> dict[str, Any]:
    """The options that decide what ``fit`` computes (all but ``--out``, ``--resume`` and
    :data:`RESUMABLE_OPTIONS`), JSON-ready: a checkpoint keeps them and ``--resume`` compares them."""
    skipped = {"run", "out", "resume", *RESUMABLE_OPTIONS}
    options = {key: value for key, value in vars(args).items() if key not in skipped}
    return {key: str(value) if isinstance(value, Path) else value for key, value in sorted(options.items())}


class FitEntry(CommandEntry[FitOptions]):
    """``fit`` and ``laplace``'s entry: the parsed command line as :class:`FitOptions` with the options it
    records (:func:`recorded_options`), then :func:`run_fit`."""

    def settings_of(self, args: argparse.Namespace) -> FitOptions:
        """The fit's settings, with ``recorded`` from the whole command line."""
        return replace(super().settings_of(args), recorded=recorded_options(args))


def _option_text(key: str, value: Any) -> str:
    """``--key value`` as typed (a flag: ``--key`` or ``no --key``)."""
    flag = "--" + key.replace("_", "-")
    if isinstance(value, bool) or value is None:
        return flag if value else f"no {flag}"
    return f"{flag} {' '.join(map(str, value)) if isinstance(value, list) else value}"


def run_checkpoint(options: FitOptions) -> CheckpointOptions:
    """The run checkpoints of ``fit`` (``--out/checkpoint``, every ``--checkpoint-every`` steps), checked
    before any work: ``--resume`` needs a checkpoint written with the same options (the first that differs
    is named); without ``--resume`` a checkpoint there (an unfinished fit) is refused rather than lost."""
    from pyro_moe.inference.resume import CheckpointOptions, read_checkpoint

    out, recorded = options.run.out, options.recorded
    folder = out / CHECKPOINT_NAME
    saved = read_checkpoint(folder)  # also the copy a save killed between its renames set aside
    if saved is not None and not options.resume:
        config = saved[1]
        raise BadInput(
            f"{folder} holds the checkpoint of an unfinished fit (step {config['step_count']} of "
            f"{config.get('steps', '?')}): add --resume to continue it, or delete that folder to start over."
        )
    if saved is None and options.resume:
        finished = " (the fit there finished: its posterior/ is written)" if (out / "posterior").exists() else ""
        raise BadInput(f"--resume: no checkpoint in {folder}{finished}; run without --resume to start a fit.")
    if saved is not None:
        before = saved[1]["checkpoint"].get("run", {})
        for key in sorted(set(before) | set(recorded)):
            if before.get(key) != recorded.get(key):
                changeable = ", ".join("--" + name.replace("_", "-") for name in RESUMABLE_OPTIONS)
                raise BadInput(
                    f"--resume: the checkpoint in {folder} was written with {_option_text(key, before.get(key))}, "
                    f"this run has {_option_text(key, recorded.get(key))}; resume with the checkpoint's options "
                    f"(only {changeable} may change)."
                )
    return CheckpointOptions(folder, every=options.checkpoint_every, resume=options.resume, run=recorded)


def model_record(model: ModelOptions, posterior_folder: Path) -> dict[str, Any]:
    """What ``fit.json`` says of the model: ``--model`` (or the embedded benchmark) and the fingerprint the
    posterior's manifest binds it to (configuration hash, SHA-256 per Bayesian MoE block)."""
    from pyro_moe.inference.checkpoint import MANIFEST

    fingerprint = json.loads((posterior_folder / MANIFEST).read_text()).get("model") or {}
    return {
        "model": model.model or "embedded benchmark",
        "model_config_sha256": fingerprint.get("config_sha256"),
        "model_weights_sha256": fingerprint.get("weights"),
    }


def _save(
    posterior: FittedPosterior, guide: str, options: FitOptions, checkpoint: CheckpointOptions
) -> tuple[Path, dict[str, Any]] | None:
    """Saves ``posterior/`` (data-parallel: rank 0 writes) and removes the run checkpoint (the posterior holds
    the same state); returns the folder and the head of ``fit.json`` (guide, layers, model, processes), or
    ``None`` in a data-parallel process other than rank 0 (it writes nothing more)."""
    folder = posterior.save(options.run.out / "posterior")
    if posterior.data_parallel is not None and not posterior.data_parallel.is_main:
        return None
    remove_folder(checkpoint.folder)
    processes = 1 if posterior.data_parallel is None else posterior.data_parallel.world_size
    summary = {"guide": guide, "layers": posterior.config["layers"], **model_record(options.model, folder)}
    return folder, summary | {"processes": processes}


def _fit_text(options: FitOptions, guide: str, checkpoint: CheckpointOptions) -> FittedPosterior:
    """``fit --text``: ``guide`` fitted with the next-token likelihood on the first ``--fit-examples``
    documents, on the loaded model itself; the family, sites and layers are checked before the model loads."""
    from pyro_moe.guides.registry import parse_guide
    from pyro_moe.inference.presets import family_specs, fit_families
    from pyro_moe.models.likelihoods import LikelihoodKind

    for family in parse_guide(guide).values():
        family.check_likelihood(LikelihoodKind.NEXT_TOKEN)
    steps = guide_steps(options.fitting)
    specs = family_specs([guide], parse_sites(options.fitting), steps)
    layers = fixed_layers(options.fitting)
    inputs = load_text_inputs(options.model, options.data)
    batches = text_batches_of(inputs, options.data, options.fitting.fit_examples)
    posteriors = fit_families(
        inputs.model,
        batches,
        specs,
        answer_token_ids=None,
        layers=layers,
        steps=steps,
        seed=options.run.seed,
        in_place=True,
        checkpoint=checkpoint,
    )
    return posteriors[guide]


def run_fit(options: FitOptions) -> None:
    """``fit`` and ``laplace``: one guide family, saved as ``posterior/`` (safetensors + JSON); on MCQA
    questions, or with ``--text`` on plain text (the next-token likelihood); ``fit --recipe``:
    :func:`run_recipe`."""
    if options.recipe is not None:
        run_recipe(options)
        return
    recipe_only = {
        "calibration_data": options.data.calibration_data,
        "calibration_examples": options.calibration_examples,
        "scale": options.scale,
        "scale_grid": options.scale_grid,
        "selection": options.selection,
    }
    for option, value in recipe_only.items():
        if value is not None:
            flag = "--" + option.replace("_", "-")
            raise BadInput(f"{flag} is for --recipe (its scale selection, checks and temperatures).")
    command, out = options.run.command, options.run.out
    guide = options.guide or ("laplace" if command == "laplace" else "mean-field")
    from pyro_moe.guides.registry import GUIDE_FAMILIES

    post_hoc = [name for name, family in GUIDE_FAMILIES.items() if family.post_hoc]
    if command == "laplace" and guide not in post_hoc:
        raise BadInput(f"laplace fits the post-hoc families {', '.join(post_hoc)}; got --guide {guide}.")
    check_guides([guide])
    parse_sites(options.fitting)
    checkpoint = run_checkpoint(options)
    if options.data.text is not None:
        posterior = _fit_text(options, guide, checkpoint)
    else:
        inputs = load_inputs(options.model, options.data, ["train"])
        layers = resolve_layers(options.fitting, inputs, options.data, options.run.seed)
        fitted = fit_guides(
            inputs,
            [guide],
            layers,
            options.fitting,
            options.data,
            options.run.seed,
            in_place=True,
            checkpoint=checkpoint,
        )
        posterior = fitted[guide]
    saved = _save(posterior, guide, options, checkpoint)
    if saved is None:
        return
    folder, summary = saved
    summary["likelihood"] = posterior.config["likelihood"]
    summary["last_step"] = posterior.history[-1] if posterior.history else {}
    write_text_atomically(out / "fit.json", json.dumps(summary, indent=2) + "\n")
    print(f"{guide} on layers {posterior.config['layers']}: {len(posterior.history)} steps; written: {folder}")


def run_recipe(options: FitOptions) -> None:
    """``fit --recipe``: the recipe on the loaded model itself (:func:`pyro_moe.inference.recipes.run_recipe`)
    on ``--fit-examples`` train questions, choosing (over ``--scale-grid``, or from ``--scale``; default the
    recipe's grid), checking and calibrating on ``--calibration-examples`` calibration questions (default all);
    writes ``posterior/`` (calibrated, with the recipe and the selection), ``fit.json``, ``recipe.md`` and
    ``scales.png`` (the learned scales' trajectory)."""
    from pyro_moe.experiments.evaluation import FitSettings, fit_named_recipes

    if options.fitting.sites is not None or options.fitting.prior is not None:
        raise BadInput("--recipe patches its own logit sites (learned prior scales); drop --sites and --prior.")
    if options.data.text is not None:
        raise BadInput("--recipe fits MCQA questions (its temperatures calibrate answers); --text is for --guide.")
    checkpoint = run_checkpoint(options)
    inputs = load_inputs(options.model, options.data, ["train", "calibration"])
    fitting = FitSettings(
        examples=options.fitting.fit_examples,
        layers=resolve_layers(options.fitting, inputs, options.data, options.run.seed),
        batch_size=options.data.batch_size,
        seed=options.run.seed,
        validation_examples=options.calibration_examples,
        checkpoint=checkpoint,
    )
    (result,) = fit_named_recipes(
        inputs.model,
        inputs.tokenizer,
        inputs.splits,
        [options.recipe],
        fitting,
        answer_token_ids=inputs.answer_token_ids,
        steps=options.fitting.steps,
        in_place=True,
        scale=options.scale,
        scale_grid=options.scale_grid,
        selection=options.selection,
    ).values()
    out, posterior = options.run.out, result.posterior
    saved = _save(posterior, result.recipe.guide, options, checkpoint)
    if saved is None:
        return
    folder, summary = saved
    summary |= {"last_step": posterior.history[-1], **result.to_json()}
    write_text_atomically(out / "fit.json", json.dumps(summary, indent=2) + "\n")
    write_text_atomically(out / "recipe.md", result.to_markdown())
    result.plot(out / "scales.png")
    chosen = result.selection.chosen
    temperatures = ", ".join(f"{mode} {scaling.temperature:.3f}" for mode, scaling in posterior.calibration.items())
    print(
        f"{options.recipe} on layers {posterior.config['layers']}: start scale {chosen.scale:g}, "
        f"{len(posterior.history)} steps, temperatures {temperatures or 'none'}; written: {folder}"
    )
