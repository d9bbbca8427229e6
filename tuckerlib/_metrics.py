"""Error measures between a tensor and its approximation."""

from __future__ import annotations

import math
from types import ModuleType
from typing import Any

from tuckerlib._accumulate import vector_norm
from tuckerlib._host import host_float, require_values
from tuckerlib._namespace import get_namespace
from tuckerlib._tucker import TuckerTensor
from tuckerlib._validation import as_floating, as_numeric_array, check_finite

__all__ = ["frobenius_norm", "relative_error"]


def _magnitude(a: Any, xp: ModuleType) -> float:
    """Largest absolute entry of ``a`` (``0.0`` if empty, NaN if it holds NaN).

    For a real array from its largest and smallest entries: two reductions,
    and no temporary the size of ``a`` (``abs(a)`` would be one).
    """
    if not math.prod(a.shape):
        return 0.0
    if xp.isdtype(a.dtype, "complex floating"):
        return host_float(xp.max(xp.abs(a)))
    high, low = host_float(xp.max(a)), host_float(xp.min(a))
    if math.isnan(high) or math.isnan(low):
        return math.nan
    return max(high, -low)


def _needs_scaling(top: float, size: int, dtype: Any, xp: ModuleType) -> bool:
    """Whether squares of entries up to ``top`` could overflow or underflow in ``dtype``.

    The sum of ``size`` squares must stay below the largest number, and the
    square of the largest entry well above the smallest normal one (so
    entries down to ``sqrt(eps)`` times it keep their digits).
    """
    info = xp.finfo(dtype)
    exponent = math.frexp(top)[1]
    highest = math.frexp(float(info.max))[1]
    lowest = math.frexp(float(info.smallest_normal))[1] - math.frexp(float(info.eps))[1]
    return 2 * exponent + size.bit_length() >= highest or 2 * exponent <= lowest


def _widened(a: Any, xp: ModuleType) -> Any:
    """``a`` in a floating dtype of at least single precision.

    Half-precision sums of squares lose most of their digits and overflow
    at 65504; integers and booleans become the default floating dtype.
    """
    a = as_floating(a, xp)
    if xp.isdtype(a.dtype, "real floating") and xp.finfo(a.dtype).bits < 32:
        return xp.astype(a, xp.float32)
    return a


def _unit_scaled(a: Any, top: float) -> tuple[Any, int]:
    """``(a / 2**e, e)`` with ``2**(e-1) <= top < 2**e``: entries of magnitude below 1.

    A power of two scales exactly. It is applied as two factors because
    ``2**-e`` alone can be subnormal, which XLA (JAX) flushes to zero.
    """
    exponent = math.frexp(top)[1]
    half = exponent // 2
    return a * math.ldexp(1.0, -half) * math.ldexp(1.0, half - exponent), exponent


def frobenius_norm(a: Any, xp: ModuleType) -> float:
    """Frobenius norm of a floating array as a float, immune to under- and overflow.

    Where squares could overflow or underflow, scaling by the largest
    entry's power of two first keeps tiny values from squaring to zero (which
    would fake a zero reference) and huge ones from overflowing; elsewhere
    no copy of ``a`` is made.
    """
    top = _magnitude(a, xp)
    if top == 0.0 or not math.isfinite(top):
        return top
    if not _needs_scaling(top, math.prod(a.shape), a.dtype, xp):
        return host_float(vector_norm(xp, a))
    scaled, exponent = _unit_scaled(a, top)
    return math.ldexp(host_float(vector_norm(xp, scaled)), exponent)


def relative_error(x: Any, x_hat: Any) -> float:
    r"""Relative Frobenius error :math:`\|x - \hat{x}\|_F / \|x\|_F`.

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
        The relative error. When :math:`\|x\| = 0` it is ``0.0`` if :math:`\hat{x}` is zero
        too and ``inf`` otherwise. Integer and boolean inputs are compared
        as floating-point numbers, and half-precision ones in single
        precision.

    Raises
    ------
    ValueError
        If the shapes differ or either input holds NaN or infinity.
    TypeError
        If the inputs come from different array libraries or are not
        numeric arrays, or are traced by ``jax.jit`` (the result is a Python
        float, which a traced function cannot return: call it outside
        ``jax.jit``).

    Notes
    -----
    Where their squares could overflow or underflow, both inputs are scaled
    by the power of two of the largest magnitude among them before the
    difference and the norms are formed, so entries near the top of the
    dtype's range (``6e4`` in float16, ``1e308`` in float64) neither overflow
    nor, when tiny, underflow to a zero reference.

    Examples
    --------
    >>> import numpy as np
    >>> from tuckerlib import relative_error
    >>> relative_error(np.array([3.0, 4.0]), np.array([3.0, 3.0]))
    0.2
    >>> relative_error(np.array([6e4, -6e4], np.float16), np.array([-6e4, 6e4], np.float16))
    2.0
    """
    if isinstance(x_hat, TuckerTensor):
        x_hat = x_hat.to_tensor()
    xp = get_namespace(x, x_hat)
    for a in (x, x_hat):
        require_values(a, "relative_error (a Python float)")
    x = as_numeric_array(x, xp, "x", allow_bool=True)
    x_hat = as_numeric_array(x_hat, xp, "x_hat", allow_bool=True)
    if tuple(x.shape) != tuple(x_hat.shape):
        raise ValueError(
            f"x_hat must have the shape of x {tuple(x.shape)}, got {tuple(x_hat.shape)}"
        )
    check_finite(x, "x", xp)
    check_finite(x_hat, "x_hat", xp)
    x, x_hat = _widened(x, xp), _widened(x_hat, xp)
    scale = max(_magnitude(x, xp), _magnitude(x_hat, xp))
    if scale == 0.0:
        return 0.0
    if _needs_scaling(scale, math.prod(x.shape), x.dtype, xp):
        # In units of the common scale, so the ratio stays finite where it is.
        x, _ = _unit_scaled(x, scale)
        x_hat, _ = _unit_scaled(x_hat, scale)
    reference = frobenius_norm(x, xp)
    difference = frobenius_norm(x - x_hat, xp)
    if reference == 0.0:
        return 0.0 if difference == 0.0 else math.inf
    return difference / reference
