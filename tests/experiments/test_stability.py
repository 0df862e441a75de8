"""Stability experiment: the deterministic entry against routing_stability on the unpatched model, the
susceptible layers and threshold line, a weight posterior agreeing with itself at gamma 0, files, CLI, bad input."""

from __future__ import annotations

import json

import pytest
import torch

from pyro_moe import ConfigurationError
from pyro_moe.evaluation.stability import routing_stability, susceptible_layers
from pyro_moe.experiments import evaluation, stability
from pyro_moe.experiments.evaluation import DETERMINISTIC, FitSettings, split_batches, write_results
from pyro_moe.experiments.stability import StabilitySettings, run_stability, stability_experiment
from pyro_moe.inference import presets
from tests.experiments.tiny_evaluation import tiny_inputs, tiny_posteriors

GAMMAS = (0.0, 0.01, 0.5)


def test_deterministic_entry_susceptible_layers_and_posteriors(tmp_path):
    model, tokenizer, splits, letters = tiny_inputs()
    posteriors = tiny_posteriors(model, tokenizer, splits, letters)
    settings = StabilitySettings(gammas=GAMMAS, gamma=0.5, k=1, num_samples=4, batch_size=8, seed=2)
    results = stability_experiment(model, tokenizer, splits, posteriors, settings)
    # the calibration split by default: the susceptible layers are a modelling choice, never the test split's
    direct = routing_stability(model, split_batches(splits["calibration"], tokenizer, 8), GAMMAS, seed=2)  # unpatched
    assert results.split == "calibration"
    assert torch.equal(results.stability[DETERMINISTIC].values, direct.values)
    assert results.susceptible == susceptible_layers(direct, k=1, gamma=0.5)
    means = dict(zip(direct.layers, direct.mean[:, 2].tolist(), strict=True))
    (chosen,) = results.susceptible
    assert all(means[chosen] <= results.threshold <= mean for layer, mean in means.items() if layer != chosen)

    weights = results.stability["mean-field"]  # weights drawn once per batch: a router agrees with itself
    assert torch.equal(weights.values[:, 0], torch.ones_like(weights.values[:, 0]))
    logits = results.stability["mfvr"]  # logits drawn per call: two S-sample selections can disagree
    assert logits.values.shape == direct.values.shape and (logits.values <= 1).all()

    paths = write_results(results, tmp_path)
    written = json.loads(paths["metrics"].read_text())
    assert written["susceptible_layers"] == results.susceptible
    assert len(written["rows"]) == 3 * len(direct.layers) * len(GAMMAS)
    report = paths["report"].read_text()
    assert f"**{results.susceptible}**" in report
    # the report says what the gamma 0 column measured: 1 for the weight sites, per-call draws otherwise
    assert "gamma 0 column is 1 for weight-site families" in report
    assert "independent selections" not in report
    names = [f"stability_{name}.png" for name in ("deterministic", "mean-field", "mfvr")]
    assert [path.name for path in paths["plots"]] == names
    for path in paths["plots"]:
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 10_000


def test_threshold_selection_expert_posteriors_skipped_and_bad_input(monkeypatch):
    model, tokenizer, splits, letters = tiny_inputs()
    experts = tiny_posteriors(model, tokenizer, splits, letters, families=("expert-laplace",))
    skipping = stability_experiment(
        model, tokenizer, splits, experts, StabilitySettings(gammas=GAMMAS, gamma=0.5, examples=8)
    )
    assert skipping.skipped == ["expert-laplace"] and list(skipping.stability) == [DETERMINISTIC]
    assert "Not measured" in skipping.to_markdown()
    settings = StabilitySettings(gammas=GAMMAS, gamma=0.5, threshold=1.0, examples=8)
    results = stability_experiment(model, tokenizer, splits, {}, settings)
    direct = routing_stability(model, split_batches(splits["calibration"][:8], tokenizer, 50), GAMMAS)
    assert results.susceptible == susceptible_layers(direct, threshold=1.0, gamma=0.5) and results.threshold == 1.0

    monkeypatch.setattr(presets, "fit", lambda *a, **k: pytest.fail("fit ran before the input was checked"))
    with pytest.raises(ConfigurationError, match="unknown guide 'mfvrr'"):
        run_stability(model, tokenizer, splits, ["mfvrr"], answer_token_ids=letters)
    with pytest.raises(ConfigurationError, match="unknown split 'dev'"):
        run_stability(model, tokenizer, splits, ["mfvr"], settings=StabilitySettings(split="dev"))
    with pytest.raises(ConfigurationError, match="at most one of threshold"):
        StabilitySettings(threshold=0.9, k=1)
    with pytest.raises(ConfigurationError, match=r"SWAG rank 5 needs at least 5 snapshots"):
        run_stability(model, tokenizer, splits, ["mfvr", "swag"], fitting=FitSettings(steps=4))
    with pytest.raises(ConfigurationError, match="split 'calibration' is empty"):
        stability_experiment(model, tokenizer, {**splits, "calibration": []}, {})
    with pytest.raises(ConfigurationError, match=r"gamma 0.3 must be one of the measured gammas"):
        StabilitySettings(gammas=GAMMAS, gamma=0.3)
    with pytest.raises(ConfigurationError, match="must be a FittedPosterior"):
        stability_experiment(model, tokenizer, splits, {"ensemble": type("P", (), {"predict": lambda self: None})()})


@pytest.mark.parametrize(
    ("option", "message"),
    [
        (["--k", "0"], "k must be a positive integer, got 0"),
        (["--gamma", "-0.1"], "gamma must be a finite number >= 0, got -0.1"),
        (["--threshold", "1.5"], "threshold must be a Jaccard similarity in [0, 1], got 1.5"),
        (["--examples", "0"], "examples must be a positive integer, got 0"),
        (["--samples", "0"], "num_samples must be a positive integer, got 0"),
    ],
)
def test_cli_refuses_a_bad_number_before_loading_or_fitting(monkeypatch, capsys, tmp_path, option, message):
    monkeypatch.setattr(evaluation, "benchmark_inputs", lambda: pytest.fail("the benchmark loaded before the check"))
    monkeypatch.setattr(presets, "fit", lambda *a, **k: pytest.fail("fit ran before the input was checked"))
    with pytest.raises(SystemExit) as exit_info:
        stability.main(["--out", str(tmp_path), *option])
    assert exit_info.value.code == 2 and message in capsys.readouterr().err


def test_cli_writes_metrics_report_and_violins_on_the_benchmark(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        stability.main(["--help"])
    assert exit_info.value.code == 0 and "susceptible" in capsys.readouterr().out
    arguments = ["--out", str(tmp_path), "--families", "mean-field", "--steps", "2", "--fit-examples", "32"]
    stability.main([*arguments, "--samples", "2", "--examples", "10", "--k", "2"])
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert len(metrics["susceptible_layers"]) == 2 and metrics["k"] == 2
    assert {row["method"] for row in metrics["rows"]} == {"deterministic", "mean-field"}
    assert "Susceptible layers" in (tmp_path / "report.md").read_text()
    assert (tmp_path / "stability_mean-field.png").stat().st_size > 10_000
