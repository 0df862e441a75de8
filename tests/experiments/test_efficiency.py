"""Efficiency experiment: the memory and FLOP measures against closed forms, FLOPs of the deterministic
model against FlopCounterMode on the HF forward and of model-average against S times that, files, CLI, bad input."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from pyro_moe import ConfigurationError
from pyro_moe.experiments import efficiency, evaluation
from pyro_moe.experiments.efficiency import (
    EfficiencySettings,
    count_flops,
    efficiency_experiment,
    measure_peak_memory,
    run_efficiency,
)
from pyro_moe.experiments.evaluation import DETERMINISTIC, MODES, FitSettings, split_batches, write_results
from pyro_moe.inference import presets
from tests.experiments.tiny_evaluation import tiny_inputs, tiny_posteriors


def test_peak_memory_and_flops_of_known_computations():
    x = torch.randn(256, 128)

    def three_live_matrices():  # a, relu(a) and b alive together: 3 x 256 x 256 float32 at the peak
        a = x @ x.T
        b = a.relu() @ a
        return b.sum()

    assert measure_peak_memory(three_live_matrices, torch.device("cpu")) == 3 * 256 * 256 * 4
    assert count_flops(three_live_matrices) == 2 * 256 * 128 * 256 + 2 * 256 * 256 * 256


def test_rows_against_flop_counts_of_the_hf_forward(tmp_path):
    model, tokenizer, splits, letters = tiny_inputs()
    posteriors = tiny_posteriors(model, tokenizer, splits, letters)
    settings = EfficiencySettings(num_samples=4, batch_size=8, repeats=1)
    results = efficiency_experiment(model, tokenizer, splits, posteriors, settings)

    (batch,) = split_batches(splits["test"][:8], tokenizer, 8)
    with FlopCounterMode(display=False) as counter, torch.no_grad():  # the unpatched HF forward, last position
        model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], logits_to_keep=1)
    tokens = int(batch["attention_mask"].sum())
    rows = {(row["method"], row["mode"]): row for row in results.rows}
    assert results.tokens == tokens
    assert rows[DETERMINISTIC, "any"]["mflops_per_token"] == pytest.approx(counter.get_total_flops() / tokens / 1e6)
    # weight sites in every layer: model-average runs the whole network once per sample, nothing else
    assert rows["mean-field", "model-average"]["flops_ratio"] == pytest.approx(4.0)
    assert rows["mfvr", "model-average"]["flops_ratio"] > 4.0  # plus the amortized guide's encoder
    for row in results.rows:
        assert all(math.isfinite(row[key]) for key in ("latency_ms", "peak_memory_mib", "mflops_per_token"))
        assert row["peak_memory_mib"] > 0
    assert rows["mean-field", "model-average"]["memory_ratio"] > rows["mean-field", "routing-average"]["memory_ratio"]

    paths = write_results(results, tmp_path)
    written = json.loads(paths["metrics"].read_text())
    assert len(written["rows"]) == 1 + len(posteriors) * len(MODES) and written["device"] == "cpu"
    assert "profiler" in written["memory_measure"]
    (plot,) = paths["plots"]
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and plot.stat().st_size > 10_000


def test_bad_input_is_refused_before_anything_is_fitted(monkeypatch):
    model, tokenizer, splits, letters = tiny_inputs()
    monkeypatch.setattr(presets, "fit", lambda *a, **k: pytest.fail("fit ran before the input was checked"))
    with pytest.raises(ConfigurationError, match="unknown guide 'kron'"):
        run_efficiency(model, tokenizer, splits, ["kron"], answer_token_ids=letters)
    with pytest.raises(ConfigurationError, match="unknown split 'bench'"):
        run_efficiency(model, tokenizer, splits, ["mfvr"], settings=EfficiencySettings(split="bench"))
    with pytest.raises(ConfigurationError, match="unknown predictive modes"):
        EfficiencySettings(modes=[])
    with pytest.raises(ConfigurationError, match="repeats must be a positive integer"):
        EfficiencySettings(repeats=0)
    with pytest.raises(ConfigurationError, match=r"SWAG rank 5 needs at least 5 snapshots"):
        run_efficiency(model, tokenizer, splits, ["swag"], fitting=FitSettings(steps=5))


@pytest.mark.parametrize(
    ("option", "message"),
    [
        (["--repeats", "0"], "repeats must be a positive integer, got 0"),
        (["--samples", "0"], "num_samples must be a positive integer, got 0"),
        (["--batch-size", "0"], "batch_size must be a positive integer, got 0"),
    ],
)
def test_cli_refuses_a_bad_number_before_loading_or_fitting(monkeypatch, capsys, tmp_path, option, message):
    monkeypatch.setattr(evaluation, "benchmark_inputs", lambda: pytest.fail("the benchmark loaded before the check"))
    monkeypatch.setattr(presets, "fit", lambda *a, **k: pytest.fail("fit ran before the input was checked"))
    with pytest.raises(SystemExit) as exit_info:
        efficiency.main(["--out", str(tmp_path), *option])
    assert exit_info.value.code == 2 and message in capsys.readouterr().err


def test_cli_writes_metrics_report_and_bars_on_the_benchmark(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        efficiency.main(["--help"])
    assert exit_info.value.code == 0 and "FLOPs per token" in capsys.readouterr().out
    arguments = ["--out", str(tmp_path), "--families", "mean-field", "--steps", "1", "--fit-examples", "16"]
    efficiency.main([*arguments, "--samples", "2", "--batch-size", "8", "--repeats", "1"])
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert [row["method"] for row in metrics["rows"]] == ["deterministic", "mean-field", "mean-field"]
    assert metrics["rows"][0]["flops_ratio"] == 1.0 and metrics["batch_shape"][0] == 8
    assert "| deterministic |" in (tmp_path / "report.md").read_text()
    assert (tmp_path / "efficiency.png").stat().st_size > 10_000
