"""``pyro-moe stability``: routing stability per layer and the susceptible layers."""

from __future__ import annotations

import argparse
from dataclasses import dataclass

from pyro_moe.cli.inputs import load_inputs
from pyro_moe.cli.options import add_common, add_data_options, add_model_options, integer
from pyro_moe.cli.posterior import deterministic_stability
from pyro_moe.cli.settings import CommandEntry, DataOptions, ModelOptions, RunOptions

__all__ = ["StabilityOptions", "add_parser", "run_stability"]


@dataclass(frozen=True)
class StabilityOptions:
    """``stability``: the model, the calibration questions measured and ``--susceptible-k`` least stable layers
    reported."""

    run: RunOptions
    model: ModelOptions
    data: DataOptions
    susceptible_k: int = 1


def add_parser(commands: argparse._SubParsersAction) -> None:
    """Adds ``stability`` and its options."""
    stability = commands.add_parser("stability", help="routing stability per layer and the susceptible layers")
    add_model_options(stability)
    add_data_options(stability)
    stability.add_argument(
        "--susceptible-k", type=integer(1), default=1, help="least stable layers reported (default 1)"
    )
    add_common(stability)
    stability.set_defaults(run=CommandEntry(StabilityOptions, run_stability))


def run_stability(options: StabilityOptions) -> None:
    """``stability``: Jaccard stability per layer and the susceptible layers."""
    from pyro_moe.experiments.evaluation import write_results

    inputs = load_inputs(options.model, options.data, ["test"])
    results = deterministic_stability(inputs, options.data, options.susceptible_k, options.run.seed)
    paths = write_results(results, options.run.out)
    print(f"susceptible layers: {results.susceptible}")
    print("written:", paths["metrics"], paths["report"])
