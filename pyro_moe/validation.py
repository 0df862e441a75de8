"""The checks of numeric options every public entry point makes before any work starts.

Each returns the value it checked and raises :class:`~pyro_moe.errors.ConfigurationError` naming
the option, what it got and what is accepted. Booleans are refused where numbers are expected
(``True`` is an ``int`` to Python, never a step count to a user).

Example::

    steps = check_integer("steps", steps, minimum=0)           # 0, 1, 2, ...
    lr = check_number("lr", lr)                                 # a finite number > 0
    alpha = check_number("alpha", alpha, minimum=0.0, below=1.0, inclusive=True)
"""

from __future__ import annotations

import math

from pyro_moe.errors import ConfigurationError

__all__ = ["check_integer", "check_number"]


def check_integer(name: str, value: object, *, minimum: int = 1, maximum: int | None = None) -> int:
    """``value`` if it is an integer (not a bool) in ``[minimum, maximum]``; the default accepts 1, 2, ..."""
    if (
        isinstance(value, bool)
        or not isinstance(value, int)
        or value < minimum
        or (maximum is not None and value > maximum)
    ):
        accepted = (
            f"an integer in [{minimum}, {maximum}]"
            if maximum is not None
            else "a positive integer"
            if minimum == 1
            else "a non-negative integer"
            if minimum == 0
            else f"an integer >= {minimum}"
        )
        raise ConfigurationError(f"{name} must be {accepted}, got {value!r}.")
    return value


def check_number(
    name: str, value: object, *, minimum: float = 0.0, inclusive: bool = False, below: float | None = None
) -> float:
    """``value`` as a float if it is a finite number (not a bool) above ``minimum`` (or equal to it with
    ``inclusive``) and below ``below``; the default accepts every finite number > 0."""
    ok = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
    ok = ok and (value >= minimum if inclusive else value > minimum) and (below is None or value < below)
    if not ok:
        lower = f"{'>=' if inclusive else '>'} {minimum:g}"
        accepted = (
            "a positive number"
            if minimum == 0 and not inclusive and below is None
            else f"a number in {'[' if inclusive else '('}{minimum:g}, {below:g})"
            if below is not None
            else f"a finite number {lower}"
        )
        raise ConfigurationError(f"{name} must be {accepted}, got {value!r}.")
    return float(value)
