"""The ``pyro-moe`` parser: argument errors as one line and exit code 2, and :func:`build_parser`, which adds
every command's own parser (its module's ``add_parser``, with the shared groups of :mod:`pyro_moe.cli.options`).
Nothing here imports torch: ``--help`` answers at once."""

from __future__ import annotations

import argparse

from pyro_moe.cli import bench, demo, diagnose, evaluate, fit, generate, lm_eval, stability
from pyro_moe.cli.errors import EXIT_BAD_INPUT

__all__ = ["COMMANDS", "build_parser"]

COMMANDS = (demo, stability, fit, evaluate, diagnose, generate, lm_eval, bench)
"""The commands' modules, in the order ``--help`` lists them."""


class _Parser(argparse.ArgumentParser):
    """Argument errors as one line and exit code 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(EXIT_BAD_INPUT, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    """The ``pyro-moe`` parser with its subcommands, in the order ``--help`` lists them; each sets the
    default ``run``, its entry (the parsed namespace to the command's settings, then its runner)."""
    from pyro_moe import cli  # the package's docstring opens the help

    parser = _Parser(prog="pyro-moe", description=cli.__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=_Parser)
    for command in COMMANDS:
        command.add_parser(commands)
    return parser
