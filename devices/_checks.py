"""Argument checks shared by the devices modules; each raises ValueError naming the argument."""

from __future__ import annotations

import math
import numbers


def is_real(value: object) -> bool:
    """A real number (Python or NumPy), but not a bool, which is almost surely a mistake."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def is_int(value: object) -> bool:
    """An integer (Python or NumPy), but not a bool."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def check_real(name: str, value: object, *, minimum: float, inclusive: bool = True) -> float:
    """``value`` as a float if finite and ``>= minimum`` (``> minimum`` if not inclusive)."""
    relation = ">=" if inclusive else ">"
    if not is_real(value) or not math.isfinite(value):  # type: ignore[arg-type]
        raise ValueError(f"{name}: must be a finite number {relation} {minimum}, got {value!r}")
    number = float(value)  # type: ignore[arg-type]
    if number < minimum or (not inclusive and number == minimum):
        raise ValueError(f"{name}: must be a finite number {relation} {minimum}, got {value!r}")
    return number


def check_int(name: str, value: object, *, minimum: int) -> int:
    """``value`` as an int if it is an integer ``>= minimum``."""
    if not is_int(value) or value < minimum:  # type: ignore[operator]
        raise ValueError(f"{name}: must be an integer >= {minimum}, got {value!r}")
    return int(value)  # type: ignore[call-overload]
