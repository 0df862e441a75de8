"""One runner for the experiments' command lines.

An experiment declares its command line once (:class:`ExperimentCommand`: its description, its settings
dataclass, its own options and how they are named in the settings) and passes its run function;
:func:`run_experiment_command` does what every experiment's ``main`` did: parse the options (the shared
ones of :func:`~pyro_moe.experiments.command_options.add_common_arguments` first), build the fit and the
experiment's settings, so a bad number is refused (exit code 2, one line) before the benchmark is loaded,
run the experiment on the embedded benchmark, write ``metrics.json``, ``report.md`` and the PNGs and print
the report. The studies with their own command lines (objectives, recipes) build their settings with
:func:`parse_settings`.

Example::

    CALIBRATION_COMMAND = ExperimentCommand(
        prog="python -m pyro_moe.experiments.calibration",
        description="Calibration of ...",
        settings=CalibrationSettings,
        add_options=add_calibration_options,     # --test-examples, --bins
        option_names={"num_samples": "samples", "n_bins": "bins"},
        benchmark_sizes=True,                    # --test-size, --ood-size
    )

    def main(argv=None):
        run_experiment_command(CALIBRATION_COMMAND, run_calibration, argv)
"""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

from pyro_moe.errors import PyroMoEError
from pyro_moe.experiments import evaluation
from pyro_moe.experiments.command_options import (
    DEFAULT_FAMILIES,
    add_benchmark_size_arguments,
    add_common_arguments,
    benchmark_extension,
    fit_settings,
)
from pyro_moe.experiments.reports import Results, write_results

__all__ = ["SAMPLES_OPTION", "ExperimentCommand", "parse_settings", "run_experiment_command", "settings_from_options"]

SAMPLES_OPTION = {"num_samples": "samples"}
"""The settings field the ``--samples`` option fills (the other fields share their option's name)."""

SettingsT = TypeVar("SettingsT")


def settings_from_options(
    settings: Callable[..., SettingsT], args: argparse.Namespace, option_names: Mapping[str, str] = SAMPLES_OPTION
) -> SettingsT:
    """``settings`` (a dataclass) built from the parsed options: every field from the option of its name,
    or of the name ``option_names`` gives it (``{field: option}``, e.g. ``{"n_bins": "bins"}``); a field
    without an option keeps its default. The dataclass checks the numbers (``ConfigurationError``)."""
    values = {}
    for setting in dataclasses.fields(settings):
        option = option_names.get(setting.name, setting.name)
        if setting.init and hasattr(args, option):
            values[setting.name] = getattr(args, option)
    return settings(**values)


def parse_settings(
    parser: argparse.ArgumentParser,
    settings: Callable[..., SettingsT],
    argv: Sequence[str] | None = None,
    option_names: Mapping[str, str] = SAMPLES_OPTION,
) -> tuple[argparse.Namespace, SettingsT]:
    """The parsed options and the settings they give (:func:`settings_from_options`); a bad value is
    refused by ``parser`` (its one-line reason, exit code 2) before anything runs."""
    args = parser.parse_args(argv)
    try:
        return args, settings_from_options(settings, args, option_names)
    except PyroMoEError as error:  # bad input: a one-line reason, exit code 2
        parser.error(str(error))


@dataclass(frozen=True, kw_only=True)
class ExperimentCommand:
    """An experiment's command line: the guide families it fits on the embedded benchmark, and its settings.

    Attributes:
        description: the ``--help`` description.
        settings: the experiment's settings dataclass (e.g. ``CalibrationSettings``), built from the options.
        add_options: adds the experiment's own options to the parser (after the shared ones).
        prog: the program name in ``--help`` and errors (``None``: argparse's).
        option_names: ``{settings field: option}`` where the two names differ.
        steps: the default ``--steps`` (SVI steps per family).
        fit_examples: the default ``--fit-examples``.
        benchmark_sizes: the command takes ``--test-size`` and ``--ood-size`` (the benchmark's evaluation
            splits enlarged with fresh questions).
    """

    description: str
    settings: Callable[..., Any]
    add_options: Callable[[argparse.ArgumentParser], None]
    prog: str | None = None
    option_names: Mapping[str, str] = field(default_factory=lambda: dict(SAMPLES_OPTION))
    steps: int = 200
    fit_examples: int = 512
    benchmark_sizes: bool = False

    def parser(self) -> argparse.ArgumentParser:
        """The parser: the shared options, the benchmark sizes if taken, then the experiment's own."""
        parser = argparse.ArgumentParser(prog=self.prog, description=self.description)
        add_common_arguments(parser, families=DEFAULT_FAMILIES, steps=self.steps, fit_examples=self.fit_examples)
        if self.benchmark_sizes:
            add_benchmark_size_arguments(parser)
        self.add_options(parser)
        return parser


def run_experiment_command(
    command: ExperimentCommand, run: Callable[..., Results], argv: Sequence[str] | None = None
) -> None:
    """Parse ``argv`` as ``command`` says, build the fit and the experiment's settings (a bad number is
    refused, exit code 2, before the benchmark is loaded), ``run`` the experiment (``run_calibration``,
    ``run_ood``, ...) on the embedded benchmark, write its files into ``--out`` and print its report."""
    parser = command.parser()
    args = parser.parse_args(argv)
    try:  # the settings first: a bad number is refused before the benchmark is loaded
        fitting = fit_settings(args)
        settings = settings_from_options(command.settings, args, command.option_names)
        extend_to = benchmark_extension(args) if command.benchmark_sizes else None
        results = evaluation.run_on_benchmark(run, args.families, settings, fitting, extend_to)
    except PyroMoEError as error:  # bad input: a one-line reason, exit code 2
        parser.error(str(error))
    paths = write_results(results, args.out)
    print(results.to_markdown())
    print("written:", paths["metrics"], paths["report"], *paths["plots"])
