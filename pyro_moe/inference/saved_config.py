"""Every entry of a loaded posterior's ``config.json`` checked like a command-line option.

A checkpoint's configuration rebuilds the patch, the likelihood, the guide and the training; a value
edited by hand (or by another tool) must be refused with the entry's name, not end in an
``IndexError`` deep in a forward pass. :func:`check_saved_config` checks, before the model is
touched: the guide's name and options, every training option, ``sites``, ``selection``, ``layers``
(MoE layers of the model), ``likelihood`` and ``answer_token_ids`` (distinct ids inside the model's
vocabulary), ``step_count``, ``history``, the calibration temperatures and the post-hoc flags.

Example::

    check_saved_config(config, model, Path("runs/fit/posterior/config.json"))   # CheckpointError naming the entry
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import fields
from pathlib import Path
from typing import Any

from torch import nn

from pyro_moe.core.families import find_moe_routers
from pyro_moe.core.routing_context import PredictiveMode
from pyro_moe.errors import PyroMoEError
from pyro_moe.guides.registry import parse_guide
from pyro_moe.inference.checkpoint import CheckpointError
from pyro_moe.inference.options import TrainingOptions
from pyro_moe.models.bayesian_router import Selection
from pyro_moe.models.likelihoods import LikelihoodKind
from pyro_moe.validation import check_integer

__all__ = ["check_saved_config", "vocabulary_size"]

_REQUIRED = ("guide", "sites", "selection", "layers")


def vocabulary_size(model: nn.Module) -> int:
    """Rows of the model's output head (the ids a readout can index), else of its input embeddings."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    weight = getattr(head, "weight", None)
    if weight is None:
        weight = model.get_input_embeddings().weight
    return int(weight.shape[0])


def _is_integer(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _check_entry(config: Mapping[str, Any], model: nn.Module, key: str) -> None:
    """Raise a :class:`~pyro_moe.errors.PyroMoEError` (any) when ``config[key]`` is unusable."""
    value = config[key]
    if key == "guide":
        parse_guide(value)
    elif key == "guide_options":
        if not isinstance(value, dict) or not all(isinstance(k, str) and isinstance(v, dict) for k, v in value.items()):
            raise PyroMoEError(f"must map guide family names to option objects, got {value!r}")
    elif key in {field.name for field in fields(TrainingOptions)}:
        TrainingOptions(**{key: value})
    elif key == "sites":
        if not isinstance(value, dict) or not value:
            raise PyroMoEError(f"must be an object of site kinds and their options, got {value!r}")
    elif key == "selection":
        if value not in {selection.value for selection in Selection}:
            raise PyroMoEError(f"must be one of {', '.join(s.value for s in Selection)}, got {value!r}")
    elif key == "layers":
        moe_layers = sorted({location.layer_index for location in find_moe_routers(model)})
        if (
            not isinstance(value, list)
            or not value
            or not all(_is_integer(layer) and layer in moe_layers for layer in value)
            or len(set(value)) != len(value)
        ):
            raise PyroMoEError(f"must be distinct MoE layer indices of this model ({moe_layers}), got {value!r}")
    elif key == "likelihood":
        if value not in {kind.value for kind in LikelihoodKind}:
            raise PyroMoEError(f"must be one of {', '.join(kind.value for kind in LikelihoodKind)}, got {value!r}")
    elif key == "answer_token_ids":
        size = vocabulary_size(model)
        if config.get("likelihood", LikelihoodKind.MCQA.value) == LikelihoodKind.NEXT_TOKEN.value:
            if value is not None:
                raise PyroMoEError(f"must be absent or null with the next-token likelihood, got {value!r}")
        elif (
            not isinstance(value, list)
            or len(value) < 2
            or not all(_is_integer(token) and 0 <= token < size for token in value)
            or len(set(value)) != len(value)
        ):
            raise PyroMoEError(
                f"must be two or more distinct token ids in [0, {size}) (the model's vocabulary), got {value!r}"
            )
    elif key == "step_count":
        check_integer("step_count", value, minimum=0)
    elif key == "history":
        if not isinstance(value, list) or not all(
            isinstance(record, dict) and all(isinstance(v, int | float) for v in record.values()) for record in value
        ):
            raise PyroMoEError("must be a list of records of numbers (one per step)")
    elif key == "calibration":
        if not isinstance(value, dict):
            raise PyroMoEError(f"must map predictive modes to temperatures, got {value!r}")
        for mode, entry in value.items():
            if mode not in {m.value for m in PredictiveMode}:
                raise PyroMoEError(f"unknown predictive mode {mode!r}; accepted: {', '.join(PredictiveMode)}")
            if not isinstance(entry, dict):
                raise PyroMoEError(f"{mode}: must be an object with a temperature, got {entry!r}")
            temperature = entry.get("temperature")  # inf: the calibration logits carried no signal (uniform)
            if not _is_number(temperature) or not temperature > 0:
                raise PyroMoEError(f"{mode} temperature must be a positive number or Infinity, got {temperature!r}")
            for number in ("calibration_nll", "unscaled_nll"):
                if not _is_number(entry.get(number)) or not math.isfinite(entry[number]):
                    raise PyroMoEError(f"{mode} {number} must be a finite number, got {entry.get(number)!r}")
    elif key in ("post_hoc_fitted", "laplace_fitted"):
        if not isinstance(value, bool):
            raise PyroMoEError(f"must be true or false, got {value!r}")
    elif key in ("post_hoc_state", "kronecker_laplace", "recipe") and not isinstance(value, dict):
        raise PyroMoEError(f"must be an object, got {value!r}")


def check_saved_config(config: Mapping[str, Any], model: nn.Module, source: Path) -> None:
    """Refuse ``config`` (read from ``source``) unless every entry loading uses is usable with ``model``.

    Raises:
        CheckpointError: naming ``source``, the entry and what is accepted; an entry missing from
            :data:`_REQUIRED`; before anything is patched.
    """
    for key in _REQUIRED:
        if key not in config:
            raise CheckpointError(f"checkpoint file {source} lacks the entry {key!r}.")
    for key in config:
        try:
            _check_entry(config, model, key)
        except PyroMoEError as error:
            reason = str(error).removesuffix(".")
            raise CheckpointError(f"checkpoint file {source}: entry {key!r}: {reason}.") from None
    if config.get("likelihood", LikelihoodKind.MCQA.value) == LikelihoodKind.MCQA.value and "answer_token_ids" not in (
        config
    ):
        raise CheckpointError(f"checkpoint file {source} lacks the entry 'answer_token_ids' (an MCQA posterior).")
