"""Every command turns its parsed command line into its settings once, at its entry: every option its parser
accepts lands, with the value argparse parsed (a list as a tuple), in exactly one field of the settings."""

from __future__ import annotations

import argparse
from dataclasses import fields, is_dataclass
from typing import Any

import pytest

from pyro_moe.cli import build_parser
from pyro_moe.cli.settings import CommandEntry

READ_BY_MAIN = {"run", "timeout"}
"""Not settings: ``run`` is the entry itself, ``--timeout`` is read by ``main`` when it joins the process group."""
REQUIRED = {"diagnose": ["--posterior", "p"], "generate": ["--prompt", "p"], "lm-eval": ["--tasks", "t"]}
"""The required options besides ``--out``."""
OPTIONS = ["--seed", "3"]
"""Beside the defaults: a value no default has."""


def _commands() -> list[str]:
    subparsers = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return list(subparsers.choices)


def _leaves(settings: Any) -> list[tuple[str, Any]]:
    """Every field of ``settings`` that is not itself a dataclass, by name, the nested ones' included."""
    found = []
    for field in fields(settings):
        value = getattr(settings, field.name)
        found += _leaves(value) if is_dataclass(value) else [(field.name, value)]
    return found


@pytest.mark.parametrize("command", _commands())
def test_every_option_lands_in_one_field_of_the_commands_settings(command):
    args = build_parser().parse_args([command, *REQUIRED.get(command, []), *OPTIONS, "--out", "runs/x"])
    assert isinstance(args.run, CommandEntry)
    leaves = _leaves(args.run.settings_of(args))
    names = [name for name, _ in leaves]
    assert len(names) == len(set(names)), f"fields named twice: {sorted({n for n in names if names.count(n) > 1})}"
    parsed = {name: tuple(value) if isinstance(value, list) else value for name, value in vars(args).items()}
    missing = sorted(set(parsed) - set(names) - READ_BY_MAIN)
    assert not missing, f"{command}: options that no field of its settings holds: {missing}"
    assert {name: value for name, value in leaves if name in parsed} == {
        name: value for name, value in parsed.items() if name in names
    }


def test_fit_records_the_parsed_options_but_out_resume_and_the_resumable_ones():
    """What a checkpoint keeps and ``--resume`` compares: the options as parsed (lists stay lists, paths as text),
    without ``--out``, ``--resume`` and those a resume may change."""
    args = build_parser().parse_args(["fit", "--layers", "0", "-1", "--text", "t.txt", "--out", "o", "--resume"])
    settings = args.run.settings_of(args)
    assert settings.fitting.layers == ("0", "-1") and settings.resume
    assert settings.recorded["layers"] == ["0", "-1"] and settings.recorded["text"] == "t.txt"
    assert settings.recorded["command"] == "fit"
    assert set(settings.recorded) == set(vars(args)) - {
        "run",
        "out",
        "resume",
        "checkpoint_every",
        "device",
        "device_map",
        "timeout",
    }
