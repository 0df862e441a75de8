"""The usage examples in the Laplace modules' docstrings run as written (doctests on tiny objects)."""

from __future__ import annotations

import doctest
from types import ModuleType

import pytest

from pyro_moe.guides.laplace import kronecker_curvature, kronecker_posterior


@pytest.mark.parametrize("module", [kronecker_curvature, kronecker_posterior], ids=lambda module: module.__name__)
def test_docstring_examples_run(module: ModuleType) -> None:
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS, raise_on_error=False, verbose=False)
    assert result.attempted > 0, f"{module.__name__} has no doctest"
    assert result.failed == 0, f"{result.failed} of {result.attempted} doctest examples of {module.__name__} failed"
