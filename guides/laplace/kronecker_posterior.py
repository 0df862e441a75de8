"""The Kronecker-factored Laplace posterior of a stack of weight blocks, its samples and its evidence.

**Kronecker convention** (written here once; every other mention in pyro-moe follows it): a block
``W`` ``(out, in)`` is flattened row-major, ``vec(W) = W.reshape(-1)`` (entry ``W[i, j]`` at
``i * in + j``, as ``reshape`` and ``torch.kron`` lay it out). A token's gradient ``dL/dW = g a^T``
(``g`` ``(out,)`` the output gradient, ``a`` ``(in,)`` the input) then flattens to ``kron(g, a)``,
and the curvature ``sum_t kron(g_t, a_t) kron(g_t, a_t)^T`` is approximated by

    G (x) A = torch.kron(G, A),    G = sum_t g_t g_t^T (out x out),    A = mean_t a_t a_t^T (in x in)

(exact for one token). The K-FAC papers write ``A (x) G`` for the same matrix because they stack
the columns of ``W`` (column-major ``vec``); pyro-moe never does.

For ``n`` blocks ``W_b`` ``(out, in)`` with factors ``A_b = QA diag(lA) QA^T`` (``in x in``) and
``G_b = QG diag(lG) QG^T`` (``out x out``), kept to ``ra`` and ``rg`` eigenpairs, the posterior of block
``b`` is Gaussian with mean ``W_map`` and precision

    P_b = G_b (x) A_b + tau_b I,

eigenvalues ``lG_i lA_j + tau_b`` on the kept pairs and ``tau_b`` (prior only) on the complement.
Exact sampling, one standard normal ``Z`` ``(out, in)`` per block::

    W = W_map + Z / sqrt(tau) + QG [((lG lA^T + tau)^(-1/2) - tau^(-1/2)) * (QG^T Z QA)] QA^T

Memory per block: ``out x rg + in x ra + rg + ra`` floats, plus the ``rg x ra`` eigenvalue products.

Log evidence (Laplace, prior ``N(W0, tau^-1 I)``, ``D`` = data), summed over the blocks with data::

    log p(D) ~ log p(D | W_map) - tau/2 ||W_map - W0||^2 - 1/2 sum_ij log(1 + lG_i lA_j / tau)

A block with zero curvature (an expert no token was routed to) contributes nothing: the likelihood does
not depend on it, so its exact evidence factor is the integral of its prior, 1, whatever ``tau`` (the
Laplace terms would instead add ``-tau/2 ||W_map - W0||^2``, merely because the mode is not that prior's
mode). :func:`log_evidence` and :func:`optimize_prior_precision` both leave such blocks out, so the
optimised ``tau`` is the argmax of the reported evidence.

Example: one block ``(out, in) = (3, 2)`` seen by one token, whose factors are exact. (From a model,
:meth:`KroneckerLaplace.from_curvature` takes the factors of
:func:`~pyro_moe.guides.laplace.kronecker_curvature.kronecker_curvature`.)

>>> import torch
>>> from pyro_moe.guides.laplace.kronecker_posterior import KroneckerLaplace, log_evidence, optimize_prior_precision
>>> _ = torch.manual_seed(0)
>>> g, a = torch.randn(3, dtype=torch.float64), torch.randn(2, dtype=torch.float64)
>>> torch.equal(torch.outer(g, a).reshape(-1), torch.kron(g, a))  # row-major vec of the gradient g a^T
True
>>> lG, QG = torch.linalg.eigh(torch.outer(g, g))  # G (out, out)
>>> lA, QA = torch.linalg.eigh(torch.outer(a, a))  # A (in, in)
>>> weights = torch.randn(1, 3, 2, dtype=torch.float64)  # (n, out, in), n = 1 block
>>> posterior = KroneckerLaplace(
...     weights, QA[None], lA[None], QG[None], lG[None], prior_precision=10.0, prior_mean=torch.zeros_like(weights)
... )
>>> token = torch.outer(torch.kron(g, a), torch.kron(g, a))  # the token's curvature (out*in, out*in)
>>> torch.allclose(posterior.dense_precision()[0], token + 10.0 * torch.eye(6, dtype=torch.float64))
True
>>> posterior.sample((16,)).shape  # (16, n, out, in)
torch.Size([16, 1, 3, 2])
>>> before = log_evidence([posterior], log_likelihood=-1.0)
>>> (tau,) = optimize_prior_precision([posterior], per="layer")  # in place, one tau per posterior
>>> tau.shape, log_evidence([posterior], log_likelihood=-1.0) >= before
(torch.Size([1]), True)
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from scipy.optimize import minimize_scalar
from torch import Tensor

from pyro_moe.errors import ConfigurationError, NonFiniteError
from pyro_moe.guides.laplace.kronecker_curvature import KroneckerCurvature

__all__ = ["KroneckerLaplace", "log_evidence", "optimize_prior_precision"]

PRIOR_PRECISION_BOUNDS = (1e-6, 1e8)
"""Search interval of :func:`optimize_prior_precision`."""


def _check_precision(value: float | Tensor, blocks: int) -> Tensor:
    tau = torch.as_tensor(value, dtype=torch.float64)
    if tau.dim() > 1 or (tau.dim() == 1 and tau.shape[0] not in (1, blocks)):
        raise ConfigurationError(
            f"prior_precision must be a scalar or one value per block ({blocks}), got shape {tuple(tau.shape)}."
        )
    if not torch.isfinite(tau).all() or (tau <= 0).any():
        raise ConfigurationError(f"prior_precision must be positive and finite, got {value!r}.")
    return tau.expand(blocks).clone() if tau.dim() == 1 else tau.repeat(blocks)


class KroneckerLaplace:
    """Gaussian ``N(mean, (G (x) A + tau I)^-1)`` per block; see the module docstring.

    Args:
        mean: ``(n, out, in)`` the mode.
        input_vectors, input_values: ``(n, in, ra)`` and ``(n, ra)``: eigenpairs of ``A``.
        output_vectors, output_values: ``(n, out, rg)`` and ``(n, rg)``: eigenpairs of ``G``.
        prior_precision: ``tau``, a scalar or ``(n,)``.
        prior_mean: ``(n, out, in)`` the prior centre ``W0``; default the mean.
    """

    def __init__(
        self,
        mean: Tensor,
        input_vectors: Tensor,
        input_values: Tensor,
        output_vectors: Tensor,
        output_values: Tensor,
        prior_precision: float | Tensor = 1.0,
        prior_mean: Tensor | None = None,
    ) -> None:
        self.mean = mean.detach()
        self.input_vectors, self.input_values = input_vectors, input_values
        self.output_vectors, self.output_values = output_vectors, output_values
        self.prior_mean = self.mean if prior_mean is None else prior_mean.detach().to(self.mean)
        if self.prior_mean.shape != self.mean.shape:
            raise ConfigurationError(
                f"prior_mean has shape {tuple(self.prior_mean.shape)}, the weights {tuple(self.mean.shape)}."
            )
        for name, value in (("input", input_values), ("output", output_values)):
            if not torch.isfinite(value).all():
                raise NonFiniteError(f"non-finite curvature: the {name} factors' eigenvalues are not finite.")
        self.prior_precision = prior_precision

    @classmethod
    def from_curvature(
        cls,
        curvature: KroneckerCurvature,
        mean: Tensor,
        prior_precision: float | Tensor = 1.0,
        prior_mean: Tensor | None = None,
    ) -> KroneckerLaplace:
        """From the factors of one target; ``mean`` is its weight reshaped to ``(n, out, in)``."""
        stack = torch.stack
        return cls(
            mean.reshape(curvature.target.blocks, curvature.target.out_features, curvature.target.in_features),
            stack([f.vectors for f in curvature.input_factors]),
            stack([f.values for f in curvature.input_factors]),
            stack([f.vectors for f in curvature.output_factors]),
            stack([f.values for f in curvature.output_factors]),
            prior_precision,
            None if prior_mean is None else prior_mean.reshape(-1, *mean.shape[-2:]),
        )

    @property
    def prior_precision(self) -> Tensor:
        """``(n,)`` float64."""
        return self._tau

    @prior_precision.setter
    def prior_precision(self, value: float | Tensor) -> None:
        self._tau = _check_precision(value, self.mean.shape[0]).to(self.input_values.device)

    @property
    def blocks(self) -> int:
        return self.mean.shape[0]

    def eigenvalue_products(self) -> Tensor:
        """``(n, rg, ra)``: ``lG_i lA_j``, the curvature's eigenvalues on the kept pairs."""
        return self.output_values[:, :, None] * self.input_values[:, None, :]

    def _projected(self, value: Tensor) -> Tensor:
        """``QG^T value QA`` ``(..., n, rg, ra)`` of ``value`` ``(..., n, out, in)``."""
        return self.output_vectors.transpose(-1, -2) @ value @ self.input_vectors

    def _lift(self, value: Tensor) -> Tensor:
        """``QG value QA^T`` ``(..., n, out, in)`` of ``value`` ``(..., n, rg, ra)``."""
        return self.output_vectors @ value @ self.input_vectors.transpose(-1, -2)

    def sample(self, sample_shape: torch.Size | tuple[int, ...] = (), generator: torch.Generator | None = None):
        """Exact draws ``(*sample_shape, n, out, in)`` in the mean's dtype."""
        shape = (*sample_shape, *self.mean.shape)
        noise = torch.randn(shape, dtype=torch.float64, device=self.mean.device, generator=generator)
        return self.transform(noise).to(self.mean.dtype)

    def transform(self, noise: Tensor) -> Tensor:
        """The draw ``(..., n, out, in)`` (float64) of standard normal ``noise`` of the same shape."""
        tau = self.prior_precision[:, None, None]
        shrink = (self.eigenvalue_products() + tau).rsqrt() - tau.rsqrt()
        deviation = noise / tau.sqrt() + self._lift(shrink * self._projected(noise))
        return self.mean.to(torch.float64) + deviation

    def log_prob(self, value: Tensor) -> Tensor:
        """Log-density ``(...)`` of ``value`` ``(..., n, out, in)`` (summed over blocks), float64."""
        tau = self.prior_precision[:, None, None]
        deviation = value.to(torch.float64) - self.mean.to(torch.float64)
        products = self.eigenvalue_products()
        quadratic = (tau * deviation**2).sum((-1, -2)) + (products * self._projected(deviation) ** 2).sum((-1, -2))
        dims = self.mean.shape[-1] * self.mean.shape[-2]
        log_det = dims * tau.reshape(-1).log() + torch.log1p(products / tau).sum((-1, -2))
        return (-0.5 * (quadratic + dims * math.log(2 * math.pi)) + 0.5 * log_det).sum(-1)

    def covariance_inner(self, left: Tensor, right: Tensor) -> Tensor:
        """``<left, Sigma right>`` summed over blocks, for ``left`` ``(..., a, n, out, in)`` and ``right``
        ``(..., b, n, out, in)``: ``(..., a, b)``, with ``Sigma = (G (x) A + tau I)^-1`` applied in the
        eigenbasis, ``Sigma M = M / tau + QG [(1/(lG lA^T + tau) - 1/tau) * (QG^T M QA)] QA^T``."""
        tau = self.prior_precision[:, None, None]
        left, right = left.to(torch.float64), right.to(torch.float64)
        plain = torch.einsum("...anoi,...bnoi->...ab", left, right / tau)
        shrink = 1.0 / (self.eigenvalue_products() + tau) - 1.0 / tau
        projected_left, projected_right = self._projected(left), self._projected(right)
        return plain + torch.einsum("...anij,nij,...bnij->...ab", projected_left, shrink, projected_right)

    def dense_precision(self) -> Tensor:
        """``(n, out*in, out*in)``: ``G (x) A + tau I`` (row-major ``vec``), for tests on small blocks."""
        dims = self.mean.shape[-1] * self.mean.shape[-2]
        blocks = []
        for b in range(self.blocks):
            g = (self.output_vectors[b] * self.output_values[b]) @ self.output_vectors[b].T
            a = (self.input_vectors[b] * self.input_values[b]) @ self.input_vectors[b].T
            blocks.append(torch.kron(g, a) + self.prior_precision[b] * torch.eye(dims, dtype=g.dtype, device=g.device))
        return torch.stack(blocks)

    def log_det_ratio(self) -> Tensor:
        """``(n,)``: ``sum_ij log(1 + lG_i lA_j / tau)`` = ``log det P - log det (tau I)``."""
        tau = self.prior_precision[:, None, None]
        return torch.log1p(self.eigenvalue_products() / tau).sum((-1, -2))

    def squared_distance(self) -> Tensor:
        """``(n,)``: ``||W_map - W0||^2`` per block."""
        return ((self.mean.to(torch.float64) - self.prior_mean.to(torch.float64)) ** 2).sum((-1, -2))

    def informed(self) -> Tensor:
        """``(n,)`` bool: the blocks with nonzero curvature, i.e. with data."""
        return self.eigenvalue_products().flatten(1).ne(0).any(-1)

    def evidence_terms(self) -> Tensor:
        """``(n,)``: each block's ``-tau/2 ||W_map - W0||^2 - 1/2 log det ratio``; 0 for a block without
        data (see the module docstring)."""
        terms = -0.5 * self.prior_precision * self.squared_distance() - 0.5 * self.log_det_ratio()
        return torch.where(self.informed(), terms, torch.zeros_like(terms))


def log_evidence(posteriors: Sequence[KroneckerLaplace], log_likelihood: float) -> float:
    """The Laplace log evidence of independent blocks: ``log p(D | W_map)`` plus the terms of every block
    with data (:meth:`KroneckerLaplace.evidence_terms`)."""
    return float(log_likelihood) + float(sum(p.evidence_terms().sum() for p in posteriors))


def optimize_prior_precision(
    posteriors: Sequence[KroneckerLaplace],
    per: str = "layer",
    bounds: tuple[float, float] = PRIOR_PRECISION_BOUNDS,
) -> list[Tensor]:
    """Maximise the log evidence over the prior precisions (in place) and return them.

    ``per`` is ``"model"`` (one tau for all posteriors), ``"layer"`` (one per posterior) or
    ``"expert"`` (one per block). The evidence separates over the parameters, so each is a
    one-dimensional bounded search over ``log tau``.

    A block whose curvature is zero (an expert no token was routed to) has no evidence about its tau:
    its exact evidence ``p(D)`` does not depend on its prior, and the Laplace terms' only dependence,
    ``-tau/2 ||W_map - W0||^2``, would drive tau to the lower bound (a prior as wide as the bound allows)
    merely because the mode is not a posterior mode of that prior. Such blocks are left out of the
    objective, as :func:`log_evidence` leaves them out (the chosen tau maximises the reported evidence),
    and a parameter that only such blocks share (an expert with ``per="expert"``, a layer
    with no data) keeps its current tau; with ``per="layer"`` or ``"model"`` they take the tau the
    other blocks of their layer (or model) chose.

    Raises:
        ConfigurationError: unknown ``per``, or a prior mean equal to the mode on the blocks with data of
            some parameter: the evidence then grows without bound in its tau (give a prior mean such as
            zero, or choose tau on held-out data).
    """
    if per not in ("model", "layer", "expert"):
        raise ConfigurationError(f"per must be 'model', 'layer' or 'expert', got {per!r}.")
    if not posteriors:
        raise ConfigurationError("no posterior to optimise.")
    groups: list[list[tuple[int, slice]]]
    if per == "model":
        groups = [[(i, slice(None)) for i in range(len(posteriors))]]
    elif per == "layer":
        groups = [[(i, slice(None))] for i in range(len(posteriors))]
    else:
        groups = [[(i, slice(b, b + 1))] for i, p in enumerate(posteriors) for b in range(p.blocks)]
    # (n,) per posterior: the blocks with nonzero curvature, i.e. with data.
    informed = [p.informed() for p in posteriors]
    searches = []
    for group in groups:
        stats = [
            (
                posteriors[i].squared_distance()[s][informed[i][s]],
                posteriors[i].eigenvalue_products()[s][informed[i][s]],
            )
            for i, s in group
        ]
        if sum(len(d) for d, _ in stats) == 0:
            continue  # no data: nothing to learn about this tau
        if all(bool((d == 0).all()) for d, _ in stats):
            raise ConfigurationError(
                "the prior mean equals the mode, so the log evidence grows without bound in the prior precision; "
                "give a prior mean different from the fitted weights (e.g. prior_mean='zero'), or choose the prior "
                "precision by validation NLL."
            )
        searches.append((group, stats))
    low, high = math.log(bounds[0]), math.log(bounds[1])
    for group, stats in searches:

        def negative_evidence(log_tau: float, stats=stats) -> float:
            tau = math.exp(log_tau)
            return float(sum(0.5 * tau * d.sum() + 0.5 * torch.log1p(lam / tau).sum() for d, lam in stats))

        best = minimize_scalar(negative_evidence, bounds=(low, high), method="bounded", options={"xatol": 1e-6})
        for i, s in group:
            tau = posteriors[i].prior_precision.clone()
            tau[s] = math.exp(best.x)
            posteriors[i].prior_precision = tau
    return [p.prior_precision for p in posteriors]
