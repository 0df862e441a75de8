"""The command-line options the experiments share (the families fitted, their fit, the prediction
batch and seed, the enlarged benchmark splits) and the settings they give; the embedded
benchmark is the default input.

Example::

    add_common_arguments(parser, families=DEFAULT_FAMILIES, steps=200)
    fitting = fit_settings(parser.parse_args(argv))   # FitSettings; a bad number is refused here
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path

from pyro_moe.experiments.named_fits import FitSettings
from pyro_moe.inference.presets import family_specs

__all__ = [
    "DEFAULT_FAMILIES",
    "add_benchmark_size_arguments",
    "add_common_arguments",
    "benchmark_extension",
    "fit_settings",
]

DEFAULT_FAMILIES = ("mean-field", "mfvr")
"""Families the experiment CLIs fit by default: router weights (mean-field) and per-token logits (MFVR)."""


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
