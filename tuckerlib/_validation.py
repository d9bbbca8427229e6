"""Argument checks shared by the public functions.

Each check raises a ``ValueError`` or ``TypeError`` that names the argument
and what was expected, so callers validate once at the boundary.
"""

from __future__ import annotations

import operator
from types import ModuleType
from typing import Any

__all__ = ["check_finite", "check_mode", "check_ndim"]


def check_mode(mode: Any, ndim: int, name: str = "mode") -> int:
    """Return ``mode`` as a non-negative index into ``ndim`` axes.

    Negative modes count from the end, as NumPy axes do.
    """
    if isinstance(mode, bool):
        raise TypeError(f"{name} must be an integer, got bool")
    try:
        mode = operator.index(mode)
    except TypeError:
        raise TypeError(f"{name} must be an integer, got {type(mode).__name__}") from None
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
