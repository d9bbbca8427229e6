"""Argument checks shared by the public functions.

Each check raises a ``ValueError`` or ``TypeError`` that names the argument
and what was expected, so callers validate once at the boundary.
"""

from __future__ import annotations

import operator
from collections.abc import Iterable, Mapping, Set
from types import ModuleType
from typing import Any

import array_api_compat
import numpy as np

from tuckerlib._host import host_bool
from tuckerlib._namespace import as_array

__all__ = [
    "as_floating",
    "as_int",
    "as_list",
    "as_numeric_array",
    "as_shape",
    "check_bool",
    "check_finite",
    "check_int",
    "check_mode",
    "check_ndim",
]


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


def check_bool(value: Any, name: str) -> bool:
    """Return ``value`` as a ``bool``; anything but ``True``/``False`` is a TypeError.

    A truthy string such as ``"no"`` must not silently mean ``True``.
    """
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    raise TypeError(f"{name} must be True or False, got {type(value).__name__}")


def as_list(value: Any, name: str, expected: str) -> list[Any]:
    """Materialize an iterable argument once, so a generator is consumed in one place.

    Strings, bytes, mappings, sets (unordered, and they drop repeats) and
    non-iterables are a TypeError saying ``name`` must be ``expected``.
    """
    if isinstance(value, (str, bytes, Mapping, Set)) or not isinstance(value, Iterable):
        raise TypeError(f"{name} must be {expected}, got {type(value).__name__}")
    try:
        return list(value)
    except TypeError:  # 0-D arrays and arrays of libraries that forbid iteration
        raise TypeError(f"{name} must be {expected}, got {type(value).__name__}") from None


def as_shape(shape: Any, name: str = "shape") -> tuple[int, ...]:
    """Return ``shape`` as a tuple of non-negative ``int`` sizes.

    Entries must be integers (NumPy integer scalars included); a float such
    as ``4.9`` or a string such as ``"456"`` is refused rather than truncated
    or split into digits.
    """
    entries = as_list(shape, name, "a sequence of non-negative integer sizes")
    expected = "a non-negative integer size"
    sizes = tuple(as_int(size, f"{name}[{k}]", expected) for k, size in enumerate(entries))
    for k, size in enumerate(sizes):
        if size < 0:
            raise ValueError(f"{name}[{k}] must be >= 0, got {size} ({name} {sizes})")
    return sizes


def as_numeric_array(x: Any, xp: ModuleType, name: str, *, allow_bool: bool = False) -> Any:
    """Return ``x`` as an array of ``xp`` with a numeric (or, if allowed, boolean) dtype.

    Arrays pass through; nested sequences of numbers are converted. Anything
    else (``None``, a string, a generator) is a TypeError naming ``name``.
    Boolean arrays are refused where arithmetic happens: the array API
    standard defines matrix products only for numeric dtypes.
    """
    is_array = array_api_compat.is_array_api_obj(x)
    try:
        array = as_array(x, xp)
    except (TypeError, ValueError) as exc:
        raise TypeError(f"{name} cannot be converted to an array ({exc})") from None
    if xp.isdtype(array.dtype, "numeric"):
        return array
    if xp.isdtype(array.dtype, "bool"):
        if allow_bool:
            return array
        raise TypeError(
            f"{name} is a boolean array; boolean arrays are not supported here "
            "(convert it with astype to an integer or floating dtype)"
        )
    got = f"an array of dtype {array.dtype}" if is_array else type(x).__name__
    raise TypeError(f"{name} must be a numeric array (or nested sequence of numbers), got {got}")


def as_floating(x: Any, xp: ModuleType) -> Any:
    """``x`` unchanged if floating, else converted to the default real floating dtype."""
    if xp.isdtype(x.dtype, ("real floating", "complex floating")):
        return x
    info = xp.__array_namespace_info__()
    dtype = info.default_dtypes(device=array_api_compat.device(x))["real floating"]
    return xp.astype(x, dtype)


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
    """Raise ``ValueError`` if ``x`` holds NaN or infinity (``TypeError`` under ``jax.jit``)."""
    if xp.isdtype(x.dtype, ("real floating", "complex floating")) and not host_bool(
        xp.all(xp.isfinite(x)), f"checking {name} for NaN or infinity"
    ):
        raise ValueError(f"{name} contains NaN or infinity")
