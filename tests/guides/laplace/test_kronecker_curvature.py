"""Kronecker curvature, low-rank factors and the Kronecker Laplace posterior against independent references:
explicit per-token outer products, the dense GGN from torch.func, dense Gaussians and closed forms."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch.func import functional_call, jacrev

from pyro_moe.core.curvature_targets import EXPERT_FAMILIES, expert_targets, router_targets
from pyro_moe.core.readout import last_token_logits
from pyro_moe.errors import (
    ConfigurationError,
    CurvatureError,
    LayerSelectionError,
    NoMoELayersError,
    NonFiniteError,
    UnsupportedFamilyError,
)
from pyro_moe.guides.laplace.kronecker_curvature import kronecker_curvature
from pyro_moe.guides.laplace.kronecker_factors import LowRankFactor
from pyro_moe.guides.laplace.kronecker_posterior import KroneckerLaplace, log_evidence, optimize_prior_precision
from tests.tiny_models import MOE_LAYERS, tiny_dense_model, tiny_model, tiny_unsupported_moe_model

ANSWERS = torch.tensor([4, 5, 6, 7])


def mcqa_batch(size: int, length: int = 6, seed: int = 0, padded: bool = True) -> dict[str, torch.Tensor]:
    """Random prompts, the first row left-padded by two (``padded``); labels a function of the last token."""
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(8, 60, (size, length), generator=generator)
    attention_mask = torch.ones_like(input_ids)
    if padded:
        attention_mask[0, :2] = 0
        input_ids[0, :2] = 0
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": input_ids[:, -1] % 4}


def moe_block(model: nn.Module, layer: int) -> nn.Module:
    decoder = model.model.layers[layer]
    return getattr(decoder, "block_sparse_moe", None) or decoder.mlp


def reference_factors(model, layer, batch, fisher, tokens):
    """Per-token outer products from the experts module's own inputs and outputs (default experts
    implementation), with the expert inputs written out as act(gate(u)) * up(u)."""
    block = moe_block(model, layer)
    experts, router = block.experts, getattr(block, "router", None) or block.gate
    seen = {}
    hooks = [
        experts.register_forward_hook(
            lambda m, args, out: seen.update(u=args[0], index=args[1], weight=args[2], y=out)
        ),
        router.register_forward_hook(lambda m, args, out: seen.update(hidden=args[0], logits=out[0])),
    ]
    flags = [(p, p.requires_grad) for p in (experts.down_proj, router.weight)]
    for p, _ in flags:
        p.requires_grad_(True)
    try:
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, -1, ANSWERS]
    finally:
        for hook in hooks:
            hook.remove()
        for p, flag in flags:
            p.requires_grad_(flag)
    logp = torch.log_softmax(logits.double(), -1)
    if fisher == "empirical":
        losses = [-logp.gather(-1, batch["labels"][:, None]).sum()]
    else:
        probs = logp.detach().exp()
        losses = [-(probs[:, c].sqrt() * logp[:, c]).sum() for c in range(len(ANSWERS))]
    mask = batch["attention_mask"]
    if tokens == "last":
        selected = torch.zeros_like(mask, dtype=torch.bool)
        selected[:, -1] = True
    else:
        selected = mask.bool()
    selected = selected.reshape(-1)
    num_experts, hidden, inter = experts.down_proj.shape
    a_sum = torch.zeros(num_experts, inter, inter, dtype=torch.float64)
    g_sum = torch.zeros(num_experts, hidden, hidden, dtype=torch.float64)
    counts = torch.zeros(num_experts, dtype=torch.long)
    u = seen["u"].double()
    act = experts.act_fn
    for loss_index, loss in enumerate(losses):
        grad_y = torch.autograd.grad(loss, seen["y"], retain_graph=True)[0].double()
        grad_logits = torch.autograd.grad(loss, seen["logits"], retain_graph=loss_index < len(losses) - 1)[0].double()
        for t in torch.nonzero(selected).reshape(-1).tolist():
            for k in range(seen["index"].shape[1]):
                e = int(seen["index"][t, k])
                g = seen["weight"][t, k].double() * grad_y[t]
                g_sum[e] += torch.outer(g, g)
                if loss_index == 0:
                    gate, up = (experts.gate_up_proj[e].double() @ u[t]).chunk(2)
                    a = act(gate) * up
                    a_sum[e] += torch.outer(a, a)
                    counts[e] += 1
        if loss_index == 0:
            hidden_rows = seen["hidden"].reshape(-1, hidden).double()[selected]
            router_a = hidden_rows.T @ hidden_rows / selected.sum()
            router_g = torch.zeros(num_experts, num_experts, dtype=torch.float64)
        rows = grad_logits.reshape(-1, num_experts)[selected]
        router_g += rows.T @ rows
    a_mean = a_sum / counts.clamp_min(1)[:, None, None]
    return a_mean, g_sum, counts, router_a, router_g


def assert_relative(actual, expected, tol=1e-6):
    actual, expected = actual.detach(), expected.detach()
    scale = expected.abs().max().clamp_min(1e-30)
    assert float((actual - expected).abs().max() / scale) < tol


@pytest.mark.parametrize(
    ("family", "dtype", "fisher", "tokens", "size", "tol"),
    [
        ("granitemoe", torch.float64, "exact", "all", 4, 1e-6),
        ("qwen2_moe", torch.float64, "empirical", "last", 2, 1e-6),
        ("mixtral", torch.float64, "exact", "last", 1, 1e-6),
        ("olmoe", torch.float32, "empirical", "all", 3, 1e-4),  # left padding (NaN at padded rows in float64)
    ],
)
def test_factors_equal_explicit_per_token_outer_products(family, dtype, fisher, tokens, size, tol):
    """Every expert, including those that got no token (zero factors), and the router weight."""
    model = tiny_model(family, dtype=dtype)
    model.config._experts_implementation = "eager" if dtype == torch.float64 else model.config._experts_implementation
    layer = MOE_LAYERS[family][-1]
    batch = mcqa_batch(size, padded=dtype == torch.float32)
    targets = expert_targets(model, [layer]) + router_targets(model, [layer])
    run = kronecker_curvature(model, targets, [batch], ANSWERS, fisher=fisher, tokens=tokens, progress=False)
    a_ref, g_ref, counts, router_a, router_g = reference_factors(model, layer, batch, fisher, tokens)
    experts_curvature, router_curvature = run.curvature[targets[0].name], run.curvature[targets[1].name]
    assert torch.equal(experts_curvature.tokens, counts)
    if tokens == "last":
        assert (counts == 0).any(), "the test wants an expert that received no token"
    for e in range(len(counts)):
        assert_relative(experts_curvature.input_factors[e].dense(), a_ref[e], tol)
        assert_relative(experts_curvature.output_factors[e].dense(), g_ref[e], tol)
        if counts[e] == 0:
            assert experts_curvature.input_factors[e].values.abs().max() == 0
            assert experts_curvature.output_factors[e].values.abs().max() == 0
    assert_relative(router_curvature.input_factors[0].dense(), router_a, tol)
    assert_relative(router_curvature.output_factors[0].dense(), router_g, tol)
    assert moe_block(model, layer).experts.down_proj.requires_grad  # as HF left it


@pytest.mark.parametrize("family", EXPERT_FAMILIES)
def test_every_supported_experts_family_matches_the_reference(family):
    model = tiny_model(family, dtype=torch.float64)
    model.config._experts_implementation = "eager"  # grouped_mm has no float64
    layer = MOE_LAYERS[family][-1]
    batch = mcqa_batch(3, padded=False)
    targets = expert_targets(model, [layer])
    run = kronecker_curvature(model, targets, [batch], ANSWERS, fisher="exact", tokens="all", progress=False)
    a_ref, g_ref, counts, _, _ = reference_factors(model, layer, batch, "exact", "all")
    curvature = run.curvature[targets[0].name]
    assert torch.equal(curvature.tokens, counts)
    for e in range(len(counts)):
        assert_relative(curvature.input_factors[e].dense(), a_ref[e])
        assert_relative(curvature.output_factors[e].dense(), g_ref[e])


def test_collection_restores_the_experts_implementation():
    model = tiny_model("granitemoe")
    before = model.config._experts_implementation
    kronecker_curvature(model, expert_targets(model, [0]), [mcqa_batch(2)], ANSWERS, progress=False)
    assert model.config._experts_implementation == before != "eager"


def test_kronecker_ggn_equals_dense_ggn_from_torch_func():
    """One example, the last MoE layer, the last token: K-FAC is exact, and G (x) A equals J^T Lambda J
    (row-major vec, see the kronecker_posterior module docstring)."""
    model = tiny_model("granitemoe", dtype=torch.float64)
    model.config._experts_implementation = "eager"  # grouped_mm has no float64
    layer = 1
    experts = moe_block(model, layer).experts
    batch = mcqa_batch(1, padded=False)
    (target,) = expert_targets(model, [layer])
    run = kronecker_curvature(model, [target], [batch], ANSWERS, fisher="exact", progress=False)
    curvature = run.curvature[target.name]

    def answer_logits(down_proj):
        out = functional_call(
            model,
            {f"model.layers.{layer}.block_sparse_moe.experts.down_proj": down_proj},
            (),
            {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]},
        )
        return out.logits[0, -1, ANSWERS]

    weight = experts.down_proj.detach().clone()
    jacobian = jacrev(answer_logits)(weight)  # (choices, E, H, I)
    probs = torch.softmax(answer_logits(weight), -1).detach()
    hessian = torch.diag(probs) - torch.outer(probs, probs)
    for e in range(weight.shape[0]):
        j = jacobian[:, e].reshape(len(ANSWERS), -1)
        dense = j.T @ hessian @ j
        kron = torch.kron(curvature.output_factors[e].dense(), curvature.input_factors[e].dense())
        assert_relative(kron, dense, 1e-6)
    assert sum(int(c) for c in curvature.tokens) == 2  # top-2: two experts saw the last token


def test_full_rank_streaming_equals_full_factors():
    model = tiny_model("olmoe")
    batches = [mcqa_batch(4, seed=s) for s in range(3)]
    targets = expert_targets(model, [1])
    full = kronecker_curvature(model, targets, batches, ANSWERS, fisher="empirical", tokens="all", progress=False)
    streamed = kronecker_curvature(
        model, targets, batches, ANSWERS, fisher="empirical", tokens="all", rank=48, progress=False
    )
    for a, b in zip(full.curvature.values(), streamed.curvature.values(), strict=True):
        for fa, fb in zip(a.input_factors + a.output_factors, b.input_factors + b.output_factors, strict=True):
            assert_relative(fb.dense(), fa.dense(), 1e-9)


def test_streaming_low_rank_keeps_the_top_eigenpairs_of_a_low_rank_sum():
    """Rows from a rank-3 subspace: rank 3 is exact, and memory is (dim, rank)."""
    generator = torch.Generator().manual_seed(0)
    basis = torch.randn(3, 20, generator=generator, dtype=torch.float64)
    factor, total = LowRankFactor(20, 3), torch.zeros(20, 20, dtype=torch.float64)
    for _ in range(5):
        rows = torch.randn(7, 3, generator=generator, dtype=torch.float64) @ basis
        factor.update(rows)
        total += rows.T @ rows
    eigen = factor.eigen()
    assert eigen.vectors.shape == (20, 3) and eigen.count == 35
    assert_relative(eigen.dense(), total, 1e-10)


def random_posterior(blocks=2, out=3, inp=4, rg=2, ra=3, tau=0.7, seed=0):
    generator = torch.Generator().manual_seed(seed)

    def eigenpairs(dim, rank):
        q, _ = torch.linalg.qr(torch.randn(blocks, dim, dim, generator=generator, dtype=torch.float64))
        return q[..., :rank], torch.rand(blocks, rank, generator=generator, dtype=torch.float64) * 3 + 0.5

    qa, la = eigenpairs(inp, ra)
    qg, lg = eigenpairs(out, rg)
    mean = torch.randn(blocks, out, inp, generator=generator, dtype=torch.float64)
    return KroneckerLaplace(mean, qa, la, qg, lg, tau, prior_mean=torch.zeros_like(mean))


def test_samples_have_the_posterior_covariance():
    posterior = random_posterior()
    draws = posterior.sample((200_000,), generator=torch.Generator().manual_seed(1))  # (N, n, out, in)
    for b in range(posterior.blocks):
        flat = draws[:, b].reshape(len(draws), -1)
        covariance = torch.linalg.inv(posterior.dense_precision()[b])
        empirical = torch.cov(flat.T)
        variance = covariance.diagonal()
        standard_error = ((variance[:, None] * variance[None, :] + covariance**2) / len(draws)).sqrt()
        assert float(((empirical - covariance).abs() / standard_error).max()) < 5.0
        torch.testing.assert_close(
            flat.mean(0), posterior.mean[b].reshape(-1), atol=5 * variance.max().sqrt() / 400, rtol=0
        )


def test_log_prob_and_evidence_match_dense_gaussians():
    posterior = random_posterior()
    value = posterior.sample((3,))
    dense = torch.distributions.MultivariateNormal(
        posterior.mean.reshape(posterior.blocks, -1), precision_matrix=posterior.dense_precision()
    )
    torch.testing.assert_close(
        posterior.log_prob(value), dense.log_prob(value.reshape(3, posterior.blocks, -1)).sum(-1)
    )
    log_likelihood = -12.5
    dims = posterior.mean[0].numel()
    tau = posterior.prior_precision
    prior = torch.distributions.Normal(0.0, tau[:, None].rsqrt()).log_prob(posterior.mean.reshape(2, -1)).sum(-1)
    laplace = log_likelihood + float(
        (prior + 0.5 * dims * math.log(2 * math.pi) - 0.5 * torch.logdet(posterior.dense_precision())).sum()
    )
    assert log_evidence([posterior], log_likelihood) == pytest.approx(laplace, rel=1e-10)


@pytest.mark.parametrize("per", ["layer", "expert", "model"])
def test_optimize_prior_precision_finds_a_maximum_of_the_evidence(per):
    posteriors = [random_posterior(seed=0, tau=50.0), random_posterior(seed=1, tau=50.0)]
    before = log_evidence(posteriors, 0.0)
    taus = optimize_prior_precision(posteriors, per=per)
    after = log_evidence(posteriors, 0.0)
    assert after > before
    neighbours = []  # every chosen tau moved alone (jointly for per="model")
    for index, p in enumerate(posteriors):
        for b in range(p.blocks) if per == "expert" else [slice(None)]:
            neighbours.append([(index, b)] if per != "model" else [(i, slice(None)) for i in range(len(posteriors))])
    for factor in (1.05, 1 / 1.05):
        for moves in neighbours:
            for index, b in moves:
                moved = taus[index].clone()
                moved[b] = moved[b] * factor
                posteriors[index].prior_precision = moved
            assert log_evidence(posteriors, 0.0) < after
            for index, p in enumerate(posteriors):
                p.prior_precision = taus[index]
    if per == "model":
        assert torch.allclose(taus[0], taus[1])


def test_prior_mean_at_the_mode_is_refused_by_the_evidence_optimiser():
    posterior = random_posterior()
    posterior.prior_mean = posterior.mean
    with pytest.raises(ConfigurationError, match="grows without bound"):
        optimize_prior_precision([posterior])


def test_bad_input():
    model = tiny_model("granitemoe")
    batch = mcqa_batch(2)
    with pytest.raises(LayerSelectionError, match="no experts"):
        expert_targets(tiny_model("qwen2_moe"), [1])
    with pytest.raises(NoMoELayersError):
        expert_targets(tiny_dense_model())
    with pytest.raises(UnsupportedFamilyError, match="granitemoe"):
        expert_targets(tiny_unsupported_moe_model())
    with pytest.raises(UnsupportedFamilyError, match="supported families"):
        expert_targets(tiny_model("gpt_oss"))
    targets = expert_targets(model, [1])
    for rank in (0, -2):
        with pytest.raises(ConfigurationError, match="rank"):
            kronecker_curvature(model, targets, [batch], ANSWERS, rank=rank, progress=False)
    unlabelled = {k: v for k, v in batch.items() if k != "labels"}
    with pytest.raises(ConfigurationError, match="labels"):
        kronecker_curvature(model, targets, [unlabelled], ANSWERS, fisher="empirical", progress=False)
    with pytest.raises(ConfigurationError, match="Fisher"):
        kronecker_curvature(model, targets, [batch], ANSWERS, fisher="hessian", progress=False)
    weight = model.model.layers[1].block_sparse_moe.experts.down_proj
    weight.requires_grad_(False)
    original = weight.detach().clone()
    with torch.no_grad():
        weight[0, 0, 0] = float("nan")
        weight[1:, 0, 0] = float("nan")
    with pytest.raises(NonFiniteError, match="non-finite curvature"):
        kronecker_curvature(model, targets, [batch], ANSWERS, progress=False)
    with torch.no_grad():
        weight.copy_(original)
    assert not weight.requires_grad and model.config._experts_implementation != "eager"  # restored on failure
    with pytest.raises(NonFiniteError, match="non-finite curvature"):
        KroneckerLaplace(
            torch.zeros(1, 2, 2),
            torch.eye(2)[None],
            torch.tensor([[1.0, float("nan")]]),
            torch.eye(2)[None],
            torch.ones(1, 2),
        )


def test_mc_fisher_averages_to_the_exact_fisher():
    """Labels drawn from the model's predictive: G is the categorical GGN in expectation."""
    model = tiny_model("granitemoe", dtype=torch.float64)
    model.config._experts_implementation = "eager"
    batch = mcqa_batch(4, padded=False)
    targets = router_targets(model, [1])
    exact = kronecker_curvature(model, targets, [batch], ANSWERS, fisher="exact", progress=False)
    drawn = kronecker_curvature(model, targets, [batch], ANSWERS, fisher="mc", mc_samples=400, progress=False)
    g_exact = exact.curvature[targets[0].name].output_factors[0].dense()
    g_drawn = drawn.curvature[targets[0].name].output_factors[0].dense()
    assert float(torch.linalg.norm(g_drawn - g_exact) / torch.linalg.norm(g_exact)) < 0.08  # MC error ~ 0.03
    torch.testing.assert_close(
        drawn.curvature[targets[0].name].input_factors[0].dense(),
        exact.curvature[targets[0].name].input_factors[0].dense(),
    )


def stationary_precision(squared_distance: float, products: torch.Tensor) -> float:
    """The root in tau of the evidence's derivative, ``sum lam / (tau (tau + lam)) = ||W_map - W0||^2``
    (scipy's brentq on the closed form, independent of the optimiser under test)."""
    from scipy.optimize import brentq

    lam = products.reshape(-1).tolist()
    return brentq(lambda t: sum(v / (t * (t + v)) for v in lam) - squared_distance, 1e-8, 1e8, xtol=1e-12)


@pytest.mark.parametrize("per", ["expert", "layer"])
def test_an_expert_without_data_keeps_its_prior_precision(per):
    posterior = random_posterior(blocks=3, tau=50.0)
    posterior.input_values[1] = 0.0  # expert 1 saw no token: A = 0
    taus = optimize_prior_precision([posterior], per=per)[0]
    products = posterior.eigenvalue_products()
    distance = posterior.squared_distance()
    if per == "expert":
        assert float(taus[1]) == 50.0
        for b in (0, 2):
            assert float(taus[b]) == pytest.approx(stationary_precision(float(distance[b]), products[b]), rel=1e-4)
    else:  # one tau for the layer, from the experts with data only
        reference = stationary_precision(float(distance[[0, 2]].sum()), products[[0, 2]])
        torch.testing.assert_close(taus, torch.full((3,), reference, dtype=torch.float64), rtol=1e-4, atol=0)


def test_a_layer_without_data_keeps_its_prior_precision():
    posterior, empty = random_posterior(tau=3.0), random_posterior(seed=1, tau=7.0)
    empty.output_values.zero_()  # G = 0: no gradient reached the layer
    taus = optimize_prior_precision([posterior, empty], per="layer")
    assert taus[1].tolist() == [7.0, 7.0]
    assert float(taus[0][0]) != 3.0


def test_prior_mean_at_the_mode_of_one_layer_is_refused_before_any_change():
    at_mode, away = random_posterior(tau=2.0), random_posterior(seed=1, tau=2.0)
    at_mode.prior_mean = at_mode.mean
    with pytest.raises(ConfigurationError, match="grows without bound"):
        optimize_prior_precision([away, at_mode], per="layer")
    assert away.prior_precision.tolist() == [2.0, 2.0]


def test_a_target_no_gradient_reaches_is_named_instead_of_zero_filled():
    model = tiny_model("granitemoe")
    targets = router_targets(model, [1])
    bias = torch.zeros(len(ANSWERS), requires_grad=True)

    def detached(input_ids, attention_mask):  # the answer does not depend on the recorded router logits
        return last_token_logits(model, input_ids, attention_mask)[0][:, ANSWERS].detach() + bias

    with pytest.raises(CurvatureError, match=r"no output gradient reaches model\.layers\.1\..*\.weight"):
        kronecker_curvature(model, targets, [mcqa_batch(2)], ANSWERS, answer_logits=detached, progress=False)


def test_a_target_whose_gradients_are_all_zero_is_named():
    model = tiny_model("granitemoe")
    targets = router_targets(model, [1])
    bias = torch.zeros(len(ANSWERS), requires_grad=True)

    def flat(input_ids, attention_mask):  # connected to the router, but with zero gradients
        return last_token_logits(model, input_ids, attention_mask)[0][:, ANSWERS] * 0.0 + bias

    with pytest.raises(CurvatureError, match=r"model\.layers\.1\..*\.weight are identically zero over its 2"):
        kronecker_curvature(model, targets, [mcqa_batch(2)], ANSWERS, answer_logits=flat, progress=False)
