"""Singular values of the unfoldings of an in-memory tensor, on the Gram route.

The same Gram matrices the factor steps use, asked only for eigenvalues
(and, where they come for free, eigenvectors), with the memory care a
spectrum of a large weight needs.
"""

from __future__ import annotations

import math
from types import ModuleType
from typing import Any

import array_api_compat
import numpy as np

from tuckerlib._accumulate import gram as gram_of
from tuckerlib._layout import memory_order
from tuckerlib._namespace import is_numpy
from tuckerlib.decompositions._factors import descending_sqrt, fibre_matrix

__all__ = ["gram_eigvalsh", "matrix_spectrum", "pad", "tensor_spectrum", "unfolding_spectrum"]

# A middle-mode unfolding of a NumPy tensor is not a view; its Gram matrix
# is accumulated from copies of at most this many bytes of it instead of
# one copy of the whole tensor.
GRAM_BLOCK_BYTES = 2**24


def pad(xp: ModuleType, s: Any, size: int) -> Any:
    """``s`` cut or zero-padded to length ``size``."""
    if s.shape[0] >= size:
        return s[:size]
    zeros = xp.zeros(size - s.shape[0], dtype=s.dtype, device=array_api_compat.device(s))
    return xp.concat([s, zeros])


def gram_eigvalsh(xp: ModuleType, gram: Any) -> Any:
    """Ascending eigenvalues of a symmetric Gram matrix that the caller gives up.

    For NumPy the matrix is overwritten by LAPACK's divide-and-conquer
    solver (``syevd``) through SciPy: ``numpy.linalg.eigvalsh`` copies its
    input and needs about four times its size in all, which for the Gram
    matrix of a square weight is four times the weight.
    """
    if not is_numpy(xp):
        return xp.linalg.eigvalsh(gram)
    import scipy.linalg

    # The transpose of a symmetric C-ordered matrix is the same matrix in
    # the Fortran order LAPACK works on in place.
    fortran = gram if gram.flags.f_contiguous else gram.T
    return scipy.linalg.eigh(
        fortran, eigvals_only=True, overwrite_a=True, check_finite=False, driver="evd"
    )


def _blocked_fibre_gram(x: np.ndarray, mode: int) -> np.ndarray:
    r"""``A Aᵀ`` for the mode-``mode`` fibre matrix ``A`` of a NumPy tensor, copying blocks."""
    rows = x.shape[mode]
    after = math.prod(x.shape[mode + 1 :])
    stacked = np.reshape(x, (-1, rows, after))
    step = max(1, GRAM_BLOCK_BYTES // max(1, rows * after * x.itemsize))
    gram = np.zeros((rows, rows), dtype=x.dtype)
    for start in range(0, stacked.shape[0], step):
        block = np.ascontiguousarray(np.moveaxis(stacked[start : start + step], 1, 0))
        block = block.reshape(rows, -1)
        gram += gram_of(np, block)
    return gram


def matrix_spectrum(xp: ModuleType, x: Any, method: str) -> Any:
    """The singular values of a matrix (both unfoldings share them), unpadded."""
    if method == "svd":
        return xp.linalg.svdvals(x)
    small = gram_of(xp, x) if x.shape[0] <= x.shape[1] else gram_of(xp, x.T)
    return descending_sqrt(xp, gram_eigvalsh(xp, small))


def tensor_spectrum(xp: ModuleType, x: Any, mode: int) -> Any:
    """Gram-route spectrum of one unfolding of a tensor of three or more modes.

    A mode that is neither outermost nor innermost in memory gets its NumPy
    Gram matrix block by block, without a copy of the whole tensor.
    """
    rows = x.shape[mode]
    order = memory_order(x)
    position = order.index(mode)
    if is_numpy(xp) and 0 < position < x.ndim - 1 and rows <= math.prod(x.shape) // rows:
        gram = _blocked_fibre_gram(np.transpose(x, order), position)
        return descending_sqrt(xp, gram_eigvalsh(xp, gram))
    return unfolding_spectrum(xp, fibre_matrix(xp, x, mode, order))[0]


def unfolding_spectrum(
    xp: ModuleType, a: Any, method: str = "gram", *, vectors: bool = False
) -> tuple[Any, Any]:
    """Singular values of a ``(rows, cols)`` matrix, zero-padded to ``rows``.

    ``"gram"`` eigendecomposes the Gram matrix of the *smaller* side. With
    ``vectors=True`` it also returns all left singular vectors (descending)
    when they come for free, i.e. when the row Gram matrix is the small one;
    otherwise the second value is ``None``.
    """
    rows, cols = a.shape
    if method == "svd":
        return pad(xp, xp.linalg.svdvals(a), rows), None
    if rows <= cols:
        gram = gram_of(xp, a)
        if vectors:
            w, v = xp.linalg.eigh(gram)
            return descending_sqrt(xp, w), xp.flip(v, axis=1)
        return descending_sqrt(xp, gram_eigvalsh(xp, gram)), None
    return pad(xp, descending_sqrt(xp, gram_eigvalsh(xp, gram_of(xp, a.T))), rows), None
