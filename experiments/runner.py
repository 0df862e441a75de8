"""One runner for the experiments' command lines.

An experiment declares its command line once, with :func:`experiment_command`: its program name, its settings
dataclass and how its options are named in the settings, and, in the decorated function, its own options and its
run function (the function's docstring is the ``--help`` description). The decorator makes the experiment's
``main(argv=None)``, which does what every experiment's ``main`` did: parse the options (the shared ones of
:func:`~pyro_moe.experiments.command_options.add_common_arguments` first), build the fit and the experiment's
settings, so a bad number is refused (exit code 2, one line) before the benchmark is loaded, run the experiment
on the embedded benchmark, write ``metrics.json``, ``report.md`` and the PNGs and print the report. The studies
with command lines of their own (objectives, recipes) build their settings with :func:`parse_settings`.

Example::

    @experiment_command(
        "python -m pyro_moe.experiments.calibration",
        CalibrationSettings,
        option_names={"num_samples": "samples", "n_bins": "bins"},   # settings field: option
        benchmark_sizes=True,                                          # --test-size, --ood-size
    )
    def main(parser: argparse.ArgumentParser) -> Callable[..., CalibrationResults]:
        # its docstring: the --help description
        parser.add_argument("--bins", type=int, default=DEFAULT_BINS, help="ECE bins")
        return run_calibration

    main(["--out", "runs/calibration", "--bins", "0"])   # exit 2: n_bins must be a positive integer
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
from collections.abc import Callable, Mapping, Sequence
from types import MappingProxyType
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

__all__ = ["SAMPLES_OPTION", "CommandDeclaration", "experiment_command", "parse_settings", "settings_from_options"]

SAMPLES_OPTION = MappingProxyType({"num_samples": "samples"})
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


CommandDeclaration = Callable[[argparse.ArgumentParser], Callable[..., Results]]
"""An experiment's command: adds its own options to the parser and returns its run function (``run_calibration``,
...; looked up when the command runs); its docstring is the ``--help`` description."""


def experiment_command(
    prog: str,
    settings: Callable[..., Any],
    *,
    option_names: Mapping[str, str] = SAMPLES_OPTION,
    steps: int = 200,
    fit_examples: int = 512,
    benchmark_sizes: bool = False,
    test_size: int | None = None,
) -> Callable[[CommandDeclaration], Callable[[Sequence[str] | None], None]]:
    """Turn an experiment's command declaration into its ``main(argv=None)``, which parses ``argv`` (the shared
    options of :func:`~pyro_moe.experiments.command_options.add_common_arguments`, ``--test-size`` and
    ``--ood-size`` with ``benchmark_sizes``, then the experiment's own), builds the fit and the experiment's
    ``settings`` (:func:`settings_from_options` with ``option_names``), so a bad number is refused (exit code 2)
    before the benchmark is loaded, runs the experiment on the embedded benchmark, writes ``metrics.json``,
    ``report.md`` and the PNGs into ``--out`` and prints the report.

    Args:
        prog: the program name in ``--help`` and errors, e.g. ``"python -m pyro_moe.experiments.ood"``.
        settings: the experiment's settings dataclass (e.g. ``OoDSettings``).
        option_names: ``{settings field: option}`` where the two names differ.
        steps: the default ``--steps`` (SVI steps per family).
        fit_examples: the default ``--fit-examples``.
        benchmark_sizes: the command takes ``--test-size`` and ``--ood-size`` (the benchmark's evaluation
            splits enlarged with fresh questions).
        test_size: the default ``--test-size`` (``None``: the test split as shipped).
    """

    def command(declaration: CommandDeclaration) -> Callable[[Sequence[str] | None], None]:
        def main(argv: Sequence[str] | None = None) -> None:
            parser = argparse.ArgumentParser(prog=prog, description=inspect.getdoc(declaration))
            add_common_arguments(parser, families=DEFAULT_FAMILIES, steps=steps, fit_examples=fit_examples)
            if benchmark_sizes:
                add_benchmark_size_arguments(parser, test_size=test_size)
            run = declaration(parser)
            args = parser.parse_args(argv)
            try:  # the settings first: a bad number is refused before the benchmark is loaded
                fitting = fit_settings(args)
                built = settings_from_options(settings, args, option_names)
                extend_to = benchmark_extension(args) if benchmark_sizes else None
                results = evaluation.run_on_benchmark(run, args.families, built, fitting, extend_to)
            except PyroMoEError as error:  # bad input: a one-line reason, exit code 2
                parser.error(str(error))
            paths = write_results(results, args.out)
            print(results.to_markdown())
            print("written:", paths["metrics"], paths["report"], *paths["plots"])

        for name in ("__module__", "__name__", "__qualname__", "__doc__"):  # its own signature: main(argv)
            setattr(main, name, getattr(declaration, name))
        return main

    return command
