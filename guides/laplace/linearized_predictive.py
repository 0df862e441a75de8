"""The linearised (GLM) predictive of a Kronecker Laplace posterior over the MCQA answer logits.

Linearising the answer logits ``f(W)`` ``(choices,)`` of each example at the posterior mean, the
logits are Gaussian under the posterior: ``f ~ N(f(W_map), J Sigma J^T)``. For a weight block
``W_b`` ``(out, in)`` the Jacobian of logit ``c`` is the sum over the example's tokens ``t`` that use
the block of ``g_tc x_t^T`` (``x_t`` its input, ``g_tc = d f_c / d s_t`` at its output), all read from
the HF modules as in :mod:`~pyro_moe.guides.laplace.kronecker_curvature` (every real token: exact, one
backward pass per answer letter); ``<J_c, Sigma J_c'>`` is taken in the Kronecker eigenbasis
(:meth:`~pyro_moe.guides.laplace.kronecker_posterior.KroneckerLaplace.covariance_inner`), so the covariance
``(choices, choices)`` per example is exact for the linearised model. The answer distribution is then
the probit approximation ``softmax(f / sqrt(1 + pi/8 diag(Sigma_f)))`` or a Monte Carlo average of
``softmax`` over draws of ``f``.

Memory: the Jacobian blocks ``(batch, choices, experts, out, in)`` per site, so this is for small
layers (the embedded benchmark); the Monte Carlo predictive over weight draws scales to large ones.

Example::

    prediction = linearized_predict(posterior, input_ids, attention_mask, link="probit")
    prediction.probs          # (batch, choices)
    prediction.covariance     # (batch, choices, choices)
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import StrEnum

import torch
from pyro import poutine
from torch import Tensor

from pyro_moe.core.curvature_targets import captured_linear_maps
from pyro_moe.errors import ConfigurationError
from pyro_moe.guides.laplace.kronecker_guide import KroneckerLaplaceGuide, site_targets
from pyro_moe.validation import check_integer

__all__ = ["LinearizedPrediction", "Link", "linearized_predict"]


class Link(StrEnum):
    """How the Gaussian over the logits becomes answer probabilities."""

    PROBIT = "probit"
    """``softmax(f / sqrt(1 + pi/8 diag Sigma_f))`` (the multiclass probit approximation)."""

    MC = "mc"
    """The mean of ``softmax(f_s)`` over draws ``f_s ~ N(f, Sigma_f)``."""


@dataclass
class LinearizedPrediction:
    """What :func:`linearized_predict` returns.

    Attributes:
        probs: ``(batch, choices)``.
        logits: ``(batch, choices)`` at the posterior mean.
        covariance: ``(batch, choices, choices)`` of the linearised logits.
    """

    probs: Tensor
    logits: Tensor
    covariance: Tensor


def linearized_predict(
    posterior,
    input_ids: Tensor,
    attention_mask: Tensor,
    *,
    link: Link | str = Link.PROBIT,
    num_samples: int = 1000,
    seed: int = 0,
) -> LinearizedPrediction:
    """The GLM predictive of a fitted ``kron-laplace`` or ``expert-laplace`` posterior; see the module docstring.

    Args:
        posterior: the :class:`~pyro_moe.FittedPosterior`.
        input_ids, attention_mask: ``(batch, length)``.
        link: ``"probit"`` or ``"mc"``.
        num_samples: logit draws for ``"mc"`` (a positive integer, checked for either link).
        seed: seeds the ``"mc"`` draws (a non-negative integer).

    Raises:
        ConfigurationError: a posterior of another family, an unknown link, a bad ``num_samples`` or
            ``seed``; all before any forward pass.
    """
    num_samples = check_integer("num_samples", num_samples)
    seed = check_integer("seed", seed, minimum=0)
    guide = posterior.guide.global_guide
    if not isinstance(guide, KroneckerLaplaceGuide):
        raise ConfigurationError("linearized_predict needs a fitted 'kron-laplace' or 'expert-laplace' posterior.")
    try:
        link = Link(link)
    except ValueError:
        raise ConfigurationError(f"unknown link {link!r}; accepted: {', '.join(Link)}.") from None
    patch, likelihood = posterior.patch, posterior.likelihood
    covers = "experts" if getattr(patch, "experts", None) else "router"
    targets = site_targets(patch, guide.site_names, covers)
    posteriors = guide.posteriors()
    device = patch.model.get_input_embeddings().weight.device
    input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)
    batch, length = input_ids.shape
    probes = {
        name: posteriors[name].mean.reshape(guide.shapes[name]).detach().clone().requires_grad_(True)
        for name in targets
    }
    with torch.enable_grad(), captured_linear_maps(list(targets.values())) as (calls, router_records):
        with poutine.block(), poutine.condition(data=probes):
            logits = likelihood.answer_logits(input_ids, attention_mask)[0]  # (batch, choices)
    records = calls.records + router_records
    choices = logits.shape[-1]
    jacobians = {
        name: torch.zeros(batch, choices, *posteriors[name].mean.shape, dtype=torch.float64, device=device)
        for name in targets
    }
    for c in range(choices):
        gradients = torch.autograd.grad(
            logits[:, c].sum(), [r.outputs for r in records], retain_graph=c < choices - 1, allow_unused=True
        )
        for record, gradient in zip(records, gradients, strict=True):
            if gradient is None:
                continue
            gradient = gradient.reshape(-1, gradient.shape[-1]).double()
            examples = torch.nn.functional.one_hot(record.tokens // length, batch).double()  # (tokens, batch)
            block = torch.einsum("tb,to,ti->boi", examples, gradient, record.inputs.detach().double())
            jacobians[record.target][:, c, record.block] += block
    covariance = sum(posteriors[name].covariance_inner(j, j) for name, j in jacobians.items())  # (B, C, C)
    logits = logits.detach().double()
    if link is Link.PROBIT:
        probs = torch.softmax(logits / (1 + math.pi / 8 * covariance.diagonal(dim1=-2, dim2=-1)).sqrt(), -1)
    else:
        generator = torch.Generator(device=device).manual_seed(seed)
        scale = torch.linalg.cholesky(covariance + 1e-10 * torch.eye(choices, dtype=covariance.dtype, device=device))
        noise = torch.randn(num_samples, batch, choices, 1, dtype=covariance.dtype, device=device, generator=generator)
        probs = torch.softmax(logits + (scale @ noise).squeeze(-1), -1).mean(0)
    return LinearizedPrediction(probs.float(), logits.float(), covariance)
