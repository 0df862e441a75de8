"""``pyro-moe diagnose``: ArviZ ``InferenceData`` (netCDF), ``az.summary`` and the collapse report of a saved
posterior."""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path

from pyro_moe.atomic_files import write_atomically, write_text_atomically
from pyro_moe.cli.inputs import check_path, load_inputs
from pyro_moe.cli.options import add_allow_other_model, add_common, add_data_options, add_model_options
from pyro_moe.cli.settings import CommandEntry, DataOptions, ModelOptions, RunOptions

__all__ = ["DiagnoseOptions", "add_parser", "run_diagnose"]


@dataclass(frozen=True)
class DiagnoseOptions:
    """``diagnose``: the model, the test questions, the saved ``--posterior`` and ``--allow-other-model``."""

    run: RunOptions
    model: ModelOptions
    data: DataOptions
    posterior: Path
    allow_other_model: bool = False


def add_parser(commands: argparse._SubParsersAction) -> None:
    """Adds ``diagnose`` and its options."""
    diagnose = commands.add_parser("diagnose", help="ArviZ InferenceData, summary and collapse report of a posterior")
    add_model_options(diagnose)
    add_data_options(diagnose)
    diagnose.add_argument("--posterior", type=Path, required=True, help="a posterior folder written by pyro-moe fit")
    add_allow_other_model(diagnose)
    add_common(diagnose, "posterior draws of the export and the collapse report (default 100)")
    diagnose.set_defaults(run=CommandEntry(DiagnoseOptions, run_diagnose))


def run_diagnose(options: DiagnoseOptions) -> None:
    """``diagnose``: InferenceData (netCDF), its ``az.summary`` and the collapse report of a saved posterior."""
    from pyro_moe.diagnostics.arviz_export import to_inference_data
    from pyro_moe.diagnostics.collapse import collapse_report
    from pyro_moe.experiments.evaluation import split_batches
    from pyro_moe.inference.fitting import FittedPosterior

    check_path(options.posterior, "posterior")
    inputs = load_inputs(options.model, options.data, ["test"])
    posterior = FittedPosterior.load(options.posterior, inputs.model, allow_other_model=options.allow_other_model)
    batches = split_batches(inputs.splits["test"], inputs.tokenizer, options.data.batch_size, options.data.examples)
    draws, seed, out = options.run.samples or 100, options.run.seed, options.run.out
    idata = to_inference_data(posterior, batches, num_draws=draws, seed=seed)
    report = collapse_report(posterior, batches, num_draws=draws, summary_draws=draws, seed=seed)
    out.mkdir(parents=True, exist_ok=True)
    write_atomically(out / "posterior.nc", idata.to_netcdf)
    write_atomically(out / "summary.csv", report.summary.to_csv)
    write_atomically(out / "collapse.csv", lambda path: report.table.to_csv(path, index=False))
    report.plot(out / "collapse.png")
    flags = {flag: report.flagged(flag) for flag in ("deterministic", "prior_collapse", "runaway_temperature")}
    flagged = {k: [list(v) for v in vs] for k, vs in flags.items()}
    write_text_atomically(out / "flags.json", json.dumps(flagged, indent=2))
    print(report.table.to_string(max_cols=8))
    print("written:", *(out / name for name in ("posterior.nc", "summary.csv", "collapse.csv", "collapse.png")))
