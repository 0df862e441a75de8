"""Pyro models: Bayesian router modules (their sample sites) and priors."""

from pyro_moe.models.bayesian_router import BayesianRouter, RouterSites, Selection, SiteKind
from pyro_moe.models.priors import (
    PRIOR_FAMILIES,
    GammaPrior,
    HalfCauchyPrior,
    HorseshoePrior,
    LaplacePrior,
    LogNormalPrior,
    NormalPrior,
    Prior,
    PriorScale,
    ScaleMixturePrior,
    SitePrior,
    SpikeAndSlabPrior,
    StudentTPrior,
    prior_family,
)

__all__ = [
    "PRIOR_FAMILIES",
    "BayesianRouter",
    "GammaPrior",
    "HalfCauchyPrior",
    "HorseshoePrior",
    "LaplacePrior",
    "LogNormalPrior",
    "NormalPrior",
    "Prior",
    "PriorScale",
    "RouterSites",
    "ScaleMixturePrior",
    "Selection",
    "SiteKind",
    "SitePrior",
    "SpikeAndSlabPrior",
    "StudentTPrior",
    "prior_family",
]
