"""Local reparameterisation of router-weight sites in routing-average: each token's logits drawn from
their Normal marginal against explicit draws of S weight matrices, the closed form
``N(u loc^T + b_loc, (u^2) (scale^2)^T + b_scale^2)`` and scipy's Kolmogorov-Smirnov tests."""

from __future__ import annotations

import pyro
import pytest
import torch
from pyro import poutine
from scipy import stats

from pyro_moe import ConfigurationError, at_prior_mean, find_moe_routers, fit, patch_routers, predict
from pyro_moe.core.routing_context import PARTICLE_DIM, routing_context
from tests.helpers import ANSWERS, mcqa_batches
from tests.tiny_models import tiny_model

DRAWS = 20_000


def first_router(handle):
    return next(iter(handle.routers.values()))


def router_logits(router, hidden: torch.Tensor, local: bool, samples: int = DRAWS, **data) -> torch.Tensor:
    """The routing-average draws of ``router``'s (tempered) logits ``(samples, tokens, experts)`` for the
    router input ``hidden`` ``(tokens, hidden)``, with the sites in ``data`` conditioned."""
    record: dict[str, torch.Tensor] = {}
    with (
        torch.no_grad(),
        routing_context(mode="routing-average", local_reparameterization=local, recorded_logits=record),
        pyro.plate("samples", samples, dim=PARTICLE_DIM),
        poutine.condition(data=data),
    ):
        router(hidden)
    return record[router.path]


def assert_moments(draws: torch.Tensor, mean: torch.Tensor, variance: torch.Tensor) -> None:
    """Per-coordinate sample mean and variance of ``draws`` ``(S, ...)`` within 5 Monte Carlo standard
    errors of ``mean`` and ``variance`` (the variance of a sample variance of Normals: ``2 var^2 / (S - 1)``)."""
    samples = draws.shape[0]
    torch.testing.assert_close(draws.mean(0), mean, atol=5 * (variance / samples).sqrt().max().item(), rtol=0)
    torch.testing.assert_close(
        draws.var(0) / variance, torch.ones_like(variance), atol=5 * (2 / samples) ** 0.5, rtol=0
    )


def assert_same_distribution(first: torch.Tensor, second: torch.Tensor) -> None:
    """Every coordinate of two ``(S, tokens, experts)`` samples passes the two-sample KS test at 1e-4."""
    pvalues = [
        stats.ks_2samp(first[:, t, e].numpy(), second[:, t, e].numpy()).pvalue
        for t in range(first.shape[1])
        for e in range(first.shape[2])
    ]
    assert min(pvalues) > 1e-4, pvalues


@pytest.mark.parametrize("family", ["granitemoe", "gpt_oss"])  # GPT-OSS: a router bias, a site of its own
def test_per_token_logits_match_the_closed_form_and_the_explicit_draws(family):
    model = tiny_model(family)
    original = model.get_submodule(find_moe_routers(model)[0].path)
    weight = original.weight.detach().clone()
    bias = getattr(original, "bias", None)
    handle = patch_routers(model, {"weight": 0.3}, layers=[0])
    router = first_router(handle)
    hidden = torch.randn(3, weight.shape[1], generator=torch.Generator().manual_seed(1))
    hidden[1] = hidden[0] + 0.5 * hidden[1]  # two similar tokens: explicit draws correlate their logits
    mean = hidden @ weight.T + (0 if bias is None else bias.detach())
    variance = 0.3**2 * (hidden.square().sum(-1, keepdim=True) + (0 if bias is None else 1)).expand_as(mean)

    local = router_logits(router, hidden, local=True)
    explicit = router_logits(router, hidden, local=False)
    assert local.shape == explicit.shape == (DRAWS, *mean.shape)
    assert_moments(local, mean, variance)
    assert_moments(explicit, mean, variance)
    standardised = ((local - mean) / variance.sqrt()).reshape(DRAWS, -1)
    assert min(stats.kstest(column.numpy(), "norm").pvalue for column in standardised.T) > 1e-4
    assert_same_distribution(local, explicit)
    # two tokens' logits: correlated through the S shared weight matrices (and bias), independent here;
    # explicit: cov = s^2 (u0 . u1 + 1 with a bias), var = s^2 (|u|^2 + 1 with a bias)
    shared = 0 if bias is None else 1
    expected = (hidden[0] @ hidden[1] + shared) / (
        (hidden[0].square().sum() + shared) * (hidden[1].square().sum() + shared)
    ).sqrt()
    assert abs(torch.corrcoef(explicit[:, :2, 0].T)[0, 1] - expected) < 0.03
    assert abs(torch.corrcoef(local[:, :2, 0].T)[0, 1]) < 0.03


def mean_field_posterior(family: str, sites: dict):
    """A mean-field posterior over the first MoE layer's router sites with its locs moved off the prior
    mean and its scales spread over (0.05, 0.7), so that the closed form is not the prior's."""
    handle = patch_routers(tiny_model(family), sites, layers=[0])
    posterior = fit(handle, mcqa_batches(1, 4), "mean-field", answer_token_ids=ANSWERS, steps=1, progress=False)
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, param in posterior.engine.params.items():
            if "AutoNormal.locs." in name:
                param.add_(0.2 * torch.randn(param.shape, generator=generator))
            elif "AutoNormal.scales." in name:  # softplus of (-3, 0): (0.05, 0.69)
                param.copy_(torch.empty(param.shape).uniform_(-3.0, 0.0, generator=generator))
    return posterior


def guide_parameters(posterior, site: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``loc`` and ``scale`` of ``site`` read from the fit's parameters (AutoNormal: softplus scales)."""
    params = {name.rpartition("AutoNormal.")[2]: value for name, value in posterior.engine.params.items()}
    return params[f"locs.{site}"].detach(), torch.nn.functional.softplus(params[f"scales.{site}"].detach())


@pytest.mark.parametrize("family", ["granitemoe", "gpt_oss"])
def test_mean_field_predictions_draw_from_the_guides_marginals(family):
    posterior = mean_field_posterior(family, {"weight": 0.2})
    router = first_router(posterior.patch)
    loc, scale = guide_parameters(posterior, router.site_name("weight"))
    captured = []
    hook = router.register_forward_hook(lambda module, args, output: captured.append(args[0].detach()))
    input_ids = torch.randint(8, 60, (1, 3), generator=torch.Generator().manual_seed(2))
    draws = {}
    for local in (True, False):
        prediction = posterior.predict(
            input_ids,
            num_samples=DRAWS,
            mode="routing-average",
            local_reparameterization=local,
            return_router_logits=True,
        )
        draws[local] = prediction.router_logits[router.path].reshape(DRAWS, 3, -1)
    hook.remove()
    hidden = captured[0].reshape(3, -1)  # the first MoE layer's input: the same in both passes
    torch.testing.assert_close(captured[1].reshape(3, -1), hidden)
    mean, variance = hidden @ loc.T, hidden.square() @ scale.square().T
    if getattr(router, "bias", None) is not None:
        bias_loc, bias_scale = guide_parameters(posterior, router.site_name("bias"))
        mean, variance = mean + bias_loc, variance + bias_scale.square()
    assert_moments(draws[True], mean, variance)
    assert_moments(draws[False], mean, variance)
    assert_same_distribution(draws[True], draws[False])
    guide = posterior.guide.global_guide
    torch.testing.assert_close(guide.normal_marginal(router.site_name("weight")), (loc, scale))
    posterior.patch.unpatch()


def test_routing_average_prediction_converges_to_the_explicit_one():
    """Both estimate the same limit, every token's expected scores: at S = 8192 they agree far closer than
    either is to the deterministic model, and closer than at S = 4."""
    handle = patch_routers(tiny_model("granitemoe"), {"weight": 1.0})
    input_ids = torch.randint(8, 60, (4, 6), generator=torch.Generator().manual_seed(0))
    with at_prior_mean():
        deterministic = predict(handle, input_ids, num_samples=1, mode="routing-average").probs.log()

    def log_probs(samples: int, local: bool, seed: int) -> torch.Tensor:
        pyro.set_rng_seed(seed)
        options = dict(num_samples=samples, mode="routing-average", local_reparameterization=local)
        return predict(handle, input_ids, **options).probs.log()

    gap = {samples: (log_probs(samples, True, 0) - log_probs(samples, False, 1)).abs().max() for samples in (4, 8192)}
    limit = (log_probs(8192, False, 2) - deterministic).abs().max()
    assert gap[8192] < 0.25 * limit
    assert gap[8192] < 0.25 * gap[4]


@pytest.mark.parametrize(
    "sites",
    [
        {"weight": 0.3, "temperature": 0.3},
        {"weight": 0.3, "logits": 0.5},
        {"weight": 0.3, "dropout": 0.2},
        {"weight": {"scale": 0.3, "mode": "hierarchical"}},
        {"weight": {"scale": 0.3, "scale_per": "expert"}},
    ],
    ids=["temperature", "logits", "dropout", "hierarchical-scale", "per-expert-scale"],
)
def test_other_sites_combine_with_local_draws_as_with_explicit_ones(sites):
    """Temperatures divide, logit sites are centred on, dropout masks the input of, the local draws; a
    hierarchical prior scale is drawn per sample: per token, the same distribution as with explicit draws."""
    handle = patch_routers(tiny_model("granitemoe"), sites, layers=[0])
    router = first_router(handle)
    hidden = torch.randn(3, router.weight.shape[1], generator=torch.Generator().manual_seed(1))
    local, explicit = router_logits(router, hidden, local=True), router_logits(router, hidden, local=False)
    assert_same_distribution(local, explicit)
    torch.testing.assert_close(local.mean(0), explicit.mean(0), atol=0.1, rtol=0)
    torch.testing.assert_close(local.var(0), explicit.var(0), atol=0, rtol=0.1)


def test_closed_forms_with_a_temperature_and_with_logit_sites():
    """Weight draws divided by a temperature fixed at 2: ``N(m / 2, v / 4)``; logit sites around them
    (prior scale 0.5): ``N(m, v + 0.25)``."""
    handle = patch_routers(tiny_model("granitemoe"), {"weight": 0.3, "temperature": 0.3}, layers=[0])
    router = first_router(handle)
    hidden = torch.randn(3, router.weight.shape[1], generator=torch.Generator().manual_seed(1))
    mean = hidden @ router.weight.detach().T
    variance = (0.09 * hidden.square().sum(-1, keepdim=True)).expand_as(mean)
    tempered = router_logits(router, hidden, local=True, **{router.site_name("temperature"): torch.tensor(2.0)})
    assert_moments(tempered, mean / 2, variance / 4)
    handle.unpatch()
    handle = patch_routers(tiny_model("granitemoe"), {"weight": 0.3, "logits": 0.5}, layers=[0])
    assert_moments(router_logits(first_router(handle), hidden, local=True), mean, variance + 0.25)


def test_gradients_reach_the_guides_loc_and_scale_unbiased_and_the_site_stays_for_the_kl():
    """With gradients on, the weight site is declared (conditioned on the guide's draw, for an ELBO's KL
    term) while the logits come from the marginals: ``E[l^2] = m^2 + v`` gives ``d/d loc = 2 m u`` and
    ``d/d scale = 2 scale u^2`` per expert and hidden unit; the router input repeated over many tokens
    makes the draws independent, so their mean estimates them. Under ``no_grad`` the site is not drawn."""
    posterior = mean_field_posterior("granitemoe", {"weight": 0.2})
    router = first_router(posterior.patch)
    site = router.site_name("weight")
    names = {
        kind: next(n for n in posterior.engine.params if f"AutoNormal.{kind}.{site}" in n)
        for kind in ("locs", "scales")
    }
    raw_loc, raw_scale = (posterior.engine.params[names[kind]] for kind in ("locs", "scales"))
    loc, scale = raw_loc.detach(), torch.nn.functional.softplus(raw_scale.detach())
    token = torch.randn(1, router.weight.shape[1], generator=torch.Generator().manual_seed(4))
    ids = torch.zeros(1, 2, dtype=torch.long)
    for param in (raw_loc, raw_scale):
        param.grad = None
    with (
        routing_context(mode="routing-average", local_reparameterization=True),
        posterior.guide.posterior(ids, torch.ones_like(ids)),
        poutine.trace() as tracer,
    ):
        logits, _, _ = router(token.expand(50_000, -1))
    assert site in tracer.trace.nodes and tracer.trace.nodes[site]["is_observed"]
    logits.square().sum(-1).mean().backward()
    mean = (token @ loc.T)[0]  # (experts,)
    torch.testing.assert_close(raw_loc.grad, 2 * mean[:, None] * token, atol=0.05, rtol=0.02)
    expected_scale_grad = 2 * scale * token.square() * torch.sigmoid(raw_scale.detach())  # softplus' = sigmoid
    torch.testing.assert_close(raw_scale.grad, expected_scale_grad, atol=0.02, rtol=0.05)
    with torch.no_grad(), routing_context(mode="routing-average", local_reparameterization=True):
        trace = poutine.trace(router).get_trace(token)
    assert site not in trace.nodes
    posterior.patch.unpatch()


def test_a_zero_input_row_has_finite_gradients():
    """A token whose router input is zero has logit variance 0: its draw is the mean, with finite gradients."""
    posterior = mean_field_posterior("granitemoe", {"weight": 0.2})
    router = first_router(posterior.patch)
    hidden = torch.zeros(2, router.weight.shape[1])
    hidden[1] = 1.0
    ids = torch.zeros(1, 2, dtype=torch.long)
    with (
        routing_context(mode="routing-average", local_reparameterization=True),
        pyro.plate("samples", 4, dim=PARTICLE_DIM),
        posterior.guide.posterior(ids, torch.ones_like(ids)),
    ):
        logits, _, _ = router(hidden)
    torch.testing.assert_close(logits[0], torch.zeros_like(logits[0]), atol=1e-12, rtol=0)
    logits.sum().backward()
    assert all(torch.isfinite(param.grad).all() for param in posterior.engine.params.values() if param.grad is not None)
    posterior.patch.unpatch()


def test_posteriors_and_priors_without_normal_marginals_draw_the_weights():
    """Low-rank (correlated weights), a Student-t prior and temperatures (LogNormal) offer no marginal:
    asking for local reparameterisation changes nothing, draw for draw."""
    handle = patch_routers(tiny_model("granitemoe"), {"weight": 0.2, "temperature": 0.3})
    batches = mcqa_batches(1, 4)
    low_rank = fit(handle, batches, "low-rank", answer_token_ids=ANSWERS, steps=1, progress=False)
    assert low_rank.guide.global_guide is not None
    input_ids = batches[0]["input_ids"]

    def probs(posterior_or_patch, local: bool) -> torch.Tensor:
        pyro.set_rng_seed(5)
        options = dict(num_samples=6, mode="routing-average", local_reparameterization=local)
        if hasattr(posterior_or_patch, "predict"):
            return posterior_or_patch.predict(input_ids, **options).probs
        return predict(posterior_or_patch, input_ids, answer_token_ids=ANSWERS, **options).probs

    assert torch.equal(probs(low_rank, True), probs(low_rank, False))
    handle.unpatch()
    student = patch_routers(tiny_model("granitemoe"), {"weight": {"scale": 0.2, "family": "student-t"}})
    assert torch.equal(probs(student, True), probs(student, False))
    student.unpatch()
    mean_field = mean_field_posterior("granitemoe", {"weight": 0.2, "temperature": 0.3})
    router = first_router(mean_field.patch)
    assert mean_field.guide.global_guide.normal_marginal(router.site_name("temperature")) is None
    assert mean_field.guide.global_guide.normal_marginal("no.such.site") is None


def test_default_on_in_routing_average_and_at_prior_mean_the_hf_model(batch):
    input_ids, attention_mask = batch
    model = tiny_model("gpt_oss")
    reference = torch.softmax(model(input_ids, attention_mask=attention_mask).logits[:, -1, ANSWERS], -1)
    handle = patch_routers(model, {"weight": 0.3})
    with poutine.trace() as tracer:
        predict(handle, input_ids, attention_mask, answer_token_ids=ANSWERS, num_samples=4, mode="routing-average")
    assert not [name for name in tracer.trace.nodes if name.endswith((".weight", ".bias"))]
    with poutine.trace() as tracer:
        predict(handle, input_ids, attention_mask, answer_token_ids=ANSWERS, num_samples=4)  # model-average
    assert len([name for name in tracer.trace.nodes if name.endswith((".weight", ".bias"))]) == 4
    with at_prior_mean():
        pinned = predict(handle, input_ids, attention_mask, answer_token_ids=ANSWERS, mode="routing-average")
    torch.testing.assert_close(pinned.probs, reference, rtol=1e-5, atol=1e-6)


def test_bad_local_reparameterization_is_refused_before_any_work(batch):
    input_ids, attention_mask = batch
    model = tiny_model("granitemoe")
    handle = patch_routers(model, {"weight": 0.3})
    calls = []
    hook = model.register_forward_pre_hook(lambda module, args: calls.append(1))
    with pytest.raises(ConfigurationError, match=r"routing-average only.*model-average"):
        predict(handle, input_ids, attention_mask, mode="model-average", local_reparameterization=True)
    with pytest.raises(ConfigurationError, match="local_reparameterization must be True or False, got 'yes'"):
        predict(handle, input_ids, attention_mask, mode="routing-average", local_reparameterization="yes")
    with pytest.raises(ConfigurationError, match="routing-average only"):
        with routing_context(local_reparameterization=True):  # the default mode is model-average
            pass
    hook.remove()
    assert calls == []
