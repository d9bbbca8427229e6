"""The memory order of a strided array's axes, so reshapes can stay views.

A tensor that is a transposed view of a C-contiguous buffer (a NumPy
``.transpose``, a Fortran-ordered array, the result of a product computed
in another orientation) is reshaped without a copy only along its memory
order. Libraries without strides (``array_api_strict``, JAX, Dask) report
the C order, which is what their reshapes assume anyway.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import array_api_compat

__all__ = ["inverse", "memory_order"]


def _element_strides(x: Any) -> tuple[int, ...] | None:
    """Strides in elements for NumPy, CuPy and PyTorch arrays, else ``None``."""
    if array_api_compat.is_torch_array(x):
        try:
            return tuple(x.stride())
        except RuntimeError:  # sparse and other non-strided layouts
            return None
    if array_api_compat.is_numpy_array(x) or array_api_compat.is_cupy_array(x):
        return tuple(s // x.itemsize for s in x.strides)
    return None


def memory_order(x: Any) -> tuple[int, ...]:
    """The axes of ``x`` from the outermost in memory to the innermost.

    ``permute_dims(x, memory_order(x))`` is C-contiguous whenever ``x`` is
    any axis permutation of a C-contiguous array; for every other array
    (C-contiguous, sliced with steps, broadcast, or without strides) the
    result is ``(0, 1, ..., ndim - 1)``.

    Examples
    --------
    >>> import numpy as np
    >>> from tuckerlib._layout import memory_order
    >>> memory_order(np.zeros((2, 3, 4)).transpose(2, 0, 1))
    (1, 2, 0)
    >>> memory_order(np.asfortranarray(np.zeros((2, 3, 4))))
    (2, 1, 0)
    >>> memory_order(np.zeros((2, 3, 4))[:, ::2])
    (0, 1, 2)
    """
    identity = tuple(range(x.ndim))
    strides = _element_strides(x)
    if strides is None or _contiguous_along(x.shape, strides, identity):
        return identity
    order = tuple(sorted(identity, key=lambda k: (-strides[k], k)))
    return order if _contiguous_along(x.shape, strides, order) else identity


def _contiguous_along(shape: Sequence[int], strides: Sequence[int], order: Sequence[int]) -> bool:
    """Whether the axes in ``order`` are C-contiguous (size-1 axes may have any stride)."""
    expected = 1
    for k in reversed(order):
        if shape[k] != 1 and strides[k] != expected:
            return False
        expected *= shape[k]
    return True


def inverse(order: Sequence[int]) -> tuple[int, ...]:
    """The permutation that undoes ``order``."""
    return tuple(sorted(range(len(order)), key=lambda k: order[k]))
