"""The experiments' command-line runner: settings built from the options (renamed fields, defaults kept), bad
numbers refused with exit code 2 before the benchmark loads, and a declared command's parse-run-write-print."""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from pyro_moe.errors import ConfigurationError
from pyro_moe.experiments import benchmark_model, evaluation, objectives, recipes
from pyro_moe.experiments.runner import experiment_command, parse_settings, settings_from_options


@dataclass(frozen=True)
class ToySettings:
    """Settings with a renamed field, a field no option fills and a checked number."""

    num_samples: int = 16
    n_bins: int = 15
    split: str = "test"
    untouched: float = 0.5

    def __post_init__(self) -> None:
        if self.n_bins < 1:
            raise ConfigurationError(f"n_bins must be a positive integer, got {self.n_bins}.")


class ToyResults:
    """A result with one table row and no plots (the Results protocol)."""

    def __init__(self, settings: ToySettings) -> None:
        self.settings = settings

    def to_json(self) -> dict[str, Any]:
        return {"bins": self.settings.n_bins, "nan": float("nan")}

    def to_markdown(self) -> str:
        return f"| bins |\n| ---: |\n| {self.settings.n_bins} |\n"

    def plot(self, folder: str | Path) -> list[Path]:
        return []


def test_settings_take_the_options_of_their_field_names_and_keep_the_other_defaults():
    args = argparse.Namespace(samples=4, bins=7, split="calibration", out=Path("x"), seed=3)
    settings = settings_from_options(ToySettings, args, {"num_samples": "samples", "n_bins": "bins"})
    assert settings == ToySettings(num_samples=4, n_bins=7, split="calibration", untouched=0.5)
    assert settings_from_options(ToySettings, argparse.Namespace(split="train")) == ToySettings(split="train")


def test_a_bad_number_is_refused_by_the_parser_with_exit_code_2(capsys):
    parser = argparse.ArgumentParser(prog="toy")
    parser.add_argument("--bins", type=int, default=15)
    args, settings = parse_settings(parser, ToySettings, ["--bins", "3"], {"n_bins": "bins"})
    assert args.bins == 3 and settings.n_bins == 3
    with pytest.raises(SystemExit) as exit_info:
        parse_settings(parser, ToySettings, ["--bins", "0"], {"n_bins": "bins"})
    assert (
        exit_info.value.code == 2 and "toy: error: n_bins must be a positive integer, got 0" in capsys.readouterr().err
    )


@pytest.mark.parametrize(
    ("study", "option", "message"),
    [
        (objectives, ["--particles", "0"], "num_particles must be a positive integer, got 0"),
        (objectives, ["--selection-scales", "-1"], "selection_scales[0] must be a positive number"),
        (recipes, ["--samples", "0"], "num_samples must be a positive integer, got 0"),
    ],
)
def test_the_studies_refuse_a_bad_number_before_loading_the_benchmark(
    monkeypatch, capsys, tmp_path, study, option, message
):
    monkeypatch.setattr(benchmark_model, "load_benchmark", lambda *a, **k: pytest.fail("the benchmark loaded"))
    monkeypatch.setattr(recipes, "benchmark_inputs", lambda *a, **k: pytest.fail("the benchmark loaded"))
    with pytest.raises(SystemExit) as exit_info:
        study.main(["--out", str(tmp_path), *option])
    assert exit_info.value.code == 2 and message in capsys.readouterr().err
    assert not any(tmp_path.iterdir())


def declared(seen: dict[str, Any]):
    """A command declared as the experiments declare theirs, with a run that records what it is given."""

    def run(model, tokenizer, splits, families, *, settings, fitting, answer_token_ids):
        seen.update(model=model, families=families, settings=settings, fitting=fitting, ids=answer_token_ids)
        return ToyResults(settings)

    @experiment_command("python -m toy", ToySettings, option_names={"num_samples": "samples", "n_bins": "bins"})
    def main(parser: argparse.ArgumentParser):
        """Toy experiment: its description."""
        parser.add_argument("--bins", type=int, default=15, help="bins")
        return run

    return main


def test_a_declared_command_parses_builds_runs_writes_and_prints(monkeypatch, capsys, tmp_path):
    inputs = evaluation.BenchmarkInputs("model", "tokenizer", "ids", {"train": []})
    monkeypatch.setattr(evaluation, "benchmark_inputs", lambda extend_to: inputs)
    seen: dict[str, Any] = {}
    main = declared(seen)
    assert main.__doc__ == "Toy experiment: its description." and main.__name__ == "main"
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0 and "usage: python -m toy" in capsys.readouterr().out

    main(["--out", str(tmp_path), "--bins", "4", "--samples", "2", "--families", "mfvr", "--steps", "3"])
    assert seen["model"] == "model" and seen["ids"] == "ids" and seen["families"] == ["mfvr"]
    assert seen["settings"] == ToySettings(num_samples=2, n_bins=4)
    assert seen["fitting"].steps == 3 and seen["fitting"].examples == 512
    assert json.loads((tmp_path / "metrics.json").read_text()) == {"bins": 4, "nan": None}
    assert (tmp_path / "report.md").read_text() == ToyResults(seen["settings"]).to_markdown()
    printed = capsys.readouterr().out
    assert "| 4 |" in printed and f"written: {tmp_path / 'metrics.json'} {tmp_path / 'report.md'}" in printed


def test_a_declared_command_refuses_bad_input_before_loading_the_benchmark(monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(evaluation, "benchmark_inputs", lambda extend_to: pytest.fail("the benchmark loaded"))
    main = declared({})
    for option, message in [
        (["--bins", "0"], "n_bins must be a positive integer, got 0"),
        (["--fit-examples", "0"], "examples must be a positive integer, got 0"),
        (["--families", "no-such-guide"], "unknown guide 'no-such-guide'"),
    ]:
        with pytest.raises(SystemExit) as exit_info:
            main(["--out", str(tmp_path / "out"), *option])
        assert exit_info.value.code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
