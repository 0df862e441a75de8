"""Pyro models: Bayesian router modules (their sample sites) and priors."""

from pyro_moe.models.bayesian_router import BayesianRouter, RouterSites, Selection, SiteKind
from pyro_moe.models.priors import LogNormalPrior, NormalPrior, Prior, PriorScale, SitePrior

__all__ = [
    "BayesianRouter",
    "LogNormalPrior",
    "NormalPrior",
    "Prior",
    "PriorScale",
    "RouterSites",
    "Selection",
    "SiteKind",
    "SitePrior",
]
