"""Posterior-collapse report: a guide forced to zero scale is deterministic, a guide equal to the prior has
collapsed to it, a healthy fit is neither; KL against the Normal closed form; temperatures; bad input."""

from __future__ import annotations

import math

import numpy as np
import pyro
import pytest
import torch

from pyro_moe import ConfigurationError, fit, patch_routers
from pyro_moe.diagnostics.arviz_export import UnknownSiteError
from pyro_moe.diagnostics.collapse import FLAGS, CollapseThresholds, collapse_report
from tests.helpers import ANSWERS, mcqa_batches
from tests.plot_checks import capture_figures, clipped_texts, legends_over_axes
from tests.tiny_models import tiny_model

ROUTER = "model.layers.{}.block_sparse_moe.router"
HELD_OUT = mcqa_batches(count=1, size=6, seed=9)


def _param(params: dict[str, torch.Tensor], name: str) -> torch.Tensor:
    """The trained parameter ``name`` of a fit (its name carries the fit's prefix)."""
    (value,) = [value for key, value in params.items() if key.endswith(f"/{name}")]
    return value


def _fit(sites, guide, steps=12, lr=0.03, **options):
    handle = patch_routers(tiny_model("granitemoe"), sites, layers=[0, 1])
    return fit(handle, mcqa_batches(), guide, answer_token_ids=ANSWERS, steps=steps, lr=lr, progress=False, **options)


@pytest.fixture(scope="module")
def healthy():
    """Two chains of mean-field weights plus MFVR logits, trained a little (each in its own parameter scope)."""
    fits = []
    for seed in range(2):
        with pyro.get_param_store().scope():
            fits.append(_fit({"weight": 0.2, "logits": 1.0}, "mean-field+mfvr", seed=seed))
    yield fits
    fits[0].patch.unpatch()
    fits[1].patch.unpatch()


@pytest.fixture(scope="module")
def healthy_report(healthy):
    return collapse_report(healthy, HELD_OUT, num_draws=300, summary_draws=40)


def test_a_healthy_fit_is_flagged_neither_way(healthy_report):
    table = healthy_report.table
    assert len(table) == 2 * 4  # 2 chains x (2 weight + 2 logit sites)
    for flag in FLAGS:
        assert not table[flag].any(), table[["chain", "site", "sd_ratio", "kl_per_dimension", flag]]
    assert (table["scope"] == "per-token").sum() == 4
    assert table.loc[table["scope"] == "per-token", "active_fraction"].between(0, 1).all()


def test_summary_has_r_hat_and_ess_across_chains_and_the_plot_is_a_png(healthy_report, tmp_path, monkeypatch):
    summary = healthy_report.summary
    assert {"ess_bulk", "ess_tail", "r_hat"} <= set(summary.columns)
    assert np.isfinite(summary.filter(like="weight", axis=0)["r_hat"]).all()
    figures = capture_figures(monkeypatch)
    path = healthy_report.plot(tmp_path / "collapse.png")
    assert path.read_bytes()[:4] == b"\x89PNG" and path.stat().st_size > 10_000
    (figure,) = figures
    panels = figure.axes
    assert len(panels) == 2 and panels[1].get_shared_y_axes().joined(panels[0], panels[1])
    assert all(len(axis.patches) == len(healthy_report.table) for axis in panels)  # a bar per site and chain
    assert len(figure.legends) == 1 and not legends_over_axes(figure) and not clipped_texts(figure)


def test_global_kl_matches_the_normal_closed_form(healthy, healthy_report):
    """Mean-field guide N(m, s^2) against the prior N(W0, 0.2^2), per dimension:
    KL = log(0.2 / s) + (s^2 + (m - W0)^2) / (2 0.2^2) - 1/2."""
    site = f"{ROUTER.format(1)}.weight"
    params = healthy[0].engine.params
    loc = _param(params, f"AutoNormal.locs.{site}").detach().double()
    scale = torch.nn.functional.softplus(_param(params, f"AutoNormal.scales.{site}").detach().double())
    pretrained = tiny_model("granitemoe").get_submodule(ROUTER.format(1)).weight.detach().double()
    closed_form = torch.log(0.2 / scale) + (scale**2 + (loc - pretrained) ** 2) / (2 * 0.2**2) - 0.5
    estimate = healthy_report.kl_per_dimension[(0, site)]
    assert estimate.shape == (4, 32)
    np.testing.assert_allclose(estimate.sum(), closed_form.sum().item(), rtol=0.02)
    np.testing.assert_allclose(estimate, closed_form.numpy(), atol=0.25)
    row = healthy_report.table.query("chain == 0 and site == @site").iloc[0]
    np.testing.assert_allclose(row["sd_ratio"], (scale / 0.2).mean().item(), rtol=0.1)


def test_a_guide_forced_to_zero_scale_is_flagged_deterministic():
    posterior = _fit({"weight": 0.2, "logits": 1.0}, "mean-field+mfvr", steps=2)
    with torch.no_grad():
        for name, value in posterior.engine.params.items():
            if "AutoNormal.scales." in name:
                value.fill_(-80.0)  # softplus(-80) ~ 1e-35
        for encoder in posterior.guide.local_guide.logits.encoders.values():
            encoder.head.bias[4:].fill_(-80.0)  # raw (inverse-softplus) scales of the 4 experts: softplus(-80) ~ 2e-35
    report = collapse_report(posterior, HELD_OUT, num_draws=50, summary_draws=10)
    assert report.table["deterministic"].all(), report.table[["site", "sd_ratio"]]
    assert not report.table["prior_collapse"].any()
    assert sorted(site for _, site in report.flagged("deterministic")) == sorted(report.table["site"])
    posterior.patch.unpatch()


def test_a_guide_equal_to_the_prior_is_flagged_collapsed_to_the_prior():
    """An untrained MFVR guide with init_scale equal to the prior scale is q = N(W u, 1) = p: KL = 0 exactly."""
    posterior = _fit({"logits": 1.0}, "mfvr", steps=1, lr=1e-12, guide_options={"mfvr": {"init_scale": 1.0}})
    report = collapse_report(posterior, HELD_OUT, summary_draws=10)
    table = report.table
    assert table["prior_collapse"].all() and not table["deterministic"].any()
    np.testing.assert_allclose(table["kl"], 0.0, atol=1e-6)
    np.testing.assert_allclose(table["sd_ratio"], 1.0, rtol=1e-6)
    assert (table["active_fraction"] == 0).all()
    posterior.patch.unpatch()


def test_a_guide_that_follows_a_learned_prior_the_data_moved_is_not_collapsed_to_the_prior():
    """Empirical Bayes: q equals the fitted prior N(W u, 2^2) (KL 0) but the prior started at N(W u, 1):
    the KL to the initial prior is the Normal closed form log(1/2) + 2^2 / 2 - 1/2 per dimension."""
    sites = {"logits": {"scale": 1.0, "mode": "learned"}}
    posterior = _fit(sites, "mfvr", steps=1, lr=1e-12, guide_options={"mfvr": {"init_scale": 2.0}})
    with torch.no_grad():
        for name, value in posterior.engine.params.items():
            if name.endswith(".prior_scale"):
                value.fill_(math.log(2.0))  # the unconstrained (log) value of a positive parameter
    table = collapse_report(posterior, HELD_OUT, summary_draws=10).table
    np.testing.assert_allclose(table["kl_per_dimension"], 0.0, atol=1e-6)
    np.testing.assert_allclose(table["initial_prior_kl_per_dimension"], math.log(0.5) + 2.0 - 0.5, rtol=1e-5)
    assert not table["prior_collapse"].any()
    posterior.patch.unpatch()

    fixed = _fit({"logits": 2.0}, "mfvr", steps=1, lr=1e-12, guide_options={"mfvr": {"init_scale": 2.0}})
    table = collapse_report(fixed, HELD_OUT, summary_draws=10).table
    assert table["initial_prior_kl_per_dimension"].isna().all() and table["prior_collapse"].all()
    fixed.patch.unpatch()


@pytest.mark.parametrize(
    ("temperature", "flag", "other"),
    [(0.01, "deterministic", "runaway_temperature"), (60.0, "runaway_temperature", "deterministic")],
)
def test_temperature_statistics_and_flags(temperature, flag, other):
    posterior = _fit({"temperature": {"per": "expert", "scale": 0.3}}, "mean-field", steps=1, lr=1e-12)
    with torch.no_grad():
        for name, value in posterior.engine.params.items():
            if "AutoNormal.locs." in name:
                value.fill_(math.log(temperature))  # the unconstrained value of a positive site is log T
    report = collapse_report(posterior, num_draws=400, summary_draws=10)
    table = report.table
    np.testing.assert_allclose(table["temperature_median"], temperature, rtol=0.05)
    assert (table["temperature_q05"] < table["temperature_median"]).all()
    assert (table["temperature_median"] < table["temperature_q95"]).all()
    assert table[flag].all() and not table[other].any()
    posterior.patch.unpatch()


@pytest.mark.parametrize(
    ("call", "error", "message"),
    [
        (
            lambda fits: collapse_report(fits, HELD_OUT, sites=[f"{ROUTER.format(0)}.bias"]),
            UnknownSiteError,
            r"unknown site\(s\) \['model.layers.0.block_sparse_moe.router.bias'\]",
        ),
        (lambda fits: collapse_report([], HELD_OUT), ConfigurationError, r"non-empty list of them"),
        (lambda fits: collapse_report(fits, HELD_OUT, num_draws=0), ConfigurationError, r"positive integer, got 0"),
        (
            lambda fits: collapse_report(fits, sites=[f"{ROUTER.format(0)}.logits"]),
            ConfigurationError,
            r"per-token only: give held-out batches",
        ),
        (lambda fits: CollapseThresholds(hot_temperature=0.01), ConfigurationError, r"must exceed cold_temperature"),
        (
            lambda fits: CollapseThresholds(deterministic_ratio=0),
            ConfigurationError,
            r"deterministic_ratio must be a positive number, got 0",
        ),
    ],
    ids=["unknown-site", "no-fit", "no-draws", "per-token-without-data", "hot-below-cold", "zero-threshold"],
)
def test_bad_input_is_refused(healthy, call, error, message):
    with pytest.raises(error, match=message):
        call(healthy)


def test_unknown_flags_are_refused(healthy_report):
    with pytest.raises(ConfigurationError, match=r"unknown flag 'collapsed'; accepted: deterministic, prior_collapse"):
        healthy_report.flagged("collapsed")
