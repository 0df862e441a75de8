"""The options several commands share: the number types refused at parsing (exit 2, one line) and the option
groups (model, data, posterior, ``--out``/``--samples``/``--seed``, ``--allow-other-model``) that every command's
module adds to its parser. Nothing here imports torch: ``--help`` answers at once."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path

from pyro_moe.errors import PyroMoEError
from pyro_moe.validation import check_integer, check_number

__all__ = [
    "DEFAULT_STEPS",
    "DTYPES",
    "add_allow_other_model",
    "add_common",
    "add_data_options",
    "add_model_options",
    "add_posterior_options",
    "integer",
    "positive_number",
]

DTYPES = ("bfloat16", "float16", "float32")
"""``--dtype`` choices (names of torch dtypes)."""
DEFAULT_STEPS = 200
"""SVI steps of a guide fitted by name when ``--steps`` is not given (a recipe has its own)."""


def _recipe_name(text: str) -> str:
    """An argparse ``type``: a registered recipe name, checked at parsing (the registry imports no torch)."""
    from pyro_moe.inference.recipes import named_recipe

    try:
        return named_recipe(text).name
    except PyroMoEError as error:
        raise argparse.ArgumentTypeError(str(error).removesuffix(".")) from None


def integer(minimum: int) -> Callable[[str], int]:
    """An argparse ``type``: an integer >= ``minimum``, refused at parsing (exit 2, one line)."""

    def parse(text: str) -> int:
        try:
            return check_integer("the value", int(text), minimum=minimum)
        except (ValueError, PyroMoEError):
            accepted = {1: "a positive integer", 0: "a non-negative integer"}.get(minimum, f"an integer >= {minimum}")
            raise argparse.ArgumentTypeError(f"must be {accepted}, got {text!r}") from None

    return parse


def positive_number(text: str) -> float:
    """An argparse ``type``: a finite number > 0."""
    try:
        return check_number("the value", float(text))
    except (ValueError, PyroMoEError):
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text!r}") from None


def add_model_options(parser: argparse.ArgumentParser) -> None:
    """The model group (:class:`~pyro_moe.cli.settings.ModelOptions`)."""
    group = parser.add_argument_group("model")
    group.add_argument("--model", help="HF id or local folder of an MoE causal LM (default: the embedded benchmark)")
    group.add_argument("--tokenizer", help="tokenizer id or folder (default: the model's)")
    group.add_argument("--dtype", choices=DTYPES, default="float32", help="weights' dtype (default float32)")
    group.add_argument("--device", help="cuda, cuda:1, cpu, ... (default: where from_pretrained puts it)")
    group.add_argument("--device-map", help="accelerate device map, e.g. auto, for models larger than one GPU")
    group.add_argument("--trust-remote-code", action="store_true", help="run the checkpoint's own Python code")


def add_data_options(parser: argparse.ArgumentParser, ood: bool = False, text: str | None = None) -> None:
    """The data group (:class:`~pyro_moe.cli.settings.DataOptions`); ``text``: the help of ``--text``
    (exclusive with ``--data``), with ``--max-length``."""
    group = parser.add_argument_group("data")
    sources = group.add_mutually_exclusive_group() if text is not None else group
    sources.add_argument(
        "--data", help="MCQA file (.jsonl/.json/.csv/.parquet), folder or data-set name (default: benchmark)"
    )
    if text is not None:
        sources.add_argument("--text", type=Path, help=text)
        group.add_argument(
            "--max-length",
            type=integer(2),
            default=None,
            help="--text: tokens kept of each document, the rest dropped (default 512, or the model's positions)",
        )
    group.add_argument("--split", help="split of a data folder or data-set name")
    group.add_argument(
        "--examples",
        type=integer(1),
        default=200,
        help="questions (documents) per evaluated split, and of the stability ranking of --layers susceptible "
        "(default 200)",
    )
    group.add_argument("--batch-size", type=integer(1), default=32, help="questions (documents) per batch (default 32)")
    group.add_argument(
        "--truncate-prompts",
        action="store_true",
        help="cut prompts longer than the model's positions from the start (keeping the choices and the answer "
        "line), with a warning counting them (default: such a prompt is refused before any work)",
    )
    if ood:
        group.add_argument("--ood-data", nargs="+", help="out-of-distribution MCQA files (one OoD split each)")


def add_posterior_options(parser: argparse.ArgumentParser, guide: bool = True, recipe: bool = False) -> None:
    """The posterior group (:class:`~pyro_moe.cli.settings.FittingOptions`), with ``--guide`` (``guide``)
    and the recipe's options (``recipe``: ``fit``)."""
    group = parser.add_argument_group("posterior")
    group.add_argument(
        "--layers",
        nargs="+",
        default=["all"],
        help="Bayesian decoder layers: all, susceptible, or indices (negative from the end)",
    )
    group.add_argument(
        "--susceptible-k", type=integer(1), default=1, help="how many layers 'susceptible' picks (default 1)"
    )
    group.add_argument(
        "--sites", help="router sites: JSON '{\"logits\": 2.0}' or kinds logits,weight (default per guide)"
    )
    group.add_argument(
        "--prior",
        help="prior family of the sites, e.g. normal, laplace, student-t, horseshoe (an unknown name lists all)",
    )
    if guide:
        chosen = group.add_mutually_exclusive_group() if recipe else group
        chosen.add_argument(
            "--guide",
            help="guide family, e.g. mean-field, low-rank, mfvr, map+low-rank-logits, swag, expert-laplace "
            "(default mean-field; laplace: laplace; an unknown name lists all)",
        )
        if recipe:
            chosen.add_argument(
                "--recipe",
                type=_recipe_name,
                help="a recipe instead of a guide, e.g. mfvr-iwae-layer, low-rank-logits-iwae-expert (an unknown "
                "name lists all): starting scale by calibration NLL, iwae with learned prior scales, temperatures",
            )
    if recipe:
        _add_recipe_options(group)
    steps_help = f"SVI steps (default {DEFAULT_STEPS}" + ("; with --recipe the recipe's own)" if recipe else ")")
    group.add_argument("--steps", type=integer(0), default=None if recipe else DEFAULT_STEPS, help=steps_help)
    group.add_argument(
        "--fit-examples",
        type=integer(1),
        default=512,
        help="questions (documents) the guide is fitted on (default 512)",
    )


def _add_recipe_options(group: argparse._ArgumentGroup) -> None:
    """``fit --recipe``'s calibration questions, starting scales and selection rule."""
    group.add_argument(
        "--calibration-data",
        help="--recipe: MCQA file of the calibration questions (default: the benchmark's calibration split, "
        "or the first quarter of --data, the rest fitted on)",
    )
    group.add_argument(
        "--calibration-examples",
        type=integer(1),
        default=None,
        help="--recipe: calibration questions of the scale selection, the checks along the fit and the "
        "temperatures (default: all there are, 1000 on the benchmark: enough to separate the grid)",
    )
    scales = group.add_mutually_exclusive_group()
    scales.add_argument(
        "--scale", type=positive_number, default=None, help="--recipe: start from this prior scale (no grid)"
    )
    scales.add_argument(
        "--scale-grid",
        type=positive_number,
        nargs="+",
        default=None,
        help="--recipe: the starting scales to choose from (default: the recipe's grid)",
    )
    group.add_argument(
        "--selection",
        choices=("raw", "calibrated"),
        default=None,
        help="--recipe: choose the starting scale by the unfitted prior's plain calibration NLL (raw) or by "
        "its NLL after a cross-fitted temperature (calibrated); default: the recipe's (calibrated)",
    )


def add_common(parser: argparse.ArgumentParser, samples: str | None = None) -> None:
    """``--out``, ``--samples`` (with its help ``samples``) and ``--seed``
    (:class:`~pyro_moe.cli.settings.RunOptions`)."""
    parser.add_argument("--out", type=Path, required=True, help="run folder for the results")
    if samples is not None:
        parser.add_argument("--samples", type=integer(1), default=None, help=samples)
    parser.add_argument("--seed", type=integer(0), default=0, help="seed of fits, noise and sampling (default 0)")


def add_allow_other_model(parser: argparse.ArgumentParser) -> None:
    """``--allow-other-model`` of the commands that load a ``--posterior``."""
    parser.add_argument(
        "--allow-other-model",
        action="store_true",
        help="load --posterior into a model other than the one it was fitted on (another configuration or other "
        "weights of the MoE blocks; refused without it), e.g. to transfer it to a fine-tune on purpose",
    )
