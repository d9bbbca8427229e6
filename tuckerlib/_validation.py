"""Argument checks shared by the public functions.

Each check raises a ``ValueError`` or ``TypeError`` that names the argument
and what was expected, so callers validate once at the boundary.
"""

from __future__ import annotations

import operator
from types import ModuleType
from typing import Any

__all__ = ["as_int", "check_finite", "check_int", "check_mode", "check_ndim"]


def as_int(value: Any, name: str, expected: str = "an integer") -> int:
    """Return ``value`` as an ``int``; a TypeError says ``name`` must be ``expected``."""
    if isinstance(value, bool):
        raise TypeError(f"{name} must be {expected}, got bool")
    try:
        return operator.index(value)
    except TypeError:
        raise TypeError(f"{name} must be {expected}, got {type(value).__name__}") from None


def check_int(value: Any, name: str, minimum: int, expected: str | None = None) -> int:
    """:func:`as_int`, then a ValueError unless ``value >= minimum``."""
    value = as_int(value, name, f"an integer >= {minimum}" if expected is None else expected)
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


def check_mode(mode: Any, ndim: int, name: str = "mode") -> int:
    """Return ``mode`` as a non-negative index into ``ndim`` axes.

    Negative modes count from the end, as NumPy axes do.
    """
    mode = as_int(mode, name)
    if not -ndim <= mode < ndim:
        raise ValueError(
            f"{name}={mode} is out of range for a tensor with {ndim} modes "
            f"(expected {-ndim} <= {name} < {ndim})"
        )
    return mode % ndim


def check_ndim(x: Any, allowed: tuple[int, ...] | int, name: str) -> None:
    """Raise if ``x.ndim`` is not allowed (an int is a minimum number of dims)."""
    if isinstance(allowed, int):
        if x.ndim < allowed:
            raise ValueError(f"{name} must have at least {allowed} dimension(s), got {x.ndim}")
    elif x.ndim not in allowed:
        expected = " or ".join(f"{d}-D" for d in allowed)
        raise ValueError(f"{name} must be {expected}, got a {x.ndim}-D array of shape {x.shape}")


def check_finite(x: Any, name: str, xp: ModuleType) -> None:
    """Raise ``ValueError`` if ``x`` holds NaN or infinity."""
    if xp.isdtype(x.dtype, ("real floating", "complex floating")) and not bool(
        xp.all(xp.isfinite(x))
    ):
        raise ValueError(f"{name} contains NaN or infinity")
