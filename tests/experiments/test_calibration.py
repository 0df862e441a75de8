"""Calibration experiment: its rows against pyro_moe.evaluation.metrics on predictions recomputed directly (the HF
forward, a temperature fitted on the calibration logits, the posteriors' own predict), files, CLI, bad input."""

from __future__ import annotations

import dataclasses
import json
import math

import pyro
import pytest
import torch

from pyro_moe import ConfigurationError
from pyro_moe.data import DEFAULT_TEMPLATE
from pyro_moe.evaluation.bootstrap import BootstrapSettings, compare_calibration
from pyro_moe.evaluation.metrics import calibration_report
from pyro_moe.evaluation.temperature_scaling import fit_temperature
from pyro_moe.experiments import calibration, evaluation
from pyro_moe.experiments.calibration import CalibrationSettings, calibration_experiment, run_calibration
from pyro_moe.experiments.evaluation import (
    DETERMINISTIC,
    MODES,
    TEMPERATURE_SCALING,
    FitSettings,
    split_batches,
    verdict_line,
    write_results,
)
from pyro_moe.experiments.ood import OoDSettings
from pyro_moe.inference import presets
from pyro_moe.inference.presets import family_specs, fit_families
from pyro_moe.random_streams import question_seed, seeded
from tests.experiments.tiny_evaluation import direct_answer_probs, tiny_inputs, tiny_posteriors


def _labels(examples):
    return torch.tensor([example.answer for example in examples])


def test_every_row_equals_the_metrics_of_predictions_recomputed_directly(tmp_path):
    model, tokenizer, splits, letters = tiny_inputs()
    posteriors = tiny_posteriors(model, tokenizer, splits, letters)
    settings = CalibrationSettings(num_samples=3, batch_size=10, seed=5)
    results = calibration_experiment(model, tokenizer, splits, posteriors, settings)
    labels = _labels(splits["test"])

    probs = direct_answer_probs(model, tokenizer, splits["test"], letters)  # the unpatched HF forward
    expected = calibration_report(probs, labels)
    for key, value in results.row(DETERMINISTIC).items():
        if key in expected:
            assert value == pytest.approx(expected[key], abs=1e-5), key

    calibration_probs = direct_answer_probs(model, tokenizer, splits["calibration"], letters)
    scaling = fit_temperature(calibration_probs.log(), _labels(splits["calibration"]))
    assert results.temperature == pytest.approx(scaling.temperature, rel=1e-4)
    scaled = calibration_report((probs.log() / scaling.temperature).softmax(-1), labels)
    assert results.row(TEMPERATURE_SCALING)["nll"] == pytest.approx(scaled["nll"], abs=1e-5)
    assert results.row(TEMPERATURE_SCALING)["ece"] == pytest.approx(scaled["ece"], abs=1e-5)

    batches = split_batches(splits["test"], tokenizer, 10)
    for name, posterior in posteriors.items():
        for mode in MODES:
            pyro.set_rng_seed(5)
            direct = [posterior.predict(b["input_ids"], b["attention_mask"], num_samples=3, mode=mode) for b in batches]
            expected = calibration_report(torch.cat([p.probs for p in direct]), labels)
            row = results.row(name, mode)
            assert {k: row[k] for k in expected} == pytest.approx(expected, abs=1e-6), (name, mode)

    paths = write_results(results, tmp_path)
    written = json.loads(paths["metrics"].read_text())
    # JSON has no infinity: the temperature of logits without signal (T = inf) is written as null
    temperature = results.temperature if math.isfinite(results.temperature) else None
    assert written["temperature"] == pytest.approx(temperature)
    assert len(written["rows"]) == 2 + len(posteriors) * len(MODES)
    report = paths["report"].read_text()
    for mode in MODES:  # every mode's table holds both baselines beside the families
        table = report.split(f"## {mode}")[1].split("![")[0]
        assert "| deterministic |" in table and "| temperature scaling |" in table and "| mfvr |" in table
    assert len(paths["plots"]) == len(MODES)
    for path in paths["plots"]:
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 10_000


def test_every_row_carries_the_paired_interval_of_its_difference_from_the_baseline(tmp_path):
    model, tokenizer, splits, letters = tiny_inputs()
    posteriors = tiny_posteriors(model, tokenizer, splits, letters)
    bootstrap = BootstrapSettings(resamples=300, seed=2)
    settings = CalibrationSettings(num_samples=3, batch_size=10, seed=5, bootstrap=bootstrap)
    results = calibration_experiment(model, tokenizer, splits, posteriors, settings)
    labels = _labels(splits["test"])
    assert torch.equal(results.labels, labels)
    hf = direct_answer_probs(model, tokenizer, splits["test"], letters)  # the per-question values kept are the HF ones
    assert torch.allclose(results.probs[DETERMINISTIC, "any"], hf, atol=1e-5)

    baseline = (TEMPERATURE_SCALING, "any")
    assert set(results.comparisons) == {(row["method"], row["mode"]) for row in results.rows} - {baseline}
    for (method, mode), found in results.comparisons.items():
        expected = compare_calibration(
            results.probs[method, mode],
            results.probs[baseline],
            labels,
            baseline=TEMPERATURE_SCALING,
            settings=bootstrap,
        )
        assert found == expected, (method, mode)
        row = results.row(method, mode)
        for metric in ("accuracy", "nll", "ece", "brier"):
            assert found[metric].estimate == pytest.approx(row[metric], abs=1e-5)
            assert found[metric].baseline_estimate == pytest.approx(results.row(TEMPERATURE_SCALING)[metric], abs=1e-5)

    itself = results.compare("mfvr", MODES[0], ("mfvr", MODES[0]))  # a method against itself: [0, 0], a tie
    assert all((c.low, c.difference, c.high, c.verdict) == (0.0, 0.0, 0.0, "ties") for c in itself.values())
    with pytest.raises(ConfigurationError, match="no row"):
        results.compare("mfvr", MODES[0], ("nothing", "any"))

    paths = write_results(results, tmp_path)
    report = paths["report"].read_text()
    nll = results.comparisons["mfvr", MODES[0]]["nll"]
    assert nll.format() in report and "paired bootstrap 95% interval" in report
    assert verdict_line(f"mfvr ({MODES[0]})", results.comparisons["mfvr", MODES[0]]) in report
    written = json.loads(paths["metrics"].read_text())
    assert written["baseline"] == TEMPERATURE_SCALING and written["bootstrap"]["resamples"] == 300
    assert len(written["comparisons"]) == 4 * len(results.comparisons)

    deterministic = CalibrationSettings(num_samples=3, batch_size=10, baseline=DETERMINISTIC, bootstrap=bootstrap)
    against_hf = calibration_experiment(model, tokenizer, splits, {}, deterministic)
    assert set(against_hf.comparisons) == {baseline}
    assert against_hf.comparisons[baseline]["nll"].baseline == DETERMINISTIC
    with pytest.raises(ConfigurationError, match="unknown baseline 'mfvr'"):
        CalibrationSettings(baseline="mfvr")


def test_baseline_families_by_name_get_their_setups_and_expert_sites_model_average_only():
    model, tokenizer, splits, letters = tiny_inputs()
    names = ["temp-sampling", "mc-dropout", "swag", "ensemble", "expert-laplace"]
    specs = {spec.name: spec for spec in family_specs(names, steps=40)}
    assert specs["temp-sampling"].selection == "sample-k"
    assert specs["mc-dropout"].sites["dropout"] > 0
    schedule = specs["swag"].options["guide_options"]["swag"]
    assert schedule["burn_in"] + schedule["rank"] * schedule["every"] <= 40  # enough snapshots for the rank
    ensemble = specs["ensemble"].options
    assert ensemble["num_particles"] == ensemble["guide_options"]["ensemble"]["members"]  # trained together
    experts = specs["expert-laplace"]
    assert experts.sites == "experts" and experts.options["steps"] == 0 and experts.tune.grid == (3, 10, 30, 100)
    with pytest.raises(ConfigurationError, match="choose hyperparameters on validation data"):
        fit_families(model, split_batches(splits["train"], tokenizer, 8), [experts], answer_token_ids=letters)
    results = run_calibration(
        model,
        tokenizer,
        splits,
        ["temp-sampling", "expert-laplace"],
        settings=CalibrationSettings(num_samples=2),
        fitting=FitSettings(steps=2),
        answer_token_ids=letters,
    )
    modes = {(row["method"], row["mode"]) for row in results.rows}
    assert {("temp-sampling", MODES[0]), ("temp-sampling", MODES[1]), ("expert-laplace", "model-average")} <= modes
    assert ("expert-laplace", "routing-average") not in modes  # each joint sample runs its own experts


def test_per_question_draws_predict_every_question_alone_under_its_own_seed():
    """``draws="per-question"``: every question's probabilities are those of ``predict`` on its prompt alone under
    ``seeded(question_seed(seed, prompt))``, whatever the batch size and the order of the questions."""
    model, tokenizer, splits, letters = tiny_inputs()
    posteriors = tiny_posteriors(model, tokenizer, splits, letters)
    settings = CalibrationSettings(num_samples=3, batch_size=10, seed=5, draws="per-question")
    results = calibration_experiment(model, tokenizer, splits, posteriors, settings)
    reversed_splits = dict(splits, test=splits["test"][::-1])  # other batches, other neighbours, other padding
    again = calibration_experiment(
        model, tokenizer, reversed_splits, posteriors, dataclasses.replace(settings, batch_size=7)
    )
    for name, posterior in posteriors.items():
        for mode in MODES:
            direct = []
            for example in splits["test"]:
                input_ids = tokenizer(DEFAULT_TEMPLATE.render(example), return_tensors="pt")["input_ids"]
                with seeded(question_seed(5, input_ids)):
                    direct.append(posterior.predict(input_ids, num_samples=3, mode=mode).probs)
            torch.testing.assert_close(results.probs[name, mode], torch.cat(direct), atol=1e-6, rtol=0)
            torch.testing.assert_close(again.probs[name, mode], results.probs[name, mode].flip(0), atol=1e-6, rtol=0)


def test_unknown_draws_are_refused_when_the_settings_are_built():
    for settings in (CalibrationSettings, OoDSettings):
        with pytest.raises(ConfigurationError, match="unknown draws 'per-row'; accepted: per-batch, per-question"):
            settings(draws="per-row")


def test_bad_input_is_refused_before_anything_is_fitted(monkeypatch):
    model, tokenizer, splits, letters = tiny_inputs()

    def no_fit(*args, **kwargs):
        raise AssertionError("fit ran before the input was checked")

    monkeypatch.setattr(presets, "fit", no_fit)
    with pytest.raises(ConfigurationError, match=r"unknown guide 'no-such-guide'; registered guides: .*mean-field"):
        run_calibration(model, tokenizer, splits, ["no-such-guide"], answer_token_ids=letters)
    with pytest.raises(ConfigurationError, match="unknown split 'held_out'; the splits given are"):
        run_calibration(model, tokenizer, splits, ["mfvr"], settings=CalibrationSettings(test_split="held_out"))
    with pytest.raises(ConfigurationError, match="split 'calibration' is empty"):
        run_calibration(model, tokenizer, {**splits, "calibration": []}, ["mfvr"])
    with pytest.raises(ConfigurationError, match="unknown predictive modes"):
        CalibrationSettings(modes=["bayesian"])
    with pytest.raises(ConfigurationError, match=r"SWAG rank 5 needs at least 5 snapshots, but 8 steps"):
        run_calibration(model, tokenizer, splits, ["mean-field", "swag"], fitting=FitSettings(steps=8))
    with pytest.raises(ConfigurationError, match="family names must be distinct"):
        run_calibration(model, tokenizer, splits, ["mfvr", "mfvr"])
    with pytest.raises(ConfigurationError, match="has no predict method"):
        calibration_experiment(model, tokenizer, splits, {"mfvr": object()})


@pytest.mark.parametrize(
    ("option", "message"),
    [
        (["--test-examples", "0"], "test_examples must be a positive integer, got 0"),
        (["--bins", "0"], "n_bins must be a positive integer, got 0"),
        (["--samples", "0"], "num_samples must be a positive integer, got 0"),
        (["--batch-size", "0"], "batch_size must be a positive integer, got 0"),
        (["--steps", "0"], "steps must be a positive integer, got 0"),
        (["--fit-examples", "-1"], "examples must be a positive integer, got -1"),
    ],
)
def test_cli_refuses_a_bad_number_before_loading_or_fitting(monkeypatch, capsys, tmp_path, option, message):
    monkeypatch.setattr(evaluation, "benchmark_inputs", lambda: pytest.fail("the benchmark loaded before the check"))
    monkeypatch.setattr(presets, "fit", lambda *a, **k: pytest.fail("fit ran before the input was checked"))
    with pytest.raises(SystemExit) as exit_info:
        calibration.main(["--out", str(tmp_path), *option])
    assert exit_info.value.code == 2 and message in capsys.readouterr().err


def test_cli_test_size_enlarges_the_benchmark_test_split_with_fresh_questions(monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(presets, "fit", lambda *a, **k: pytest.fail("fit ran before the input was checked"))
    with pytest.raises(SystemExit) as exit_info:
        calibration.main(["--out", str(tmp_path), "--test-size", "1003"])
    assert exit_info.value.code == 2 and "multiple of its 5 task families" in capsys.readouterr().err
    given = {}

    def measured(model, tokenizer, splits, families, **options):  # the experiment itself: tested above
        given.update(splits)
        raise ConfigurationError("stopped after receiving the splits")

    monkeypatch.setattr(calibration, "run_calibration", measured)
    with pytest.raises(SystemExit):
        calibration.main(["--out", str(tmp_path), "--test-size", "1020", "--ood-size", "1040"])
    shipped = evaluation.benchmark_inputs().splits
    assert len(given["test"]) == 1020 and given["test"][:1000] == shipped["test"]
    assert len(given["far_ood"]) == len(given["near_ood"]) == 1040
    assert given["train"] == shipped["train"] and given["calibration"] == shipped["calibration"]
    seen = {example.question for split in ("train", "calibration") for example in shipped[split]}
    assert not seen & {example.question for example in given["test"]}


def test_cli_measures_5000_test_questions_by_default_and_the_ood_cli_keeps_the_shipped_1000(monkeypatch, tmp_path):
    from pyro_moe.experiments import ood

    given = {}

    def measured(model, tokenizer, splits, families, **options):  # the experiment itself: tested above
        given.update(splits)
        raise ConfigurationError("stopped after receiving the splits")

    monkeypatch.setattr(calibration, "run_calibration", measured)
    monkeypatch.setattr(ood, "run_ood", measured)
    with pytest.raises(SystemExit):
        calibration.main(["--out", str(tmp_path)])
    assert len(given["test"]) == calibration.DEFAULT_TEST_SIZE == 5000
    assert len(given["far_ood"]) == 1000  # the calibration experiment reads no OoD split
    with pytest.raises(SystemExit):
        calibration.main(["--out", str(tmp_path), "--test-size", "1000"])
    assert len(given["test"]) == 1000
    with pytest.raises(SystemExit):
        ood.main(["--out", str(tmp_path)])
    assert len(given["test"]) == len(given["far_ood"]) == 1000


def test_cli_writes_metrics_report_and_plots_on_the_benchmark(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        calibration.main(["--help"])
    assert exit_info.value.code == 0 and "temperature scaling" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exit_info:
        calibration.main(["--out", str(tmp_path), "--families", "mfvr", "no-such-guide"])
    assert exit_info.value.code == 2 and "unknown guide 'no-such-guide'" in capsys.readouterr().err
    assert not (tmp_path / "metrics.json").exists()
    arguments = ["--out", str(tmp_path), "--families", "mfvr", "--steps", "2", "--fit-examples", "32"]
    calibration.main([*arguments, "--samples", "2", "--test-examples", "40"])
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    methods = {(row["method"], row["mode"]) for row in metrics["rows"]}
    assert methods == {(DETERMINISTIC, "any"), (TEMPERATURE_SCALING, "any"), ("mfvr", MODES[0]), ("mfvr", MODES[1])}
    assert all(row["count"] == 40 for row in metrics["rows"])
    assert metrics["temperature"] > 1  # the benchmark model is overconfident
    assert "| temperature scaling |" in (tmp_path / "report.md").read_text()
    assert all((tmp_path / f"reliability_{mode}.png").stat().st_size > 10_000 for mode in MODES)


def test_a_calibrated_posterior_shows_its_calibrated_figures_in_its_calibrated_mode_only():
    model, tokenizer, splits, letters = tiny_inputs()
    for split in ("calibration", "test"):  # labels the random model gets two thirds right: a finite temperature
        answers = direct_answer_probs(model, tokenizer, splits[split], letters).argmax(-1).tolist()
        splits[split] = [
            dataclasses.replace(e, answer=a if i % 3 else (a + 1) % 4)
            for i, (e, a) in enumerate(zip(splits[split], answers, strict=True))
        ]
    (posterior,) = tiny_posteriors(model, tokenizer, splits, letters, families=("mfvr",)).values()
    scaling = posterior.calibrate(split_batches(splits["calibration"], tokenizer, 8), num_samples=3, seed=1)
    assert math.isfinite(scaling.temperature) and abs(scaling.temperature - 1) > 0.05
    settings = CalibrationSettings(num_samples=3, batch_size=10, seed=5)
    results = calibration_experiment(model, tokenizer, splits, {"calibrated mfvr": posterior}, settings)
    labels = _labels(splits["test"])
    batches = split_batches(splits["test"], tokenizer, 10)
    for mode in MODES:
        pyro.set_rng_seed(5)  # the plain averages of the same draws, tempered here where calibrated
        average = torch.cat(
            [
                posterior.predict(b["input_ids"], b["attention_mask"], num_samples=3, mode=mode, calibrated=False).probs
                for b in batches
            ]
        )
        probs = (average.log() / scaling.temperature).softmax(-1) if mode == "model-average" else average
        expected = calibration_report(probs, labels)
        row = results.row("calibrated mfvr", mode)
        assert {k: row[k] for k in expected} == pytest.approx(expected, abs=1e-6), mode
        if mode == "model-average":  # the temperature moved the figures, not the answers
            assert row["nll"] != pytest.approx(calibration_report(average, labels)["nll"], abs=1e-4)
            assert row["accuracy"] == calibration_report(average, labels)["accuracy"]
