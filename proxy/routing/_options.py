"""Validation of policy options as they arrive from YAML: a wrong type fails naming the option."""

from __future__ import annotations

import math
from typing import Any


def number_option(name: str, value: Any, *, minimum: float, inclusive: bool = True) -> float:
    """A finite real number >= ``minimum`` (or > when not ``inclusive``); bools are refused."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ValueError(f"option {name} must be a finite number, got {value!r}")
    if value < minimum or (not inclusive and value == minimum):
        relation = ">=" if inclusive else ">"
        raise ValueError(f"option {name} must be {relation} {minimum}, got {value!r}")
    return float(value)


def int_option(name: str, value: Any, *, minimum: int) -> int:
    """An integer >= ``minimum``; bools and floats are refused."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"option {name} must be an integer, got {value!r}")
    if value < minimum:
        raise ValueError(f"option {name} must be >= {minimum}, got {value!r}")
    return value


def fraction_option(name: str, value: Any) -> float:
    """A number in (0, 1]."""
    number = number_option(name, value, minimum=0.0, inclusive=False)
    if number > 1.0:
        raise ValueError(f"option {name} must be in (0, 1], got {value!r}")
    return number
