"""What :meth:`FittedPosterior.load <pyro_moe.inference.fitted_posterior.FittedPosterior.load>` checks and
restores from a saved posterior besides the parameters: the model it was fitted on (its fingerprint), the
guide's buffers (SWAG's moments) and the names of the hierarchical prior scales' parameters in older
checkpoints.

Example::

    check_same_model(saved, patch, allow_other_model=False)   # CheckpointError naming what differs
    load_buffers(posterior.guide, tensors)                     # the saved "buffer/<name>" tensors
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping

import pyro
import torch
from torch import Tensor, nn

from pyro_moe.errors import ConfigurationError
from pyro_moe.inference.checkpoint import (
    CheckpointError,
    SavedCheckpoint,
)
from pyro_moe.inference.model_fingerprint import model_differences, model_fingerprint
from pyro_moe.models.priors import HYPERPRIOR_SUFFIX
from pyro_moe.models.router_patch import RouterPatch

__all__ = ["check_same_model", "load_buffers", "renamed_hyperprior_parameters"]


def renamed_hyperprior_parameters(tensors: Mapping[str, Tensor], prefix: str) -> dict[str, Tensor]:
    """``tensors`` with the guide parameters of hierarchical prior scales under their current names:
    checkpoints from before the hyperprior sites were named ``<site>_prior_scale``
    (:func:`~pyro_moe.models.priors.hyperprior_site_name`) name them after ``<site>.prior_scale``. A
    parameter is renamed only when the rebuilt guide has the new name and not the old one (a learned
    scale, the ``pyro.param`` ``<site>.prior_scale``, keeps its name)."""
    store, renamed = pyro.get_param_store(), {}
    for key, value in tensors.items():
        name = key.removeprefix("param/")
        if key.startswith("param/") and name.endswith(".prior_scale") and prefix + name not in store:
            current = name.removesuffix(".prior_scale") + HYPERPRIOR_SUFFIX
            key = f"param/{current}" if prefix + current in store else key
        renamed[key] = value
    return renamed


def check_same_model(saved: SavedCheckpoint, patch: RouterPatch, allow_other_model: bool) -> None:
    """Refuse (or, ``allow_other_model``, warn about) a model whose fingerprint differs from the saved one."""
    if saved.model is None:  # written without a fingerprint (save_checkpoint alone, or before manifests)
        return
    differences = model_differences(saved.model, model_fingerprint(patch))
    if differences and not allow_other_model:
        raise CheckpointError(
            f"posterior {saved.folder} was fitted on another model: {'; '.join(differences)} differ. Load it into "
            "the model it was fitted on, or transfer it deliberately with allow_other_model=True (command line: "
            "--allow-other-model)."
        )
    if differences:
        warnings.warn(
            f"loading posterior {saved.folder} into another model than it was fitted on (allow_other_model): "
            f"{'; '.join(differences)} differ.",
            stacklevel=3,
        )


def load_buffers(guide: nn.Module, tensors: Mapping[str, Tensor]) -> None:
    """Copy the saved buffers of ``guide`` (SWAG's moments) into the rebuilt one."""
    missing = [name for name, _ in guide.named_buffers() if f"buffer/{name}" not in tensors]
    if missing:
        raise ConfigurationError(f"the checkpoint lacks the guide's buffers {missing[:3]}.")
    with torch.no_grad():
        for name, buffer in guide.named_buffers():
            buffer.copy_(tensors[f"buffer/{name}"])
