"""ArviZ export: groups, dims and coords, az.summary / az.loo / az.plot_forest, netCDF round trip, and the
log-likelihood checked against the HF model itself; bad input."""

from __future__ import annotations

import arviz as az
import matplotlib
import numpy as np
import pyro
import pytest
import torch
from scipy import stats

from pyro_moe import ConfigurationError, fit, patch_routers
from pyro_moe.diagnostics.arviz_export import UnknownSiteError, posterior_summary, to_inference_data
from pyro_moe.diagnostics.collapse import collapse_report
from pyro_moe.guides.registry import GUIDE_FAMILIES
from pyro_moe.inference.fitting import FittedPosterior
from pyro_moe.models.expert_patch import patch_experts
from tests.helpers import ANSWERS, FAMILY_SETUPS, SITES_FOR_SCOPE, mcqa_batches
from tests.tiny_models import tiny_model

matplotlib.use("Agg")

SITES = {"weight": 0.2, "logits": 1.0, "temperature": {"per": "expert", "scale": 0.3}}
ROUTER = "model.layers.{}.block_sparse_moe.router"
DRAWS = 30


def _param(params: dict[str, torch.Tensor], name: str) -> torch.Tensor:
    """The trained parameter ``name`` of a fit (its name carries the fit's prefix)."""
    (value,) = [value for key, value in params.items() if key.endswith(f"/{name}")]
    return value


@pytest.fixture(scope="module")
def chains():
    """Two independent fits (chains) of the same tiny Granite-MoE, each in its own parameter-store scope."""
    handle = patch_routers(tiny_model("granitemoe"), SITES, layers=[0, 1])
    fits = []
    for seed in range(2):
        with pyro.get_param_store().scope():
            options = {"steps": 12, "seed": seed, "lr": 0.03, "progress": False}
            fits.append(fit(handle, mcqa_batches(), "mean-field+mfvr", answer_token_ids=ANSWERS, **options))
    yield fits
    handle.unpatch()


@pytest.fixture(scope="module")
def held_out():
    return mcqa_batches(count=2, size=5, seed=9)


@pytest.fixture(scope="module")
def idata(chains, held_out):
    return to_inference_data(chains, held_out, num_draws=DRAWS)


def test_groups_dims_and_coords_are_as_documented(idata, chains, held_out):
    assert set(idata.groups()) == {
        "posterior",
        "prior",
        "log_likelihood",
        "posterior_predictive",
        "observed_data",
        "sample_stats",
    }
    posterior = idata.posterior
    assert posterior["weight"].dims == ("chain", "draw", "layer", "expert", "hidden")
    assert posterior["weight"].shape == (2, DRAWS, 2, 4, 32)
    assert posterior["temperature"].dims == ("chain", "draw", "layer", "expert")
    assert posterior["logits_scale"].dims == posterior["logits_shift_spread"].dims == ("chain", "draw", "layer")
    assert posterior["layer"].values.tolist() == [0, 1]
    assert posterior["expert"].values.tolist() == [0, 1, 2, 3]
    assert idata.prior["weight"].dims == ("chain", "draw", "layer", "expert", "hidden")
    assert idata.log_likelihood["answer"].dims == ("chain", "draw", "example")
    assert idata.log_likelihood["answer"].shape == (2, DRAWS, 10)
    assert idata.posterior_predictive["answer_probs"].dims == ("chain", "draw", "example", "choice")
    np.testing.assert_allclose(idata.posterior_predictive["answer_probs"].sum("choice"), 1.0, rtol=1e-6)
    labels = torch.cat([batch["labels"] for batch in held_out]).numpy()
    np.testing.assert_array_equal(idata.observed_data["answer"].values, labels)
    assert idata.sample_stats["loss"].dims == ("chain", "step")
    for index, chain in enumerate(chains):
        np.testing.assert_allclose(idata.sample_stats["loss"][index], [record["loss"] for record in chain.history])
    assert posterior.attrs["sites"].count(ROUTER.format(0)) == 3


def test_posterior_draws_follow_the_guide_and_prior_draws_follow_the_prior(idata, chains):
    """Weight draws of chain 0 have the mean-field guide's loc and scale; prior draws are N(W0, 0.2^2) (scipy KS)
    around the pretrained weights of a fresh model (fitting leaves them untouched)."""
    site = f"{ROUTER.format(1)}.weight"
    params = chains[0].engine.params
    loc = _param(params, f"AutoNormal.locs.{site}").detach().numpy()
    scale = torch.nn.functional.softplus(_param(params, f"AutoNormal.scales.{site}")).detach().numpy()
    standardised = (idata.posterior["weight"].sel(chain=0, layer=1).values - loc) / scale
    assert stats.kstest(standardised.ravel(), "norm").pvalue > 1e-3
    pretrained = tiny_model("granitemoe").get_submodule(ROUTER.format(1)).weight.detach().numpy()
    prior = (idata.prior["weight"].sel(chain=0, layer=1).values - pretrained) / 0.2
    assert stats.kstest(prior.ravel(), "norm").pvalue > 1e-3


def test_log_likelihood_is_the_hf_models_answer_log_probability_at_each_draw(held_out):
    """With a MAP guide every draw is the mode; copying it into a plain HF model gives the same log p(y | x)."""
    handle = patch_routers(tiny_model("granitemoe"), {"weight": 0.2}, layers=[1])
    posterior = fit(handle, mcqa_batches(), "map", answer_token_ids=ANSWERS, steps=5, lr=0.05, progress=False)
    exported = to_inference_data(posterior, held_out, num_draws=3)
    reference = tiny_model("granitemoe")
    with torch.no_grad():
        reference.get_submodule(ROUTER.format(1)).weight.copy_(
            torch.as_tensor(exported.posterior["weight"].sel(chain=0, draw=0, layer=1).values)
        )
        expected = []
        for batch in held_out:
            logits = reference(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, -1]
            log_probs = torch.log_softmax(logits[:, ANSWERS], -1)
            expected.append(log_probs.gather(-1, batch["labels"].unsqueeze(-1)).squeeze(-1))
    expected = torch.cat(expected).numpy()
    for draw in range(3):
        np.testing.assert_allclose(exported.log_likelihood["answer"].sel(chain=0, draw=draw), expected, atol=1e-5)
    handle.unpatch()


def test_arviz_summary_loo_and_forest_plot_accept_the_export(idata, tmp_path):
    summary = posterior_summary(idata, var_names=["temperature", "logits_scale"])
    assert {"mean", "sd", "ess_bulk", "ess_tail", "r_hat"} <= set(summary.columns)
    assert len(summary) == 2 * 4 + 2 and np.isfinite(summary["r_hat"]).all()
    loo = az.loo(idata, pointwise=True)
    assert np.isfinite(loo["elpd_loo"]) and loo["pareto_k"].shape == (10,)
    axes = az.plot_forest(idata, var_names=["temperature"], combined=False)
    figure = axes.ravel()[0].figure
    figure.savefig(tmp_path / "forest.png")
    assert (tmp_path / "forest.png").read_bytes()[:4] == b"\x89PNG"


def test_netcdf_round_trip_keeps_groups_values_dims_and_coords(idata, tmp_path):
    path = idata.to_netcdf(str(tmp_path / "posterior.nc"))
    loaded = az.from_netcdf(path)
    assert set(loaded.groups()) == set(idata.groups())
    for group in idata.groups():
        original, read = idata[group], loaded[group]
        assert set(read.data_vars) == set(original.data_vars)
        for name in original.data_vars:
            assert read[name].dims == original[name].dims
            np.testing.assert_array_equal(read[name].values, original[name].values)
        for coord in original.coords:
            np.testing.assert_array_equal(read[coord].values, original[coord].values)
    assert loaded.posterior.attrs["sites"] == idata.posterior.attrs["sites"]


def test_per_token_export_and_site_selection(chains, held_out):
    exported = to_inference_data(chains[0], held_out, num_draws=4, per_token=True, sites=[f"{ROUTER.format(1)}.logits"])
    assert list(exported.posterior.data_vars) == ["logits"]
    real_tokens = int(sum(batch["attention_mask"].sum() for batch in held_out))
    assert exported.posterior["logits"].dims == ("chain", "draw", "layer", "token", "expert")
    assert exported.posterior["logits"].shape == (1, 4, 1, real_tokens, 4)
    assert "prior" not in exported.groups()
    only_global = to_inference_data(chains[0], num_draws=4)
    assert {"posterior", "prior", "sample_stats"} == set(only_global.groups())
    assert set(only_global.posterior.data_vars) == {"weight", "temperature"}


@pytest.mark.parametrize(
    ("call", "error", "message"),
    [
        (
            lambda fits, data: to_inference_data(fits, data, sites=["model.layers.9.mlp.gate.weight"]),
            UnknownSiteError,
            r"unknown site\(s\) \['model.layers.9.mlp.gate.weight'\]; the model's sites are: model.layers.0",
        ),
        (lambda fits, data: to_inference_data([], data), ConfigurationError, r"no fit given"),
        (lambda fits, data: to_inference_data(fits, data, num_draws=0), ConfigurationError, r"positive integer, got 0"),
        (
            lambda fits, data: to_inference_data(fits, sites=[f"{ROUTER.format(0)}.logits"]),
            ConfigurationError,
            r"per-token only; give held-out batches",
        ),
        (lambda fits, data: to_inference_data(fits, []), ConfigurationError, r"the data are empty"),
        (
            lambda fits, data: posterior_summary(to_inference_data(fits[0], num_draws=2), var_names=["weights"]),
            UnknownSiteError,
            r"unknown variable\(s\) \['weights'\].*it holds weight, temperature",
        ),
        (
            lambda fits, data: patch_routers(tiny_model("granitemoe"), {"weight": {"family": "cauchy"}}),
            ConfigurationError,
            r"unknown prior family 'cauchy'; accepted: gamma, half-cauchy, horseshoe, laplace",
        ),
    ],
    ids=["unknown-site", "no-fit", "no-draws", "per-token-without-data", "empty-data", "unknown-variable", "prior"],
)
def test_bad_input_is_refused(chains, held_out, call, error, message):
    with pytest.raises(error, match=message):
        call(chains, held_out)


def test_chains_of_different_models_are_refused(chains):
    handle = patch_routers(tiny_model("granitemoe"), {"weight": 0.2}, layers=[1])
    other = fit(handle, mcqa_batches(), "mean-field", answer_token_ids=ANSWERS, steps=1, progress=False)
    with pytest.raises(ConfigurationError, match="the chains must be fits of the same model sites"):
        to_inference_data([chains[0], other])
    handle.unpatch()


def test_lp_and_log_q_are_the_log_joint_and_the_guide_density_of_each_draw(held_out):
    """Global-only model (scipy log-densities): log q = sum log N(w; loc, scale) and
    lp = sum log N(w; W0, 0.2) + sum_i log p(y_i | w)."""
    handle = patch_routers(tiny_model("granitemoe"), {"weight": 0.2}, layers=[1])
    posterior = fit(handle, mcqa_batches(), "mean-field", answer_token_ids=ANSWERS, steps=3, progress=False)
    exported = to_inference_data(posterior, held_out, num_draws=5)
    site = f"{ROUTER.format(1)}.weight"
    loc = _param(posterior.engine.params, f"AutoNormal.locs.{site}").detach().numpy()
    scale = torch.nn.functional.softplus(_param(posterior.engine.params, f"AutoNormal.scales.{site}")).detach().numpy()
    draws = exported.posterior["weight"].sel(chain=0, layer=1).values  # (draw, expert, hidden)
    log_q = stats.norm.logpdf(draws, loc, scale).sum((1, 2))
    np.testing.assert_allclose(exported.sample_stats["log_q"].sel(chain=0), log_q, rtol=1e-4)
    pretrained = tiny_model("granitemoe").get_submodule(ROUTER.format(1)).weight.detach().numpy()
    log_joint = stats.norm.logpdf(draws, pretrained, 0.2).sum((1, 2))
    log_joint += exported.log_likelihood["answer"].sel(chain=0).sum("example").values
    np.testing.assert_allclose(exported.sample_stats["lp"].sel(chain=0), log_joint, rtol=1e-4)
    assert "lp" not in to_inference_data(posterior, num_draws=2).sample_stats  # no data, no joint density
    handle.unpatch()


@pytest.mark.parametrize("name", sorted(GUIDE_FAMILIES))
def test_every_registered_family_exports_and_gets_a_collapse_report(name, held_out):
    """ArviZ export and the collapse report take any fitted family: Laplace and SWAG guides draw from
    buffers after fitting, temp-sampling has nothing trained."""
    setup = dict(FAMILY_SETUPS.get(name, {}))
    sites = setup.pop("sites", SITES_FOR_SCOPE[GUIDE_FAMILIES[name].scope])
    if sites == "experts":
        handle = patch_experts(tiny_model("granitemoe"), layers=[1], prior_precision=100.0)
    else:
        handle = patch_routers(tiny_model("granitemoe"), sites, layers=[1], selection=setup.pop("selection", "top-k"))
    steps = 24 if name == "swag" else 12  # SWAG's rank needs its snapshots
    posterior = fit(
        handle, mcqa_batches(), name, answer_token_ids=ANSWERS, steps=steps, lr=0.03, progress=False, **setup
    )
    exported = to_inference_data(posterior, held_out, num_draws=6)
    assert exported.log_likelihood["answer"].shape == (1, 6, 10)
    assert np.isfinite(exported.log_likelihood["answer"].values).all()
    assert unnamed_dims(exported) == []
    report = collapse_report(posterior, held_out, num_draws=20, local_draws=2, summary_draws=6)
    assert set(report.table["site"]) == set(handle.site_names) - {n for n in handle.site_names if n.endswith(".tokens")}
    handle.unpatch()


def unnamed_dims(exported: az.InferenceData) -> list[str]:
    """The dims ArviZ had to name itself (``<variable>_dim_<i>``), over every group."""
    return [dim for group in exported.groups() for dim in exported[group].dims if "_dim_" in str(dim)]


POST_HOC = sorted(name for name, family in GUIDE_FAMILIES.items() if family.post_hoc)


@pytest.mark.parametrize("name", POST_HOC)
def test_post_hoc_families_fitted_with_no_step_export_diagnose_and_round_trip(name, held_out, tmp_path):
    """A post-hoc Laplace at the model's weights (``steps=0``, its documented use) has no trained parameter:
    it exports, gets a collapse report and does both again after save/load, with every dim named."""
    assert POST_HOC == ["expert-laplace", "kron-laplace", "laplace"]
    setup = dict(FAMILY_SETUPS.get(name, {}))
    sites = setup.pop("sites", SITES_FOR_SCOPE[GUIDE_FAMILIES[name].scope])
    if sites == "experts":
        handle = patch_experts(tiny_model("granitemoe"), layers=[1], prior_precision=100.0)
    else:
        handle = patch_routers(tiny_model("granitemoe"), {"weight": 0.2}, layers=[1])
    posterior = fit(handle, mcqa_batches(), name, answer_token_ids=ANSWERS, steps=0, progress=False)
    assert not posterior.engine.params
    exported = to_inference_data(posterior, held_out, num_draws=6)
    (variable,) = exported.posterior.data_vars
    expected = ("layer", "expert", "hidden", "intermediate") if sites == "experts" else ("layer", "expert", "hidden")
    assert exported.posterior[variable].dims == ("chain", "draw", *expected)
    assert exported.posterior[variable].values.std(1).max() > 0  # draws from the Laplace, not a point
    assert unnamed_dims(exported) == []
    report = collapse_report(posterior, held_out, num_draws=20, summary_draws=6)
    assert list(report.table["site"]) == handle.site_names
    folder = posterior.save(tmp_path / name)
    handle.unpatch()
    loaded = FittedPosterior.load(folder, tiny_model("granitemoe"))
    again = to_inference_data(loaded, held_out, num_draws=6)
    np.testing.assert_allclose(again.posterior[variable].values, exported.posterior[variable].values, rtol=1e-6)
    assert list(collapse_report(loaded, held_out, num_draws=20, summary_draws=6).table["site"]) == handle.site_names
    loaded.patch.unpatch()
