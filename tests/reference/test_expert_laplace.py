"""``expert-laplace`` (expert ``down_proj``) through ``fit`` against independent float64 computations.

The references never run pyro-moe: on the **unpatched** HF model, a forward hook on the experts module
gives each token's router input ``u_t``, its experts and routing weights and the module's output
``y_t``; per-token Jacobians ``J_t = d answer / d y_t`` come from ``torch.autograd``; an expert's input
is written out as ``act(gate(u)) * up(u)`` from ``gate_up_proj``; the GGN is ``J^T (diag p - p p^T) J``.
Where K-FAC is exact (one example, the last layer, its last token) the precision is compared with the
dense GGN of the answer with respect to ``down_proj`` from ``torch.func`` plus ``tau I``.
"""

from __future__ import annotations

import pytest
import torch
from torch.func import functional_call, jacrev

from pyro_moe import fit
from pyro_moe.models.expert_patch import patch_experts
from tests.helpers import ANSWERS
from tests.reference.tiny_float64 import REFERENCE_FAMILIES, float64_model, relative_error, unpadded_batches
from tests.tiny_models import MOE_LAYERS

TAU = 4.0
TOLERANCE = 1e-5


def experts_path(model, layer: int) -> str:
    decoder = model.model.layers[layer]
    block = "block_sparse_moe" if hasattr(decoder, "block_sparse_moe") else "mlp"
    return f"model.layers.{layer}.{block}.experts"


def reference_factors(model, path: str, batches):
    """Per expert ``e``: ``A_e = mean_t a_t a_t^T`` over the last tokens routed to it and the exact GGN factor
    ``G_e = sum_t w_te^2 J_t^T (diag p - p p^T) J_t``, with the counts."""
    experts = model.get_submodule(path)
    count_e, hidden, inter = experts.down_proj.shape
    a_sum = torch.zeros(count_e, inter, inter, dtype=torch.float64)
    g_sum = torch.zeros(count_e, hidden, hidden, dtype=torch.float64)
    counts = torch.zeros(count_e, dtype=torch.long)
    for batch in batches:
        seen = {}
        hook = experts.register_forward_hook(
            lambda module, args, output, seen=seen: seen.update(u=args[0], index=args[1], weight=args[2], y=output)
        )
        try:
            answer = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        finally:
            hook.remove()
        answer = answer[:, -1, ANSWERS]
        size, length = batch["input_ids"].shape
        probs = torch.softmax(answer.detach(), -1)
        for n in range(size):
            t = n * length + length - 1  # flat index of the example's last token
            jacobian = torch.stack(
                [torch.autograd.grad(answer[n, c], seen["y"], retain_graph=True)[0][t] for c in range(len(ANSWERS))]
            )  # (C, H)
            p = probs[n]
            ggn = jacobian.T @ (torch.diag(p) - torch.outer(p, p)) @ jacobian
            u = seen["u"][t].detach()
            for k in range(seen["index"].shape[1]):
                e = int(seen["index"][t, k])
                gate, up = (experts.gate_up_proj[e].detach() @ u).chunk(2)
                a = experts.act_fn(gate) * up
                a_sum[e] += torch.outer(a, a)
                g_sum[e] += float(seen["weight"][t, k]) ** 2 * ggn
                counts[e] += 1
    return a_sum / counts.clamp_min(1)[:, None, None], g_sum, counts


def dense(vectors: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    return (vectors * values) @ vectors.T


def fit_expert_laplace(family: str, layer: int, batches):
    handle = patch_experts(float64_model(family), layers=[layer], prior_precision=TAU)
    options = {"expert-laplace": {"fisher": "exact"}}
    return fit(
        handle, batches, "expert-laplace", answer_token_ids=ANSWERS, steps=0, progress=False, guide_options=options
    )


@pytest.mark.parametrize("family", REFERENCE_FAMILIES)
def test_expert_factors_through_fit_equal_per_token_jacobians(family):
    batches = unpadded_batches(2, 3)
    layer = MOE_LAYERS[family][-1]
    posterior = fit_expert_laplace(family, layer, batches)
    reference = float64_model(family)
    path = experts_path(reference, layer)
    a_ref, g_ref, counts = reference_factors(reference, path, batches)
    (laplace,) = posterior.guide.global_guide.posteriors().values()
    assert (counts > 0).sum() >= 2
    for e, count in enumerate(counts.tolist()):
        a_fit = dense(laplace.input_vectors[e], laplace.input_values[e])
        g_fit = dense(laplace.output_vectors[e], laplace.output_values[e])
        if count == 0:  # an expert without tokens keeps the prior
            assert a_fit.abs().max() == 0 and g_fit.abs().max() == 0
            continue
        assert relative_error(a_fit, a_ref[e]) <= TOLERANCE
        assert relative_error(g_fit, g_ref[e]) <= TOLERANCE
    torch.testing.assert_close(laplace.prior_precision, torch.full((len(counts),), TAU, dtype=torch.float64))
    posterior.patch.unpatch()


@pytest.mark.parametrize("family", REFERENCE_FAMILIES)
def test_where_kfac_is_exact_the_precision_is_the_dense_ggn_plus_the_prior(family):
    batches = unpadded_batches(1, 1, seed=2)
    layer = MOE_LAYERS[family][-1]
    reference = float64_model(family)
    assert layer == reference.config.num_hidden_layers - 1
    path = experts_path(reference, layer)
    posterior = fit_expert_laplace(family, layer, batches)
    (laplace,) = posterior.guide.global_guide.posteriors().values()
    batch = batches[0]

    def answer_logits(weight: torch.Tensor) -> torch.Tensor:
        inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
        return functional_call(reference, {f"{path}.down_proj": weight}, (), inputs).logits[0, -1, ANSWERS]

    weight = reference.get_submodule(path).down_proj.detach().clone()
    jacobian = jacrev(answer_logits)(weight)  # (C, E, H, I)
    probs = torch.softmax(answer_logits(weight), -1).detach()
    hessian = torch.diag(probs) - torch.outer(probs, probs)
    precision = laplace.dense_precision()
    identity = torch.eye(precision.shape[-1], dtype=torch.float64)
    informed = 0
    for e in range(weight.shape[0]):
        j = jacobian[:, e].reshape(len(ANSWERS), -1)  # row-major vec(down_proj[e])
        ggn = (j.T @ hessian @ j).detach()
        if float(ggn.abs().max()) == 0:  # the last token did not reach expert e
            assert torch.equal(precision[e], TAU * identity)
            continue
        informed += 1
        assert relative_error(precision[e] - TAU * identity, ggn) <= TOLERANCE
    assert informed == 2  # top-2
    posterior.patch.unpatch()


def test_the_log_evidence_is_the_laplace_formula_on_the_dense_precision():
    """``log p(D | W) - tau/2 ||W - W0||^2 - 1/2 log det(P / tau)`` over the experts with data (the others'
    terms are 0: their exact evidence factor is the integral of their prior), with ``P`` the dense
    precision and ``log p(D | W)`` the unpatched model's log-likelihood of the labels."""
    family, batches = "olmoe", unpadded_batches(1, 1, seed=5)
    layer = MOE_LAYERS[family][-1]
    handle = patch_experts(float64_model(family), layers=[layer], prior_precision=TAU, prior_mean="zero")
    posterior = fit(
        handle,
        batches,
        "expert-laplace",
        answer_token_ids=ANSWERS,
        steps=0,
        progress=False,
        guide_options={"expert-laplace": {"fisher": "exact"}},
    )
    guide = posterior.guide.global_guide
    (laplace,) = guide.posteriors().values()
    reference = float64_model(family)
    weight = reference.get_submodule(experts_path(reference, layer)).down_proj.detach()
    batch = batches[0]
    logits = reference(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, -1, ANSWERS]
    log_likelihood = float(torch.log_softmax(logits.detach(), -1).gather(-1, batch["labels"][:, None]).sum())
    expected = log_likelihood
    for e, precision in enumerate(laplace.dense_precision()):
        if torch.equal(precision, TAU * torch.eye(len(precision), dtype=torch.float64)):
            continue
        expected += -0.5 * TAU * float(weight[e].square().sum()) - 0.5 * float(torch.logdet(precision / TAU))
    assert guide.log_evidence() == pytest.approx(expected, rel=1e-6)
    posterior.patch.unpatch()
