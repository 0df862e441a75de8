"""Errors pyro-moe raises for bad input; each message names the problem and what is accepted."""

from __future__ import annotations

__all__ = [
    "ConfigurationError",
    "CurvatureError",
    "DataError",
    "DistributedError",
    "LayerSelectionError",
    "NoMoELayersError",
    "NonFiniteError",
    "PyroMoEError",
    "UnsupportedFamilyError",
]


class PyroMoEError(ValueError):
    """Base class of pyro-moe's input errors."""


class NoMoELayersError(PyroMoEError):
    """The model has no Mixture-of-Experts layer."""


class UnsupportedFamilyError(PyroMoEError):
    """The model's MoE router family is not registered."""


class LayerSelectionError(PyroMoEError):
    """A requested layer index does not exist or holds no MoE block."""


class ConfigurationError(PyroMoEError):
    """An unknown site kind, selection or mode, or an invalid prior or option value."""


class CurvatureError(PyroMoEError):
    """A curvature target that received tokens gets no output gradient, or an identically zero one: the
    likelihood does not depend on it the way the target says, and its curvature would silently be zero."""


class DataError(PyroMoEError):
    """A data file or data set cannot be read, or fits none of the recognised schemas."""


class NonFiniteError(PyroMoEError):
    """A loss, gradient or network output became NaN or infinite; training stopped at the last finite state."""


class DistributedError(RuntimeError):
    """A collective of a data-parallel run failed: another process died, failed or did not answer in time."""
