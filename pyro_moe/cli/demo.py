"""``pyro-moe demo``: the offline demo on the embedded benchmark (:mod:`pyro_moe.experiments.demo`)."""

from __future__ import annotations

import argparse
from dataclasses import dataclass, replace
from pathlib import Path

from pyro_moe.cli.options import integer
from pyro_moe.cli.settings import CommandEntry, RunOptions

__all__ = ["DemoOptions", "add_parser", "run_demo"]


@dataclass(frozen=True)
class DemoOptions:
    """``demo``: ``--quick`` (few steps and questions), ``--steps`` and ``--samples`` (``None``: the demo's)."""

    run: RunOptions
    quick: bool = False
    steps: int | None = None


def add_parser(commands: argparse._SubParsersAction) -> None:
    """Adds ``demo`` and its options."""
    demo = commands.add_parser("demo", help="the offline demo on the embedded benchmark (make demo)")
    demo.add_argument("--out", type=Path, default=Path("runs/demo"), help="run folder (default runs/demo)")
    demo.add_argument("--quick", action="store_true", help="few steps and questions, same code path (for tests)")
    demo.add_argument(
        "--steps", type=integer(1), default=None, help="SVI steps per family and recipe (default 150; recipes: 300)"
    )
    demo.add_argument("--samples", type=integer(1), default=None, help="S per prediction (default 8)")
    demo.add_argument("--seed", type=integer(0), default=0, help="seed (default 0)")
    demo.set_defaults(run=CommandEntry(DemoOptions, run_demo))


def run_demo(options: DemoOptions) -> None:
    """``demo``: the demo pipeline on the embedded benchmark."""
    from pyro_moe.experiments.demo import HEADLINE_COLUMNS, QUICK, DemoSettings
    from pyro_moe.experiments.demo import run_demo as demo
    from pyro_moe.experiments.evaluation import markdown_table

    settings = QUICK if options.quick else DemoSettings()
    settings = replace(
        settings,
        seed=options.run.seed,
        steps=options.steps or settings.steps,
        recipe_steps=options.steps or settings.recipe_steps,
        samples=options.run.samples or settings.samples,
    )
    out = options.run.out
    headline = demo(out, settings)
    print(markdown_table(headline, HEADLINE_COLUMNS))
    print(f"written: {out / 'report.md'}")
