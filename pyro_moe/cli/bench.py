"""``pyro-moe bench``: latency, peak memory and FLOPs of the families' predictions
(:mod:`pyro_moe.experiments.efficiency`)."""

from __future__ import annotations

import argparse
from dataclasses import dataclass

from pyro_moe.cli.inputs import load_inputs
from pyro_moe.cli.options import add_common, add_data_options, add_model_options, add_posterior_options
from pyro_moe.cli.posterior import check_guides, parse_sites, resolve_layers
from pyro_moe.cli.settings import CommandEntry, DataOptions, FittingOptions, ModelOptions, RunOptions

__all__ = ["BenchOptions", "add_parser", "run_bench"]


@dataclass(frozen=True)
class BenchOptions:
    """``bench``: the model, the data, the ``--guides`` measured (``None``: mean-field and mfvr) and how they
    are fitted (``fitting``)."""

    run: RunOptions
    model: ModelOptions
    data: DataOptions
    fitting: FittingOptions
    guides: tuple[str, ...] | None = None


def add_parser(commands: argparse._SubParsersAction) -> None:
    """Adds ``bench`` and its options."""
    bench = commands.add_parser("bench", help="latency, peak memory and FLOPs of the families' predictions")
    add_model_options(bench)
    add_data_options(bench)
    add_posterior_options(bench, guide=False)
    bench.add_argument("--guides", nargs="+", help="guide families (default mean-field mfvr)")
    add_common(bench, "S, posterior samples per prediction (default 16)")
    bench.set_defaults(run=CommandEntry(BenchOptions, run_bench), steps=10, fit_examples=64)


def run_bench(options: BenchOptions) -> None:
    """``bench``: cost of the families' predictions (:mod:`pyro_moe.experiments.efficiency`)."""
    from pyro_moe.experiments.efficiency import EfficiencySettings, run_efficiency
    from pyro_moe.experiments.evaluation import FitSettings, write_results

    guides = check_guides(options.guides or ["mean-field", "mfvr"])
    seed = options.run.seed
    settings = EfficiencySettings(num_samples=options.run.samples or 16, batch_size=options.data.batch_size, seed=seed)
    inputs = load_inputs(options.model, options.data, ["train", "test"])
    fitting = FitSettings(
        examples=options.fitting.fit_examples,
        sites=parse_sites(options.fitting),
        layers=resolve_layers(options.fitting, inputs, options.data, seed),
        steps=options.fitting.steps,
        seed=seed,
    )
    results = run_efficiency(
        inputs.model,
        inputs.tokenizer,
        inputs.splits,
        guides,
        settings=settings,
        fitting=fitting,
        answer_token_ids=inputs.answer_token_ids,
    )
    paths = write_results(results, options.run.out)
    print(results.to_markdown())
    print("written:", paths["report"])
