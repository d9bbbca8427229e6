"""Find the array namespace of the inputs, without importing any framework.

The namespace always comes from the arrays themselves
(:func:`array_api_compat.array_namespace`); there is no global backend.
Python sequences are treated as NumPy arrays, as NumPy and SciPy do.
"""

from __future__ import annotations

import math
from types import ModuleType
from typing import Any

import array_api_compat
from array_api_compat import is_array_api_obj

__all__ = ["as_array", "check_known_shape", "get_namespace", "is_numpy", "is_torch"]


def _library(x: Any) -> str:
    return type(x).__module__.split(".")[0]


def get_namespace(*arrays: Any) -> ModuleType:
    """Return the array API namespace shared by ``arrays``.

    Non-array arguments (``None``, Python scalars, lists) are ignored; when no
    argument is an array the NumPy namespace is returned.

    Raises
    ------
    TypeError
        If the arrays come from more than one array library.
    ValueError
        If a Dask array has chunks of unknown size (see :func:`check_known_shape`).
    """
    found = [a for a in arrays if is_array_api_obj(a)]
    for a in found:
        check_known_shape(a)
    if not found:
        return array_api_compat.array_namespace(array_api_compat.numpy.empty(0))
    try:
        return array_api_compat.array_namespace(*found)
    except TypeError as exc:
        libraries = sorted({_library(a) for a in found})
        raise TypeError(
            "inputs come from different array libraries "
            f"({', '.join(libraries)}); convert them to one library first"
        ) from exc


def check_known_shape(x: Any) -> None:
    """Raise a ``ValueError`` if ``x`` is a Dask array whose chunk sizes are unknown.

    Boolean indexing (``x[x > 0]``) and ``da.from_delayed`` with NaN sizes
    give Dask arrays whose shape holds NaN; no mode size, rank bound or
    unfolding can be computed from it. This is where every array enters
    the library, so the one message that says what to do is raised here.
    """
    shape = getattr(x, "shape", ())
    if array_api_compat.is_dask_array(x) and any(
        not isinstance(size, int) and math.isnan(size) for size in shape
    ):
        raise ValueError(
            f"a Dask array of shape {tuple(shape)} has chunks of unknown size (NaN), so its "
            "mode sizes are unknown; call its compute_chunk_sizes() method first "
            "(x = x.compute_chunk_sizes())"
        )


def as_array(x: Any, xp: ModuleType) -> Any:
    """Return ``x`` as an array of namespace ``xp`` (no copy if it already is one)."""
    return x if is_array_api_obj(x) else xp.asarray(x)


def is_numpy(xp: ModuleType) -> bool:
    """Whether ``xp`` is the (wrapped) NumPy namespace."""
    return array_api_compat.is_numpy_namespace(xp)


def is_torch(xp: ModuleType) -> bool:
    """Whether ``xp`` is the (wrapped) PyTorch namespace."""
    return array_api_compat.is_torch_namespace(xp)
