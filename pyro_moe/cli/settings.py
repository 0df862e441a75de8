"""The options several commands share, as frozen dataclasses: a command turns the parsed command line into its
settings once, at its entry (:func:`from_namespace`), and passes these down."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import dataclass, fields, is_dataclass
from pathlib import Path
from typing import Any, Generic, TypeVar, get_type_hints

__all__ = ["CommandEntry", "DataOptions", "FittingOptions", "ModelOptions", "RunOptions", "from_namespace"]

Settings = TypeVar("Settings")


@dataclass(frozen=True)
class RunOptions:
    """What every command has: its name, the run folder ``--out``, ``--seed`` and ``--samples`` (S per
    prediction where the command has it)."""

    command: str
    out: Path
    seed: int = 0
    samples: int | None = None


@dataclass(frozen=True)
class ModelOptions:
    """The model group: ``--model`` (``None``: the embedded benchmark), ``--tokenizer``, ``--dtype``,
    ``--device``, ``--device-map`` and ``--trust-remote-code``."""

    model: str | None = None
    tokenizer: str | None = None
    dtype: str = "float32"
    device: str | None = None
    device_map: str | None = None
    trust_remote_code: bool = False


@dataclass(frozen=True)
class DataOptions:
    """The data group: MCQA ``--data`` (or plain ``--text`` cut to ``--max-length`` tokens), ``--split``,
    ``--examples`` per evaluated split, ``--batch-size``, ``--truncate-prompts``, ``--ood-data`` files,
    ``--calibration-data`` (``fit --recipe``) and ``--min-rows`` (``fit``, ``laplace``; ``None``: no floor)."""

    data: str | None = None
    text: Path | None = None
    max_length: int | None = None
    split: str | None = None
    examples: int = 200
    batch_size: int = 32
    truncate_prompts: bool = False
    ood_data: tuple[str, ...] | None = None
    calibration_data: str | None = None
    min_rows: int | None = None


@dataclass(frozen=True)
class FittingOptions:
    """How guides are fitted (the posterior group): ``--layers`` (``all``, ``susceptible`` or indices) with
    ``--susceptible-k``, ``--sites`` and ``--prior`` as typed, ``--steps`` (``None``: a recipe's own) and
    ``--fit-examples``."""

    layers: tuple[str, ...] = ("all",)
    susceptible_k: int = 1
    sites: str | None = None
    prior: str | None = None
    steps: int | None = None
    fit_examples: int = 512


def from_namespace(kind: type[Settings], args: argparse.Namespace) -> Settings:
    """The dataclass ``kind`` from the parsed command line: a field typed as a dataclass is built the same way
    from the same ``args``, every other field takes the option of its name (a list as a tuple); a field the
    command has no option for keeps its default."""
    hints = get_type_hints(kind)
    values: dict[str, Any] = {}
    for field in fields(kind):  # type: ignore[arg-type]
        hint = hints[field.name]
        if isinstance(hint, type) and is_dataclass(hint):
            values[field.name] = from_namespace(hint, args)
        elif hasattr(args, field.name):
            value = getattr(args, field.name)
            values[field.name] = tuple(value) if isinstance(value, list) else value
    return kind(**values)


@dataclass(frozen=True)
class CommandEntry(Generic[Settings]):
    """A command's entry (its parser's default ``run``): the parsed command line as its ``settings`` dataclass
    (:meth:`settings_of`, once), given to its ``runner``."""

    settings: type[Settings]
    runner: Callable[[Settings], None]

    def settings_of(self, args: argparse.Namespace) -> Settings:
        """The command's settings from the parsed command line (:func:`from_namespace`)."""
        return from_namespace(self.settings, args)

    def __call__(self, args: argparse.Namespace) -> None:
        self.runner(self.settings_of(args))
