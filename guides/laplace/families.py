"""The Laplace posterior families: ``laplace`` (dense), ``kron-laplace`` (router weights) and
``expert-laplace`` (expert ``down_proj``), each a MAP stage by SVI and a post-hoc Gaussian.

Fitted by name, ``expert-laplace`` is the recipe that beats the deterministic model's NLL and ECE
on the embedded benchmark: the expert sites of the last layer, post hoc (no SVI steps), rank-10
factors, the prior precision chosen among 3, 10, 30, 100 by validation NLL (over all layers with
precision 1 the sampled experts ruin the answers).

Example::

    family = guide_family("expert-laplace")
    preset = family.preset(steps=200)          # sites "experts", layers [-1], steps 0, rank 10
    preset.tune(posterior, validation_batches, 0)
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from torch import Tensor

from pyro_moe.guides.autoguides import autoguide_builder
from pyro_moe.guides.family import FamilyPreset, GuideFamily, GuideScope
from pyro_moe.guides.laplace.dense import DenseLaplaceMAP
from pyro_moe.guides.laplace.kronecker_guide import KroneckerMAP
from pyro_moe.guides.laplace.prior_precision import select_prior_precision
from pyro_moe.models.likelihoods import LikelihoodKind

__all__ = ["EXPERT_LAPLACE", "KRON_LAPLACE", "LAPLACE", "PriorPrecisionSelection"]

_MCQA_ONLY = frozenset({LikelihoodKind.MCQA})
"""The Kronecker factors are the curvature of the MCQA answer at the readout position."""


@dataclass(frozen=True)
class PriorPrecisionSelection:
    """The ``tune`` step of a :class:`~pyro_moe.guides.family.FamilyPreset`: the prior precision among
    ``grid`` with the lowest validation NLL (:func:`~pyro_moe.guides.laplace.prior_precision.select_prior_precision`).

    Attributes:
        grid: the candidate precisions.
    """

    grid: Sequence[float]

    def __call__(self, posterior: Any, validation_batches: Sequence[Mapping[str, Tensor]], seed: int) -> None:
        select_prior_precision(posterior, validation_batches, self.grid, seed=seed)


def _kronecker_builder(covers: str) -> Callable[..., KroneckerMAP]:
    def build(model: Callable[..., Any], **options: Any) -> KroneckerMAP:
        KroneckerMAP.checked_options(covers, options)  # a ConfigurationError naming the option, not a TypeError
        return KroneckerMAP(model, covers=covers, **options)

    return build


def _kronecker_options_check(covers: str) -> Callable[[Mapping[str, Any], int | None], None]:
    """The family's ``check_options``: unknown or bad options refused before any forward pass."""

    def check(options: Mapping[str, Any], steps: int | None) -> None:
        KroneckerMAP.checked_options(covers, options)

    return check


LAPLACE = GuideFamily(
    "laplace",
    GuideScope.GLOBAL,
    autoguide_builder(DenseLaplaceMAP, scaled=False),
    "MAP, then a Gaussian with the dense Hessian of the full-data loss at the mode (small site sets)",
    post_hoc=True,
)
KRON_LAPLACE = GuideFamily(
    "kron-laplace",
    GuideScope.GLOBAL,
    _kronecker_builder("router"),
    "MAP router weights, then a Kronecker-factored Laplace (options rank, fisher, tokens, mc_samples)",
    post_hoc=True,
    check_options=_kronecker_options_check("router"),
    likelihoods=_MCQA_ONLY,
    hierarchical_refusal="its Kronecker factors are the curvature of the router weights alone",
)
EXPERT_LAPLACE = GuideFamily(
    "expert-laplace",
    GuideScope.GLOBAL,
    _kronecker_builder("experts"),
    "expert down_proj sites (patch_experts): Kronecker-factored Laplace at the model's weights (steps=0)",
    preset=lambda steps: FamilyPreset(
        sites="experts",
        user_sites=False,
        training={"steps": 0},
        guide_options={"rank": 10},
        layers=[-1],
        tune=PriorPrecisionSelection((3, 10, 30, 100)),
    ),
    post_hoc=True,
    check_options=_kronecker_options_check("experts"),
    likelihoods=_MCQA_ONLY,
    hierarchical_refusal="its Kronecker factors are the curvature of the expert weights alone",
)
