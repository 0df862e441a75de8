"""pyro-moe: Bayesian routing for HuggingFace Mixture-of-Experts models, with Pyro.

Example::

    import pyro_moe
    handle = pyro_moe.patch_routers(model, {"logits": 2.0}, layers=[1, 2])
    prediction = pyro_moe.predict(handle, input_ids, attention_mask, answer_token_ids=ids, num_samples=16)
    handle.unpatch()
"""

from pyro_moe.core.families import FAMILIES, RouterFamily, RouterLocation, find_moe_routers, register_family
from pyro_moe.core.handlers import PriorMeanMessenger, at_prior_mean
from pyro_moe.core.readout import last_positions, last_token_logits
from pyro_moe.core.routing_context import PARTICLE_DIM, TOKEN_DIM, PredictiveMode, routing_context
from pyro_moe.errors import (
    ConfigurationError,
    LayerSelectionError,
    NoMoELayersError,
    PyroMoEError,
    UnsupportedFamilyError,
)
from pyro_moe.guides.family import FamilyPreset, GuideFamily, GuideScope, PosteriorPart
from pyro_moe.guides.registry import GUIDE_FAMILIES, register_guide
from pyro_moe.inference.fitting import FittedPosterior, fit
from pyro_moe.inference.options import TrainingOptions
from pyro_moe.inference.predictive import RoutedPrediction, predict
from pyro_moe.models.expert_patch import ExpertPatch, patch_experts
from pyro_moe.models.router_patch import RouterPatch, patch_routers

__all__ = [
    "FAMILIES",
    "GUIDE_FAMILIES",
    "PARTICLE_DIM",
    "TOKEN_DIM",
    "ConfigurationError",
    "ExpertPatch",
    "FamilyPreset",
    "FittedPosterior",
    "GuideFamily",
    "GuideScope",
    "LayerSelectionError",
    "NoMoELayersError",
    "PosteriorPart",
    "PredictiveMode",
    "PriorMeanMessenger",
    "PyroMoEError",
    "RoutedPrediction",
    "RouterFamily",
    "RouterLocation",
    "RouterPatch",
    "TrainingOptions",
    "UnsupportedFamilyError",
    "at_prior_mean",
    "find_moe_routers",
    "fit",
    "last_positions",
    "last_token_logits",
    "patch_experts",
    "patch_routers",
    "predict",
    "register_family",
    "register_guide",
    "routing_context",
]
