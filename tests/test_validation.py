"""The numeric option checks: what they accept, what they refuse and what the message says."""

from __future__ import annotations

import math

import pytest

from pyro_moe.errors import ConfigurationError
from pyro_moe.validation import check_integer, check_number


@pytest.mark.parametrize(("value", "minimum"), [(1, 1), (7, 1), (0, 0), (-2, -3)])
def test_integers_accepted(value, minimum):
    assert check_integer("n", value, minimum=minimum) == value


@pytest.mark.parametrize(
    ("value", "minimum", "maximum", "message"),
    [
        (0, 1, None, "n must be a positive integer, got 0"),
        (True, 1, None, "n must be a positive integer, got True"),
        (1.0, 1, None, "n must be a positive integer, got 1.0"),
        ("3", 0, None, "n must be a non-negative integer, got '3'"),
        (-1, 0, None, "n must be a non-negative integer, got -1"),
        (5, 2, 4, r"n must be an integer in \[2, 4\], got 5"),
    ],
)
def test_integers_refused(value, minimum, maximum, message):
    with pytest.raises(ConfigurationError, match=message):
        check_integer("n", value, minimum=minimum, maximum=maximum)


@pytest.mark.parametrize(
    ("value", "options"), [(0.5, {}), (3, {}), (0.0, {"inclusive": True}), (0.99, {"below": 1.0, "inclusive": True})]
)
def test_numbers_accepted(value, options):
    assert check_number("x", value, **options) == float(value)


@pytest.mark.parametrize(
    ("value", "options", "message"),
    [
        (0, {}, "x must be a positive number, got 0"),
        (False, {}, "x must be a positive number, got False"),
        (math.nan, {}, "x must be a positive number, got nan"),
        (math.inf, {}, "x must be a positive number, got inf"),
        ("1", {}, "x must be a positive number, got '1'"),
        (1.0, {"inclusive": True, "below": 1.0}, r"x must be a number in \[0, 1\), got 1.0"),
        (-0.1, {"inclusive": True}, "x must be a finite number >= 0, got -0.1"),
    ],
)
def test_numbers_refused(value, options, message):
    with pytest.raises(ConfigurationError, match=message):
        check_number("x", value, **options)
