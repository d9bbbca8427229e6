"""Find the array namespace of the inputs, without importing any framework.

The namespace always comes from the arrays themselves
(:func:`array_api_compat.array_namespace`); there is no global backend.
Python sequences are treated as NumPy arrays, as NumPy and SciPy do.
"""

from __future__ import annotations

from types import ModuleType
from typing import Any

import array_api_compat
from array_api_compat import is_array_api_obj

__all__ = ["as_array", "get_namespace", "is_numpy", "is_torch"]


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
    """
    found = [a for a in arrays if is_array_api_obj(a)]
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


def as_array(x: Any, xp: ModuleType) -> Any:
    """Return ``x`` as an array of namespace ``xp`` (no copy if it already is one)."""
    return x if is_array_api_obj(x) else xp.asarray(x)


def is_numpy(xp: ModuleType) -> bool:
    """Whether ``xp`` is the (wrapped) NumPy namespace."""
    return array_api_compat.is_numpy_namespace(xp)


def is_torch(xp: ModuleType) -> bool:
    """Whether ``xp`` is the (wrapped) PyTorch namespace."""
    return array_api_compat.is_torch_namespace(xp)
