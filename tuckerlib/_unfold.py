"""Mode-n unfolding and folding, in the ordering of Kolda & Bader (2009)."""

from __future__ import annotations

import math
from typing import Any

from tuckerlib._namespace import get_namespace
from tuckerlib._validation import as_numeric_array, as_shape, check_mode, check_ndim

__all__ = ["fold", "unfold"]


def _unfolding_order(mode: int, ndim: int) -> tuple[int, ...]:
    # Earlier modes must vary fastest along the columns; in a C-ordered
    # reshape the last axis varies fastest, so the other modes go in reverse.
    return (mode, *reversed([k for k in range(ndim) if k != mode]))


def unfold(x: Any, mode: int) -> Any:
    r"""Mode-``n`` unfolding (matricization) of a tensor.

    Parameters
    ----------
    x : array of shape (I_0, ..., I_{N-1})
        Tensor of any array API library, ``N >= 1``.
    mode : int
        The mode ``n`` whose fibres become the columns. Negative values count
        from the end.

    Returns
    -------
    array of shape (I_n, prod_{k != n} I_k)
        Element :math:`(i_0, \dots, i_{N-1})` sits in row ``i_n`` and column
        :math:`\sum_{k \ne n} i_k J_k` with :math:`J_k = \prod_{m < k, m \ne n} I_m`:
        earlier modes vary fastest.

    Raises
    ------
    ValueError
        If ``mode`` is out of range or ``x`` is 0-D.
    TypeError
        If ``mode`` is not an integer or ``x`` is not a numeric or boolean
        array (or nested sequence of numbers).

    See Also
    --------
    fold : The inverse operation.

    Notes
    -----
    This is the ordering of Kolda & Bader [1]_ (§2.4), also used by the
    Tensor Toolbox for MATLAB. It differs from a plain C-ordered reshape of
    ``moveaxis(x, n, 0)``, where *later* modes vary fastest.

    References
    ----------
    .. [1] T. G. Kolda and B. W. Bader, "Tensor Decompositions and
       Applications", SIAM Review 51(3), 455-500, 2009.

    Examples
    --------
    The tensor of Kolda & Bader's example 2.1, with frontal slices
    ``[[1, 4, 7, 10], [2, 5, 8, 11], [3, 6, 9, 12]]`` and
    ``[[13, 16, 19, 22], ...]``:

    >>> import numpy as np
    >>> from tuckerlib import unfold
    >>> x = np.arange(1, 25).reshape(2, 4, 3).transpose(2, 1, 0)
    >>> unfold(x, 0)
    array([[ 1,  4,  7, 10, 13, 16, 19, 22],
           [ 2,  5,  8, 11, 14, 17, 20, 23],
           [ 3,  6,  9, 12, 15, 18, 21, 24]])
    >>> unfold(x, 1)
    array([[ 1,  2,  3, 13, 14, 15],
           [ 4,  5,  6, 16, 17, 18],
           [ 7,  8,  9, 19, 20, 21],
           [10, 11, 12, 22, 23, 24]])
    >>> unfold(x, 2)
    array([[ 1,  2,  3,  4,  5,  6,  7,  8,  9, 10, 11, 12],
           [13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23, 24]])
    """
    xp = get_namespace(x)
    x = as_numeric_array(x, xp, "x", allow_bool=True)
    check_ndim(x, 1, "x")
    mode = check_mode(mode, x.ndim)
    rows = x.shape[mode]
    cols = math.prod(s for k, s in enumerate(x.shape) if k != mode)
    return xp.reshape(xp.permute_dims(x, _unfolding_order(mode, x.ndim)), (rows, cols))


def fold(matrix: Any, mode: int, shape: tuple[int, ...]) -> Any:
    r"""Refold a mode-``n`` unfolding into a tensor of ``shape``.

    Parameters
    ----------
    matrix : array of shape (I_n, prod_{k != n} I_k)
        A mode-``n`` unfolding, as produced by :func:`unfold`.
    mode : int
        The mode ``n`` the rows belong to. Negative values count from the end.
    shape : sequence of int
        The full tensor shape :math:`(I_0, \dots, I_{N-1})`: non-negative
        integers (NumPy integer scalars included).

    Returns
    -------
    array of shape ``shape``
        The tensor ``x`` with ``unfold(x, mode) == matrix``.

    Raises
    ------
    ValueError
        If ``matrix`` is not 2-D, ``mode`` is out of range, ``shape`` is
        empty or has a negative entry, or the matrix shape does not match
        ``shape``.
    TypeError
        If ``shape`` is not a sequence of integers (a float such as ``5.7``
        or a string such as ``"456"`` is refused, not truncated or split),
        ``mode`` is not an integer, or ``matrix`` is not a numeric or boolean
        array.

    See Also
    --------
    unfold : The inverse operation.

    Examples
    --------
    >>> import numpy as np
    >>> from tuckerlib import fold, unfold
    >>> x = np.arange(24.0).reshape(2, 3, 4)
    >>> bool(np.array_equal(fold(unfold(x, 1), 1, x.shape), x))
    True
    """
    xp = get_namespace(matrix)
    matrix = as_numeric_array(matrix, xp, "matrix", allow_bool=True)
    check_ndim(matrix, (2,), "matrix")
    shape = as_shape(shape)
    if not shape:
        raise ValueError("shape must have at least one mode, got ()")
    mode = check_mode(mode, len(shape))
    others = math.prod(s for k, s in enumerate(shape) if k != mode)
    if tuple(matrix.shape) != (shape[mode], others):
        raise ValueError(
            f"matrix of shape {tuple(matrix.shape)} cannot be folded into shape {shape} "
            f"along mode {mode}: expected shape ({shape[mode]}, {others})"
        )
    order = _unfolding_order(mode, len(shape))
    permuted_shape = tuple(shape[k] for k in order)
    inverse = tuple(order.index(k) for k in range(len(shape)))
    return xp.permute_dims(xp.reshape(matrix, permuted_shape), inverse)
