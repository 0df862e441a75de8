"""The command line's exit codes and its bad-input error (a leaf: every command module raises it)."""

from __future__ import annotations

from pyro_moe.errors import PyroMoEError

__all__ = ["EXIT_BAD_INPUT", "EXIT_DISTRIBUTED", "EXIT_INTERRUPTED", "BadInput"]

EXIT_BAD_INPUT = 2
"""Exit code of bad input (any :class:`~pyro_moe.errors.PyroMoEError`), refused before any work."""
EXIT_DISTRIBUTED = 1
"""Exit code of a data-parallel run whose collective failed (another process died or hung)."""
EXIT_INTERRUPTED = 130
"""Exit code after SIGINT (Ctrl-C), 128 + the signal's number as shells report it."""


class BadInput(PyroMoEError):
    """A command-line input that cannot be used."""
