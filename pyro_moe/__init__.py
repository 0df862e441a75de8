"""pyro-moe: Bayesian routing for HuggingFace Mixture-of-Experts models, with Pyro.

Example::

    import pyro_moe
    handle = pyro_moe.patch_routers(model, {"logits": 2.0}, layers=[1, 2])
    prediction = pyro_moe.predict(handle, input_ids, attention_mask, answer_token_ids=ids, num_samples=16)
    handle.unpatch()
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = [
    "FAMILIES",
    "GUIDE_FAMILIES",
    "PARTICLE_DIM",
    "TOKEN_DIM",
    "ConfigurationError",
    "ExpertPatch",
    "FamilyPreset",
    "FittedPosterior",
    "Generation",
    "GuideFamily",
    "GuideScope",
    "LayerSelectionError",
    "NoMoELayersError",
    "Perplexity",
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
    "generate",
    "last_positions",
    "last_token_logits",
    "patch_experts",
    "patch_routers",
    "perplexity",
    "predict",
    "register_family",
    "register_guide",
    "routing_context",
]

_EXPORTS: dict[str, str] = {
    "ConfigurationError": "pyro_moe.errors",
    "ExpertPatch": "pyro_moe.models.expert_patch",
    "FAMILIES": "pyro_moe.core.families",
    "FamilyPreset": "pyro_moe.guides.family",
    "FittedPosterior": "pyro_moe.inference.fitting",
    "Generation": "pyro_moe.inference.generation",
    "GUIDE_FAMILIES": "pyro_moe.guides.registry",
    "GuideFamily": "pyro_moe.guides.family",
    "GuideScope": "pyro_moe.guides.family",
    "LayerSelectionError": "pyro_moe.errors",
    "NoMoELayersError": "pyro_moe.errors",
    "PARTICLE_DIM": "pyro_moe.core.routing_context",
    "Perplexity": "pyro_moe.inference.perplexity",
    "PosteriorPart": "pyro_moe.guides.family",
    "PredictiveMode": "pyro_moe.core.routing_context",
    "PriorMeanMessenger": "pyro_moe.core.handlers",
    "PyroMoEError": "pyro_moe.errors",
    "RoutedPrediction": "pyro_moe.inference.predictive",
    "RouterFamily": "pyro_moe.core.families",
    "RouterLocation": "pyro_moe.core.families",
    "RouterPatch": "pyro_moe.models.router_patch",
    "TOKEN_DIM": "pyro_moe.core.routing_context",
    "TrainingOptions": "pyro_moe.inference.options",
    "UnsupportedFamilyError": "pyro_moe.errors",
    "at_prior_mean": "pyro_moe.core.handlers",
    "find_moe_routers": "pyro_moe.core.families",
    "fit": "pyro_moe.inference.fitting",
    "generate": "pyro_moe.inference.generation",
    "last_positions": "pyro_moe.core.readout",
    "last_token_logits": "pyro_moe.core.readout",
    "patch_experts": "pyro_moe.models.expert_patch",
    "patch_routers": "pyro_moe.models.router_patch",
    "perplexity": "pyro_moe.inference.perplexity",
    "predict": "pyro_moe.inference.predictive",
    "register_family": "pyro_moe.core.families",
    "register_guide": "pyro_moe.guides.registry",
    "routing_context": "pyro_moe.core.routing_context",
}
"""The module of every public name: imported on first access (PEP 562), so that ``import pyro_moe``
and the command line's ``--help`` do not load torch, Pyro and transformers."""


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'pyro_moe' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
