"""``kron-laplace`` (router weights) through ``fit`` against independent float64 computations.

The references never run pyro-moe: per-example Jacobians of the answer logits with respect to the
router logits of the **unpatched** HF model (a forward hook on its router, ``torch.autograd``), the
categorical GGN ``J^T (diag p - p p^T) J`` written out, and, where K-FAC is exact (one example, the
last decoder layer, its last token: the answer depends on the router weight only through that
token's logits), the dense GGN of the answer with respect to the router weight from ``torch.func``.
"""

from __future__ import annotations

import itertools

import pytest
import torch
from torch.func import functional_call, jacrev

from pyro_moe import fit, patch_routers
from pyro_moe.core.families import find_moe_routers
from pyro_moe.core.routing_context import routing_context
from tests.helpers import ANSWERS
from tests.reference.tiny_float64 import REFERENCE_FAMILIES, float64_model, relative_error, unpadded_batches
from tests.tiny_models import MOE_LAYERS

PRIOR_SCALE = 0.3
TOLERANCE = 1e-5


def router_path(model, layer: int) -> str:
    (location,) = [loc for loc in find_moe_routers(model) if loc.layer_index == layer]
    return location.path


def per_example_jacobians(model, path: str, batch: dict[str, torch.Tensor]):
    """For every example ``n`` of ``batch`` at its last position: the router input ``u_n`` ``(H,)``, the
    Jacobian ``J_n = d answer_logits_n / d router_logits_n`` ``(C, E)`` and the answer probabilities ``p_n``."""
    router = model.get_submodule(path)
    seen = {}
    hook = router.register_forward_hook(lambda module, args, output: seen.update(u=args[0], logits=output[0]))
    router.weight.requires_grad_(True)
    try:
        answer = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, -1, ANSWERS]
    finally:
        hook.remove()
    size, length = batch["input_ids"].shape
    experts, hidden = router.weight.shape
    rows = torch.arange(size) * length + length - 1  # flat (batch x length) index of each last token
    jacobians = torch.zeros(size, len(ANSWERS), experts, dtype=torch.float64)
    for n, c in itertools.product(range(size), range(len(ANSWERS))):
        (gradient,) = torch.autograd.grad(answer[n, c], seen["logits"], retain_graph=True)
        jacobians[n, c] = gradient.reshape(-1, experts)[rows[n]]
    inputs = seen["u"].reshape(-1, hidden)[rows].detach()
    return inputs, jacobians, torch.softmax(answer.detach(), -1)


def reference_factors(model, path: str, batches, fisher: str):
    """``A = mean_n u_n u_n^T`` and ``G`` (exact: ``sum_n J_n^T (diag p_n - p_n p_n^T) J_n``; empirical:
    ``sum_n g_n g_n^T`` with ``g_n = J_n^T (p_n - e_{y_n})``); for ``mc`` the per-example candidate
    gradients ``g_n(c) = J_n^T (p_n - e_c)`` of every label ``c`` instead of ``G``."""
    a_sum, g_sum, candidates, count = 0.0, 0.0, [], 0
    for batch in batches:
        inputs, jacobians, probs = per_example_jacobians(model, path, batch)
        a_sum = a_sum + inputs.T @ inputs
        count += len(inputs)
        for n in range(len(inputs)):
            j, p = jacobians[n], probs[n]
            if fisher == "exact":
                g_sum = g_sum + j.T @ (torch.diag(p) - torch.outer(p, p)) @ j
            else:
                residuals = p[None, :] - torch.eye(len(p), dtype=p.dtype)  # (C labels, C)
                gradients = residuals @ j  # (C labels, E)
                if fisher == "empirical":
                    g = gradients[int(batch["labels"][n])]
                    g_sum = g_sum + torch.outer(g, g)
                else:
                    candidates.append(gradients)
    return a_sum / count, (candidates if fisher == "mc" else g_sum)


def fitted_factors(posterior, site: str) -> tuple[torch.Tensor, torch.Tensor]:
    (laplace,) = [p for name, p in posterior.guide.global_guide.posteriors().items() if name == site]
    a = (laplace.input_vectors[0] * laplace.input_values[0]) @ laplace.input_vectors[0].T
    g = (laplace.output_vectors[0] * laplace.output_values[0]) @ laplace.output_vectors[0].T
    return a, g


def fit_kron_laplace(family: str, layers: list[int], batches, fisher: str, steps: int = 0, mode: str | None = None):
    model = float64_model(family)
    handle = patch_routers(model, {"weight": PRIOR_SCALE}, layers=layers)
    options = {"kron-laplace": {"fisher": fisher}}
    with routing_context(mode=mode) if mode else routing_context():
        posterior = fit(
            handle,
            batches,
            "kron-laplace",
            answer_token_ids=ANSWERS,
            steps=steps,
            lr=0.05,
            progress=False,
            guide_options=options,
        )
    return posterior


@pytest.mark.parametrize("family", REFERENCE_FAMILIES)
@pytest.mark.parametrize("fisher", ["exact", "empirical"])
def test_router_factors_through_fit_equal_per_example_jacobians(family, fisher):
    """Every MoE layer's router; several examples per batch and several batches."""
    batches = unpadded_batches(2, 3)
    layers = MOE_LAYERS[family]
    posterior = fit_kron_laplace(family, layers, batches, fisher)
    reference = float64_model(family)  # the unpatched model, the same weights (steps=0: the MAP is W0)
    for layer in layers:
        path = router_path(reference, layer)
        a_ref, g_ref = reference_factors(reference, path, batches, fisher)
        a_fit, g_fit = fitted_factors(posterior, f"{path}.weight")
        assert float(g_ref.abs().max()) > 0
        assert relative_error(a_fit, a_ref) <= TOLERANCE
        assert relative_error(g_fit, g_ref) <= TOLERANCE, f"layer {layer}: G differs from the reference"
    posterior.patch.unpatch()


@pytest.mark.parametrize("family", REFERENCE_FAMILIES)
def test_mc_fisher_factor_is_the_outer_product_sum_of_some_drawn_labels(family):
    """One example per batch, one label draw each: ``G`` must be ``sum_n g_n(y_n) g_n(y_n)^T`` for one of
    the ``C^N`` label assignments (every one is enumerated)."""
    batches = unpadded_batches(3, 1, seed=1)
    layer = MOE_LAYERS[family][-1]
    posterior = fit_kron_laplace(family, [layer], batches, "mc")
    reference = float64_model(family)
    path = router_path(reference, layer)
    a_ref, candidates = reference_factors(reference, path, batches, "mc")
    a_fit, g_fit = fitted_factors(posterior, f"{path}.weight")
    assert relative_error(a_fit, a_ref) <= TOLERANCE
    errors = []
    for labels in itertools.product(range(len(ANSWERS)), repeat=len(candidates)):
        g_ref = sum(torch.outer(c[y], c[y]) for c, y in zip(candidates, labels, strict=True))
        errors.append(relative_error(g_fit, g_ref))
    assert min(errors) <= TOLERANCE
    posterior.patch.unpatch()


@pytest.mark.parametrize("family", REFERENCE_FAMILIES)
@pytest.mark.parametrize("mode", ["model-average", "routing-average"])
def test_where_kfac_is_exact_the_precision_is_the_dense_ggn_plus_the_prior(family, mode):
    """One example, the last decoder layer (an MoE layer in every family here): ``G (x) A + tau I`` equals
    ``J_W^T (diag p - p p^T) J_W + tau I`` with ``J_W`` the Jacobian of the answer logits with respect to
    the router weight (row-major ``vec``), from ``torch.func`` on the unpatched model."""
    batches = unpadded_batches(1, 1, seed=2)
    layer = MOE_LAYERS[family][-1]
    reference = float64_model(family)
    assert layer == reference.config.num_hidden_layers - 1
    path = router_path(reference, layer)
    posterior = fit_kron_laplace(family, [layer], batches, "exact", mode=mode)
    (laplace,) = posterior.guide.global_guide.posteriors().values()
    batch = batches[0]

    def answer_logits(weight: torch.Tensor) -> torch.Tensor:
        inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
        return functional_call(reference, {f"{path}.weight": weight}, (), inputs).logits[0, -1, ANSWERS]

    weight = reference.get_submodule(path).weight.detach().clone()
    jacobian = jacrev(answer_logits)(weight).reshape(len(ANSWERS), -1)  # (C, E*H), row-major vec(W)
    probs = torch.softmax(answer_logits(weight), -1).detach()
    ggn = (jacobian.T @ (torch.diag(probs) - torch.outer(probs, probs)) @ jacobian).detach()
    tau = float(torch.tensor(PRIOR_SCALE, dtype=torch.float32)) ** -2  # the prior scale is a float32 value
    precision = laplace.dense_precision()[0]
    identity = torch.eye(len(ggn), dtype=torch.float64)
    assert float(ggn.detach().abs().max()) > 0
    assert relative_error(precision - tau * identity, ggn) <= TOLERANCE
    assert relative_error(precision, ggn + tau * identity) <= TOLERANCE
    posterior.patch.unpatch()


def test_the_reference_holds_at_a_map_after_svi_steps():
    """Five MAP steps move the router weights; the factors are those of the unpatched model at the MAP."""
    family, batches = "olmoe", unpadded_batches(2, 3, seed=3)
    layer = MOE_LAYERS[family][-1]
    posterior = fit_kron_laplace(family, [layer], batches, "exact", steps=5)
    reference = float64_model(family)
    path = router_path(reference, layer)
    (laplace,) = posterior.guide.global_guide.posteriors().values()
    weight = reference.get_submodule(path).weight
    assert not torch.equal(laplace.mean[0].to(weight), weight)
    with torch.no_grad():
        weight.copy_(laplace.mean[0])
    a_ref, g_ref = reference_factors(reference, path, batches, "exact")
    a_fit, g_fit = fitted_factors(posterior, f"{path}.weight")
    assert relative_error(a_fit, a_ref) <= TOLERANCE
    assert relative_error(g_fit, g_ref) <= TOLERANCE
    posterior.patch.unpatch()


@pytest.mark.parametrize(
    ("local_family", "sites"),
    [
        ("mfvr", {"logits": 1.0}),
        ("vtsr", {"temperature": {"per": "token", "scale": 0.3}}),
    ],
)
def test_with_per_token_sites_the_curvature_is_at_their_prior_mean(local_family, sites):
    """``kron-laplace+<local>``: the curvature is collected with the logits at ``W u`` and per-token
    temperatures at 1 (the model's own routing), so its factors are the unpatched model's."""
    family, batches = "qwen3_moe", unpadded_batches(2, 3, seed=4)
    layer = MOE_LAYERS[family][-1]
    model = float64_model(family)
    handle = patch_routers(model, {"weight": PRIOR_SCALE, **sites}, layers=[layer])
    posterior = fit(
        handle,
        batches,
        f"kron-laplace+{local_family}",
        answer_token_ids=ANSWERS,
        steps=1,
        progress=False,
        guide_options={"kron-laplace": {"fisher": "exact"}},
    )
    reference = float64_model(family)
    path = router_path(reference, layer)
    a_ref, g_ref = reference_factors(reference, path, batches, "exact")
    a_fit, g_fit = fitted_factors(posterior, f"{path}.weight")
    assert relative_error(a_fit, a_ref) <= TOLERANCE
    assert relative_error(g_fit, g_ref) <= TOLERANCE
    handle.unpatch()
