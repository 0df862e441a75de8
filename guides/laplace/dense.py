"""Dense Laplace approximation over a minibatched data set (small site sets).

Pyro's ``AutoLaplaceApproximation.laplace_approximation`` takes the Hessian on one call of the
model; with minibatches the full-data negative log joint is the weighted sum of the batches'
losses, each weighted by its share ``B / N`` of the data (so the prior counts once). Data-parallel,
the batches are dealt round-robin over the ranks and their Hessians summed by one all-reduce.

The ``laplace`` family is :class:`DenseLaplaceMAP`: a MAP trained by SVI, then (post hoc) the
Gaussian ``N(loc, diag(scale) C C^T diag(scale))`` over the unconstrained global sites, stored as
the buffers of an ``AutoMultivariateNormal``.

Example::

    map_guide = AutoLaplaceApproximation(model)          # trained to the MAP by SVI
    loc, scale, correlation_tril = dense_laplace(model, map_guide, batches, [b / n for b in sizes])
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from pyro import poutine
from pyro.infer.autoguide import AutoLaplaceApproximation, AutoMultivariateNormal
from pyro.ops.hessian import hessian
from torch import Tensor

from pyro_moe.distributed import DataParallel
from pyro_moe.errors import ConfigurationError
from pyro_moe.guides.family import PosteriorPart, PostHocData

__all__ = ["DenseLaplaceMAP", "dense_laplace", "laplace_gaussian"]


def dense_laplace(
    model: Callable[..., Any],
    map_guide: AutoLaplaceApproximation,
    batches: Sequence[Mapping[str, Any]],
    weights: Sequence[float],
    data_parallel: DataParallel | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Gaussian at the MAP of ``map_guide`` with the inverse Hessian of the full-data negative log
    joint as covariance, in the guide's unconstrained latent space of dimension ``D``.

    Args:
        model: the Pyro model, called with each batch's keyword arguments.
        map_guide: the trained MAP guide.
        batches: keyword arguments of every batch.
        weights: each batch's share of the data (``B / N``; they sum to 1).
        data_parallel: share the batches among the ranks and sum their Hessians (every rank gives
            all ``batches`` and gets the same result).

    Returns:
        ``loc`` ``(D,)``, ``scale`` ``(D,)`` (posterior standard deviations) and the Cholesky factor
        ``(D, D)`` of the posterior correlation matrix, as ``AutoMultivariateNormal`` stores them.
    """
    pairs = list(enumerate(zip(batches, weights, strict=True)))
    if data_parallel is not None:
        pairs = data_parallel.shard_batches([pair for _, pair in pairs])
    loc = map_guide.loc
    precision = loc.new_zeros(loc.numel(), loc.numel())
    if pairs:
        total = 0.0
        for _, (batch, weight) in pairs:
            guide_trace = poutine.trace(map_guide).get_trace(**batch)
            model_trace = poutine.trace(poutine.replay(model, trace=guide_trace)).get_trace(**batch)
            total = total + weight * (guide_trace.log_prob_sum() - model_trace.log_prob_sum())
        precision = hessian(total, loc)
    if data_parallel is not None:
        precision = precision.detach().contiguous()
        data_parallel.all_reduce_([precision], "the all-reduce of the Laplace Hessian")
    with torch.no_grad():
        covariance = torch.linalg.inv(precision)
        scale = covariance.diagonal().sqrt()
        try:
            correlation_tril = torch.linalg.cholesky(covariance / scale[:, None] / scale[None, :])
        except RuntimeError as error:
            raise ConfigurationError(
                f"the Hessian at the MAP is not positive definite (train longer or use a stronger prior): {error}"
            ) from None
    return map_guide.loc.detach().clone(), scale, correlation_tril


def laplace_gaussian(
    global_model: Callable[..., Any], batch: Mapping[str, Any], loc: Tensor, scale: Tensor, correlation_tril: Tensor
) -> AutoMultivariateNormal:
    """The Gaussian ``N(loc, diag(scale) C C^T diag(scale))`` (``C = correlation_tril`` ``(D, D)``) over the
    unconstrained global sites of ``global_model``, as an ``AutoMultivariateNormal`` holding buffers."""
    gaussian = AutoMultivariateNormal(global_model)
    gaussian._setup_prototype(**batch)
    del gaussian.loc, gaussian.scale, gaussian.scale_tril
    gaussian.register_buffer("loc", loc)
    gaussian.register_buffer("scale", scale)
    gaussian.register_buffer("scale_tril", correlation_tril)
    return gaussian


class DenseLaplaceMAP(AutoLaplaceApproximation, PosteriorPart):
    """The ``laplace`` family: the MAP of the global sites by SVI, then :func:`dense_laplace` over the
    full data set; small site sets only (the Hessian is ``(D, D)``)."""

    post_hoc = True

    def finish_fit(self, data: PostHocData) -> AutoMultivariateNormal:
        """The Laplace Gaussian at the current MAP, the Hessian summed over ``data.batches``."""
        kwargs = [{**batch, "num_examples": data.num_examples} for batch in data.batches]
        weights = [batch["input_ids"].shape[0] / data.num_examples for batch in data.batches]
        loc, scale, correlation_tril = dense_laplace(data.likelihood, self, kwargs, weights, data.data_parallel)
        return laplace_gaussian(data.global_model, kwargs[0], loc, scale, correlation_tril)

    def restore_fitted(
        self, buffers: Mapping[str, Tensor], metadata: Mapping[str, Any], data: PostHocData
    ) -> AutoMultivariateNormal:
        """The saved Gaussian (buffers ``loc``, ``scale``, ``scale_tril``)."""
        batch = {**data.batches[0], "num_examples": data.num_examples}
        return laplace_gaussian(data.global_model, batch, buffers["loc"], buffers["scale"], buffers["scale_tril"])
