"""Error measures between a tensor and its approximation."""

from __future__ import annotations

import math
from types import ModuleType
from typing import Any

from tuckerlib._namespace import as_array, get_namespace
from tuckerlib._tucker import TuckerTensor
from tuckerlib._validation import check_finite

__all__ = ["relative_error"]


def _norm(a: Any, xp: ModuleType) -> float:
    """Frobenius norm of ``a`` as a float, immune to under- and overflow.

    Dividing by the largest entry first keeps tiny values from squaring to
    zero (which would fake a zero reference) and huge ones from overflowing.
    """
    if math.prod(a.shape) == 0:
        return 0.0
    scale = float(xp.max(xp.abs(a)))
    if scale == 0.0:
        return 0.0
    return scale * float(xp.linalg.vector_norm(a / scale))


def relative_error(x: Any, x_hat: Any) -> float:
    """Relative Frobenius error ``‖x − x̂‖_F / ‖x‖_F``.

    Parameters
    ----------
    x : array
        The reference tensor.
    x_hat : array or TuckerTensor
        Its approximation, of the same shape (a :class:`TuckerTensor` is
        materialized first).

    Returns
    -------
    float
        The relative error. When ``‖x‖ = 0`` it is ``0.0`` if ``x̂`` is zero
        too and ``inf`` otherwise.

    Raises
    ------
    ValueError
        If the shapes differ or either input holds NaN or infinity.
    TypeError
        If the inputs come from different array libraries.

    Examples
    --------
    >>> import numpy as np
    >>> from tuckerlib import relative_error
    >>> relative_error(np.array([3.0, 4.0]), np.array([3.0, 3.0]))
    0.2
    """
    if isinstance(x_hat, TuckerTensor):
        x_hat = x_hat.to_tensor()
    xp = get_namespace(x, x_hat)
    x, x_hat = as_array(x, xp), as_array(x_hat, xp)
    if tuple(x.shape) != tuple(x_hat.shape):
        raise ValueError(
            f"x_hat must have the shape of x {tuple(x.shape)}, got {tuple(x_hat.shape)}"
        )
    check_finite(x, "x", xp)
    check_finite(x_hat, "x_hat", xp)
    if not xp.isdtype(x.dtype, ("real floating", "complex floating")):
        x = xp.astype(x, xp.result_type(x_hat.dtype, xp.float32))
    reference = _norm(x, xp)
    difference = _norm(x - x_hat, xp)
    if reference == 0.0:
        return 0.0 if difference == 0.0 else math.inf
    return difference / reference
