"""Guide comparison: PSIS-LOO (plain and importance-corrected) against the closed-form LOO of a conjugate
Normal model, ranking of the exact posterior above a worse one, and a short run on a tiny MoE."""

from __future__ import annotations

import math

import arviz as az
import numpy as np
import pytest
import torch
from scipy import stats

from pyro_moe import ConfigurationError
from pyro_moe.diagnostics.arviz_export import compare, loo
from pyro_moe.evaluation.bootstrap import compare_calibration
from pyro_moe.experiments.guide_comparison import GuideCase, compare_guides
from tests.helpers import ANSWERS, mcqa_batches
from tests.plot_checks import capture_figures, clipped_texts, legends_over_axes
from tests.tiny_models import tiny_model

PRIOR_SD, DRAWS = 3.0, 4000


def _conjugate_data(seed: int = 0, size: int = 30) -> np.ndarray:
    return np.random.default_rng(seed).normal(0.7, 1.0, size)


def _posterior(y: np.ndarray) -> tuple[float, float]:
    """y_i ~ N(theta, 1), theta ~ N(0, PRIOR_SD^2): the posterior mean and variance."""
    variance = 1.0 / (1.0 / PRIOR_SD**2 + len(y))
    return variance * y.sum(), variance


def _closed_form_elpd_loo(y: np.ndarray) -> float:
    """sum_i log N(y_i; m_{-i}, v_{-i} + 1), the exact leave-one-out predictive of the conjugate model."""
    total = 0.0
    for i in range(len(y)):
        mean, variance = _posterior(np.delete(y, i))
        total += stats.norm.logpdf(y[i], mean, math.sqrt(variance + 1.0))
    return total


def _export(y: np.ndarray, mean: float, sd: float, seed: int) -> az.InferenceData:
    """Draws theta_s ~ q = N(mean, sd^2) with their pointwise log-likelihood, lp and log q, as the export has them."""
    theta = np.random.default_rng(seed).normal(mean, sd, DRAWS)
    log_likelihood = stats.norm.logpdf(y[None, :], theta[:, None], 1.0)
    lp = stats.norm.logpdf(theta, 0.0, PRIOR_SD) + log_likelihood.sum(1)
    return az.from_dict(
        posterior={"theta": theta[None]},
        log_likelihood={"answer": log_likelihood[None]},
        sample_stats={"lp": lp[None], "log_q": stats.norm.logpdf(theta, mean, sd)[None]},
        dims={"answer": ["example"]},
    )


def test_psis_loo_of_the_exact_posterior_matches_the_closed_form_and_needs_no_correction():
    y = _conjugate_data()
    mean, variance = _posterior(y)
    exact = _export(y, mean, math.sqrt(variance), seed=1)
    plain, corrected = loo(exact), loo(exact, importance_corrected=True)
    assert abs(plain["elpd_loo"] - _closed_form_elpd_loo(y)) < 0.05
    # q = p(theta | y): log p(theta, y) - log q(theta) = log p(y) for every draw, so the correction changes nothing
    np.testing.assert_allclose(corrected["loo_i"].values, plain["loo_i"].values, rtol=1e-6)
    assert plain["pareto_k"].values.max() < 0.7


def test_the_exact_posterior_ranks_above_a_worse_one_and_the_correction_repairs_the_worse_one():
    y = _conjugate_data()
    mean, variance = _posterior(y)
    sd = math.sqrt(variance)
    exact, worse = _export(y, mean, sd, seed=1), _export(y, mean + 2.0 * sd, 1.5 * sd, seed=2)
    ranking = compare({"exact": loo(exact), "shifted": loo(worse)})
    assert ranking.index.tolist() == ["exact", "shifted"] and ranking.loc["exact", "rank"] == 0
    assert ranking.loc["shifted", "elpd_diff"] > 0.5
    repaired = loo(worse, importance_corrected=True)  # weights p(theta, y) / q(theta) turn q's draws into p's
    assert abs(repaired["elpd_loo"] - _closed_form_elpd_loo(y)) < 0.15
    assert repaired["pareto_k"].values.max() < 0.7


def test_loo_refuses_what_it_cannot_compute():
    y = _conjugate_data()
    no_stats = az.from_dict(
        posterior={"theta": np.zeros((1, 10))},
        log_likelihood={"answer": np.zeros((1, 10, len(y)))},
        dims={"answer": ["example"]},
    )
    with pytest.raises(ConfigurationError, match="needs lp and log_q"):
        loo(no_stats, importance_corrected=True)
    with pytest.raises(ConfigurationError, match="needs the log_likelihood group"):
        loo(az.from_dict(posterior={"theta": np.zeros((1, 10))}))
    with pytest.raises(ConfigurationError, match="at least two fits"):
        compare({"one": loo(no_stats)})


def test_compare_guides_on_a_tiny_moe_writes_table_ranking_and_figures(tmp_path, monkeypatch):
    sites = {"weight": 0.2, "temperature": {"per": "expert", "scale": 0.3}}
    cases = [
        GuideCase("mean-field, normal", sites, "mean-field"),
        GuideCase("map, laplace", {**sites, "weight": {"family": "laplace", "scale": 0.2}}, "map"),
        GuideCase(
            "temp-sampling", {"temperature": {"per": "expert", "scale": 0.3}}, "temp-sampling", selection="sample-k"
        ),
    ]
    comparison = compare_guides(
        lambda: tiny_model("granitemoe"),
        cases,
        mcqa_batches(count=2, size=6),
        mcqa_batches(count=1, size=6, seed=7),
        answer_token_ids=ANSWERS,
        layers=[1],
        steps=6,
        num_draws=8,
    )
    table = comparison.table
    assert table.index.tolist() == ["mean-field, normal", "map, laplace", "temp-sampling"]
    assert (table["loo_method"] == "importance-corrected PSIS-LOO").all()
    assert np.isfinite(table[["accuracy", "nll", "ece", "elpd_loo"]].to_numpy()).all()
    assert np.isfinite(table["final_elbo"].iloc[:2]).all() and np.isnan(table.loc["temp-sampling", "final_elbo"])
    assert set(comparison.ranking.index) == set(table.index)

    # each case's held-out metrics beside the deterministic model's with the paired interval
    test = mcqa_batches(count=1, size=6, seed=7)
    with torch.no_grad():
        hf = tiny_model("granitemoe")(test[0]["input_ids"], attention_mask=test[0]["attention_mask"]).logits
    hf_probs = hf[:, -1][:, torch.as_tensor(ANSWERS)].float().softmax(-1)
    torch.testing.assert_close(comparison.probs["deterministic"], hf_probs, atol=1e-5, rtol=1e-5)
    for name, found in comparison.comparisons.items():
        expected = compare_calibration(
            comparison.probs[name],
            hf_probs,
            comparison.labels,
            baseline="deterministic",
            metrics=["accuracy", "nll", "ece"],
        )
        assert set(found) == set(expected)
        for metric in expected:
            assert found[metric].estimate == pytest.approx(table.loc[name, metric], abs=1e-6)
            assert found[metric].baseline_estimate == pytest.approx(expected[metric].baseline_estimate, abs=1e-5)
            assert found[metric].low == pytest.approx(expected[metric].low, abs=1e-5)
            assert found[metric].high == pytest.approx(expected[metric].high, abs=1e-5)
            assert table.loc[name, f"{metric} vs deterministic"] == found[metric].format()
    figures = capture_figures(monkeypatch)
    paths = comparison.write(tmp_path, forest_variables=["temperature"])
    for name in ("forest", "elbo"):
        assert paths[name].read_bytes()[:4] == b"\x89PNG"
    for figure in figures:  # the forest plot and the ELBO curves: one legend, off the data, naming every case
        (legend,) = figure.legends
        assert not legends_over_axes(figure) and not clipped_texts(figure)
        assert [text.get_text() for text in legend.get_texts()] == [case.name for case in cases]
    assert len(figures) == 2
    with pytest.raises(ConfigurationError, match="at least two cases with distinct names"):
        compare_guides(lambda: tiny_model("granitemoe"), cases[:1], [], [], answer_token_ids=ANSWERS)
    with pytest.raises(ConfigurationError, match="num_draws must be a positive integer, got 0"):  # before any fit
        compare_guides(lambda: pytest.fail("a model was built"), cases, [], [], answer_token_ids=ANSWERS, num_draws=0)
