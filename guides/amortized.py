"""Amortized guides of the per-token sites: small MLPs on each token's router input ``u``.

For every Bayesian router, an encoder maps ``u`` ``(..., tokens, hidden)`` to the parameters of
``q(l | u)`` around the deterministic logits ``W u`` (``loc``):

* ``mfvr``: ``N(W u + dmu(u), diag(s(u)^2))`` (mean-field variational router);
* ``fcvr``: ``N(W u + dmu(u), L(u) L(u)^T)`` with ``L = diag(s(u)) U(u)``, ``U`` unit lower
  triangular (full-covariance variational router; ``O(E^2)`` outputs per token);
* ``low-rank-logits``: ``N(W u + dmu(u), D(u) + V(u) V(u)^T)`` with ``V`` of rank ``r``
  (``O(E r)`` per token, between the two);
* ``vtsr``: the per-token temperature ``T ~ LogNormal(m(u), s(u))`` (variational temperature
  sampling router).

Every encoder starts at the deterministic router: zero residual mean and a small scale
(``init_scale``), temperature 1. Scales are the softplus of the encoder's outputs: an exponential
overflows to an infinite scale (and gradient) when a token's output grows during training.

The covariance guides keep every step's covariance well conditioned, whatever the encoder outputs:

* the scales ``s`` (the diagonal ``D = diag(s^2)``) are :data:`SCALE_FLOOR` plus a softplus: an
  encoder that drives a softplus to 0 (it did within 12 Adam steps at step size 0.05 under ``iwae``)
  no longer makes ``1 / s`` overflow in the log-density's gradient;
* the correlation parts are soft-bounded, ``b tanh(x / b)`` with ``b =`` :data:`FACTOR_BOUND`: the
  unit factor's strictly lower entries (``fcvr``), and ``W`` in ``V = D^(1/2) W`` (``low-rank``).
  Torch factorises ``D + V V^T`` through the Cholesky factor of the capacitance
  ``I + V^T D^-1 V``; with ``V = D^(1/2) W`` that is ``I + W^T W``, whose eigenvalues lie in
  ``[1, 1 + E r b^2]`` whatever the scales, so it cannot fail as the unscaled factor did.

Both are still the full and the diagonal-plus-rank-``r`` Normal families (every covariance with
bounded correlation strength). If an encoder's outputs are nevertheless not finite, the guide
raises :class:`~pyro_moe.errors.NonFiniteError` naming its site (the SVI engine adds the step).

Example::

    local = AmortizedLogitGuide(handle, covariance="low-rank", rank=2)
    with routing_context(local_guide=local):       # the routers draw their logits from q(l | u)
        model(input_ids, attention_mask=attention_mask)
"""

from __future__ import annotations

import math

import pyro.distributions as dist
import torch
from torch import Tensor, nn

from pyro_moe.errors import ConfigurationError, NonFiniteError
from pyro_moe.guides.family import GuideFamily, GuideScope
from pyro_moe.models.router_patch import RouterPatch
from pyro_moe.validation import check_integer, check_number

__all__ = [
    "COVARIANCES",
    "FACTOR_BOUND",
    "FCVR",
    "LOW_RANK_LOGITS",
    "MFVR",
    "SCALE_FLOOR",
    "VTSR",
    "AmortizedLogitGuide",
    "AmortizedTemperatureGuide",
    "LocalGuides",
    "TokenEncoder",
]

COVARIANCES = ("diagonal", "full", "low-rank")

SCALE_FLOOR = 1e-3
"""The smallest standard deviation of a logit under the covariance guides (``full``, ``low-rank``)."""

FACTOR_BOUND = 3.0
"""The bound ``b`` of the covariance guides' correlation entries, ``b tanh(x / b)``."""


class TokenEncoder(nn.Module):
    """``hidden -> width -> outputs`` MLP applied per token; the output layer starts at zero
    weights with the given bias, so the encoder starts as a constant."""

    def __init__(self, hidden_size: int, outputs: int, width: int, bias: Tensor) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(hidden_size, width), nn.GELU())
        self.head = nn.Linear(width, outputs)
        nn.init.zeros_(self.head.weight)
        with torch.no_grad():
            self.head.bias.copy_(bias)

    def forward(self, hidden: Tensor) -> Tensor:
        """``(..., hidden) -> (..., outputs)`` in float32."""
        return self.head(self.body(hidden.float()))


def _key(path: str) -> str:
    return path.replace(".", "__")


def _inverse_softplus(value: float) -> float:
    return math.log(math.expm1(value))


class AmortizedLogitGuide(nn.Module):
    """``q(l | u)`` of every patched router's logit site (MFVR, FCVR or low-rank).

    Args:
        patch: the patched model; one encoder per Bayesian router.
        covariance: ``"diagonal"`` (MFVR), ``"full"`` (FCVR) or ``"low-rank"``.
        rank: rank of the low-rank factor.
        width: hidden width of the encoders.
        init_scale: initial standard deviation of every logit.
    """

    def __init__(
        self,
        patch: RouterPatch,
        covariance: str = "diagonal",
        rank: int = 2,
        width: int = 64,
        init_scale: float = 0.01,
    ) -> None:
        super().__init__()
        if covariance not in COVARIANCES:
            raise ConfigurationError(f"unknown covariance {covariance!r}; accepted: {', '.join(COVARIANCES)}.")
        check_integer("rank", rank)
        check_integer("width", width)
        check_number("init_scale", init_scale)
        floor = 0.0 if covariance == "diagonal" else SCALE_FLOOR
        if init_scale <= floor:
            raise ConfigurationError(
                f"init_scale {init_scale} must exceed the scale floor {floor} of the {covariance} covariance."
            )
        self.covariance, self.rank, self.floor = covariance, rank, floor
        self.encoders = nn.ModuleDict()
        for path, router in patch.routers.items():
            experts, hidden = router.weight.shape
            if covariance == "low-rank" and rank >= experts:
                raise ConfigurationError(f"rank {rank} must be below the number of experts ({experts}) of {path}.")
            raw_scale = _inverse_softplus(init_scale - floor)
            if covariance == "diagonal":
                bias = torch.cat([torch.zeros(experts), torch.full((experts,), raw_scale)])
            elif covariance == "full":  # residual mean, scales, strictly lower part of the unit factor
                strict_lower = experts * (experts - 1) // 2
                bias = torch.cat([torch.zeros(experts), torch.full((experts,), raw_scale), torch.zeros(strict_lower)])
            else:
                bias = torch.cat([torch.zeros(experts), torch.full((experts,), raw_scale), torch.zeros(experts * rank)])
            self.encoders[_key(path)] = TokenEncoder(hidden, len(bias), width, bias).to(router.weight.device)

    def logits_distribution(self, router: nn.Module, hidden: Tensor, loc: Tensor) -> dist.TorchDistribution:
        """``q(l | u)``: batch ``loc.shape[:-1]``, event ``(experts,)``; ``hidden`` has ``loc``'s leading
        dimensions (or 1 where ``loc`` has draws).

        Raises:
            NonFiniteError: naming the site, when the encoder's outputs are not finite.
        """
        out = self.encoders[_key(router.path)](hidden)
        if not bool(torch.isfinite(out).all()):
            raise NonFiniteError(f"guide site {router.site_name('logits')!r}: the encoder's outputs are not finite.")
        return self._distribution(loc, out)

    def _distribution(self, loc: Tensor, out: Tensor) -> dist.TorchDistribution:
        """The Normal of the encoder's outputs ``out`` ``(..., outputs)`` around ``loc`` ``(..., experts)``."""
        experts = loc.shape[-1]
        mean = loc + out[..., :experts]
        if self.covariance == "diagonal":
            return dist.Normal(mean, nn.functional.softplus(out[..., experts:])).to_event(1)
        scale = self.floor + nn.functional.softplus(out[..., experts : 2 * experts])
        correlation = FACTOR_BOUND * torch.tanh(out[..., 2 * experts :] / FACTOR_BOUND)
        if self.covariance == "full":
            # L = diag(s) U with U unit lower triangular: the scales bound the factor's conditioning,
            # as AutoMultivariateNormal separates scales from correlations
            rows, cols = torch.tril_indices(experts, experts, offset=-1, device=loc.device)
            unit = torch.eye(experts, device=loc.device).expand(*out.shape[:-1], experts, experts).clone()
            unit[..., rows, cols] = correlation
            return dist.MultivariateNormal(mean, scale_tril=scale.unsqueeze(-1) * unit)
        cov_factor = scale.unsqueeze(-1) * correlation.unflatten(-1, (experts, self.rank))  # V = D^(1/2) W
        return dist.LowRankMultivariateNormal(mean, cov_factor=cov_factor, cov_diag=scale**2)


class AmortizedTemperatureGuide(nn.Module):
    """VTSR: ``q(T | u) = LogNormal(m(u), s(u))`` of every patched router's per-token temperature,
    starting at ``T`` about 1 with log-scale ``init_scale``."""

    def __init__(self, patch: RouterPatch, width: int = 64, init_scale: float = 0.01) -> None:
        super().__init__()
        check_number("init_scale", init_scale)
        self.encoders = nn.ModuleDict(
            {
                _key(path): TokenEncoder(
                    router.weight.shape[1], 2, width, torch.tensor([0.0, _inverse_softplus(init_scale)])
                ).to(router.weight.device)
                for path, router in patch.routers.items()
            }
        )

    def temperature_distribution(self, router: nn.Module, hidden: Tensor) -> dist.TorchDistribution:
        """``q(T | u)``: batch ``hidden.shape[:-1]`` (``(tokens,)`` or ``(draws, tokens)``)."""
        out = self.encoders[_key(router.path)](hidden)
        return dist.LogNormal(out[..., 0], nn.functional.softplus(out[..., 1]))


class LocalGuides(nn.Module):
    """A logit guide and a temperature guide together (either may be missing)."""

    def __init__(self, logits: nn.Module | None, temperature: nn.Module | None) -> None:
        super().__init__()
        self.logits, self.temperature = logits, temperature

    def logits_distribution(self, router: nn.Module, hidden: Tensor, loc: Tensor) -> dist.TorchDistribution:
        if self.logits is None:
            raise ConfigurationError("the model has logit sites but the guide has no logit part (mfvr, fcvr, ...).")
        return self.logits.logits_distribution(router, hidden, loc)

    def temperature_distribution(self, router: nn.Module, hidden: Tensor) -> dist.TorchDistribution:
        if self.temperature is None:
            raise ConfigurationError("the model has per-token temperatures but the guide has no 'vtsr' part.")
        return self.temperature.temperature_distribution(router, hidden)


MFVR = GuideFamily(
    "mfvr",
    GuideScope.LOGITS,
    lambda patch, **options: AmortizedLogitGuide(patch, covariance="diagonal", **options),
    "amortized diagonal Normal on the logits (MFVR)",
)
FCVR = GuideFamily(
    "fcvr",
    GuideScope.LOGITS,
    lambda patch, **options: AmortizedLogitGuide(patch, covariance="full", **options),
    "amortized full-covariance Normal on the logits (FCVR), O(E^2) per token",
)
LOW_RANK_LOGITS = GuideFamily(
    "low-rank-logits",
    GuideScope.LOGITS,
    lambda patch, **options: AmortizedLogitGuide(patch, covariance="low-rank", **options),
    "amortized diagonal plus rank-r Normal on the logits (option rank), O(E r) per token",
)
VTSR = GuideFamily(
    "vtsr", GuideScope.TOKEN_TEMPERATURE, AmortizedTemperatureGuide, "amortized per-token LogNormal temperature"
)
