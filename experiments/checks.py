"""The checks every evaluation experiment makes before any work: the splits it reads, the posteriors
it is given (a ``predict`` method, a name free of the baselines' names), the predictive modes and
the question counts; and the baselines' names and the predictive modes the tables use.

Example::

    check_splits(splits, ["train", "test"])        # ConfigurationError naming a missing or empty split
    posteriors = check_posteriors({"mfvr": fitted})  # a dict; each has predict, no baseline's name
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Protocol

from torch import Tensor

from pyro_moe.core.routing_context import PredictiveMode
from pyro_moe.data import MCQAExample
from pyro_moe.errors import ConfigurationError
from pyro_moe.inference.predictive import RoutedPrediction
from pyro_moe.validation import check_integer

__all__ = [
    "DETERMINISTIC",
    "MODES",
    "TEMPERATURE_SCALING",
    "Posterior",
    "check_count",
    "check_modes",
    "check_posteriors",
    "check_splits",
    "posterior_modes",
]

DETERMINISTIC = "deterministic"
"""Name of the deterministic model (every router at its prior mean) in tables and plots."""

TEMPERATURE_SCALING = "temperature scaling"
"""Name of the temperature-scaled deterministic model in tables and plots."""

MODES = (PredictiveMode.MODEL_AVERAGE.value, PredictiveMode.ROUTING_AVERAGE.value)
"""The predictive modes, ``model-average`` (Bayesian model averaging) and ``routing-average`` (the thesis' rule)."""


class Posterior(Protocol):
    """A fitted posterior the experiments can predict with (e.g. :class:`pyro_moe.FittedPosterior`)."""

    def predict(self, input_ids: Tensor, attention_mask: Tensor | None = None, **options: Any) -> RoutedPrediction:
        """:func:`pyro_moe.predict` options: ``num_samples``, ``mode``, ``return_samples``, ``return_router_logits``."""


# ---------------------------------------------------------------------------------------------- checks


def check_splits(splits: Mapping[str, Sequence[MCQAExample]], required: Sequence[str]) -> None:
    """Every split in ``required`` is present in ``splits`` and non-empty; the error names the
    missing split and the splits there are."""
    if not isinstance(splits, Mapping):
        raise ConfigurationError(f"splits must be a mapping from split names to examples, got {type(splits).__name__}.")
    for name in required:
        if name not in splits:
            raise ConfigurationError(f"unknown split {name!r}; the splits given are {sorted(splits)}.")
        if len(splits[name]) == 0:
            raise ConfigurationError(f"split {name!r} is empty: give it at least one question.")


def check_posteriors(posteriors: Mapping[str, Posterior]) -> dict[str, Posterior]:
    """The posteriors as a dict, each with a ``predict`` method and a name free of the baselines' names."""
    if not isinstance(posteriors, Mapping):
        raise ConfigurationError(f"posteriors must be a mapping from names to fitted posteriors, got {posteriors!r}.")
    for name, posterior in posteriors.items():
        if name in (DETERMINISTIC, TEMPERATURE_SCALING):
            raise ConfigurationError(f"the name {name!r} is taken by the baseline of that name; rename the posterior.")
        if not callable(getattr(posterior, "predict", None)):
            raise ConfigurationError(
                f"posterior {name!r} has no predict method; pass fitted posteriors (pyro_moe.fit) or guide names."
            )
    return dict(posteriors)


def check_modes(modes: Sequence[str]) -> tuple[str, ...]:
    """``modes`` (one or several) as a tuple, each one of :data:`MODES`."""
    modes = (modes,) if isinstance(modes, str) else tuple(modes)
    unknown = [mode for mode in modes if mode not in MODES]
    if not modes or unknown:
        raise ConfigurationError(f"unknown predictive modes {unknown or modes!r}; accepted: {list(MODES)}.")
    return modes


def check_count(name: str, value: object) -> int | None:
    """``value`` if it is ``None`` (all) or a positive integer: how many questions of a split to use."""
    return None if value is None else check_integer(name, value)


def posterior_modes(posterior: Posterior, modes: Sequence[str]) -> tuple[str, ...]:
    """The ``modes`` ``posterior`` predicts in: those of its patch (``predictive_modes``; expert-weight
    posteriors run their own experts per joint sample, so they have ``model-average`` only)."""
    patch = getattr(posterior, "patch", None)
    if patch is None:
        return tuple(modes)
    return tuple(mode for mode in modes if mode in patch.predictive_modes)
