"""Singular values of every unfolding of a tensor."""

from __future__ import annotations

import math
from types import ModuleType
from typing import Any

import array_api_compat
import numpy as np

from tuckerlib._layout import memory_order
from tuckerlib._namespace import is_numpy
from tuckerlib.decompositions._common import prepare_tensor
from tuckerlib.decompositions._factors import fibre_matrix

__all__ = ["mode_spectra", "unfolding_spectrum"]

SPECTRUM_METHODS = ("gram", "svd")

# A middle-mode unfolding of a NumPy tensor is not a view; its Gram matrix
# is accumulated from copies of at most this many bytes of it instead of
# one copy of the whole tensor.
GRAM_BLOCK_BYTES = 2**24


def _pad(xp: ModuleType, s: Any, size: int) -> Any:
    if s.shape[0] >= size:
        return s[:size]
    zeros = xp.zeros(size - s.shape[0], dtype=s.dtype, device=array_api_compat.device(s))
    return xp.concat([s, zeros])


def _descending_sqrt(xp: ModuleType, w: Any) -> Any:
    """Singular values, descending, from the ascending eigenvalues of a Gram matrix."""
    # Rounding can leave the eigenvalues of zero singular values slightly negative.
    return xp.sqrt(xp.clip(xp.flip(w), min=0.0))


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
    """``A Aᵀ`` for the mode-``mode`` fibre matrix ``A`` of a NumPy tensor, copying blocks."""
    rows = x.shape[mode]
    after = math.prod(x.shape[mode + 1 :])
    stacked = np.reshape(x, (-1, rows, after))
    step = max(1, GRAM_BLOCK_BYTES // max(1, rows * after * x.itemsize))
    gram = np.zeros((rows, rows), dtype=x.dtype)
    for start in range(0, stacked.shape[0], step):
        block = np.ascontiguousarray(np.moveaxis(stacked[start : start + step], 1, 0))
        block = block.reshape(rows, -1)
        gram += block @ block.T
    return gram


def _mode_spectrum(xp: ModuleType, x: Any, mode: int) -> Any:
    """Gram-route spectrum of one unfolding of a tensor of three or more modes.

    A mode that is neither outermost nor innermost in memory gets its NumPy
    Gram matrix block by block, without a copy of the whole tensor.
    """
    rows = x.shape[mode]
    order = memory_order(x)
    position = order.index(mode)
    if is_numpy(xp) and 0 < position < x.ndim - 1 and rows <= math.prod(x.shape) // rows:
        gram = _blocked_fibre_gram(np.transpose(x, order), position)
        return _descending_sqrt(xp, gram_eigvalsh(xp, gram))
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
        return _pad(xp, xp.linalg.svdvals(a), rows), None
    if rows <= cols:
        gram = a @ a.T
        if vectors:
            w, v = xp.linalg.eigh(gram)
            return _descending_sqrt(xp, w), xp.flip(v, axis=1)
        return _descending_sqrt(xp, gram_eigvalsh(xp, gram)), None
    return _pad(xp, _descending_sqrt(xp, gram_eigvalsh(xp, a.T @ a)), rows), None


def mode_spectra(x: Any, *, method: str = "gram") -> list[Any]:
    r"""Singular values of every mode-``n`` unfolding of a tensor.

    Parameters
    ----------
    x : array of shape (I_0, ..., I_{N-1})
        Real tensor of any array API library. Integer input is converted to
        the library's default floating dtype.
    method : {"gram", "svd"}, optional
        ``"gram"`` (default) takes the eigenvalues of the Gram matrix of the
        smaller side of each unfolding, much faster than an SVD for the
        wide matrices met here; energies (squared values) are accurate to
        about ``eps · σ_max²``, so singular values below about
        ``sqrt(eps) · σ_max`` are rounding noise (never negative: tiny
        negative eigenvalues are clipped to 0). ``eps`` is that of the
        input's dtype: float32 input is analysed in float32. ``"svd"``
        computes them with an SVD, accurate to ``eps · σ_max``.

    Returns
    -------
    list of 1-D arrays
        ``spectra[n]`` has length ``I_n``: the singular values of
        ``unfold(x, n)`` in descending order, zero-padded when ``I_n``
        exceeds the number of columns. Same library, device and dtype as
        ``x``, so the list carries the tensor's shape and can be passed to
        :func:`energy_ranks` and :func:`ranks_for_budget` instead of ``x``.

    Raises
    ------
    ValueError
        If ``x`` is 0-D or holds NaN/inf, or ``method`` is unknown.
    TypeError
        If ``x`` is complex.

    See Also
    --------
    energy_ranks, effective_rank, stable_rank, ranks_for_budget

    Notes
    -----
    For a matrix both unfoldings share their nonzero singular values, so one
    eigendecomposition (of the smaller Gram matrix) serves both modes.

    For NumPy input the extra memory stays at about one Gram matrix (at
    most the size of ``x``): the eigenvalues are computed in place in it
    (LAPACK ``syevd`` through SciPy), and the Gram matrix of a middle mode,
    whose unfolding is not a view of ``x``, is accumulated from 16 MiB
    blocks of that unfolding rather than from a full copy.

    Examples
    --------
    >>> import numpy as np
    >>> from tuckerlib import mode_spectra
    >>> x = np.zeros((3, 4, 2))
    >>> x[0, 0, 0], x[1, 1, 1] = 3.0, 4.0
    >>> [np.round(s, 6).tolist() for s in mode_spectra(x)]
    [[4.0, 3.0, 0.0], [4.0, 3.0, 0.0, 0.0], [4.0, 3.0]]
    """
    if method not in SPECTRUM_METHODS:
        raise ValueError(f'method must be "gram" or "svd", got {method!r}')
    xp, x = prepare_tensor(x)
    if x.ndim == 2:
        if method == "svd":
            s = xp.linalg.svdvals(x)
        else:
            small = x @ x.T if x.shape[0] <= x.shape[1] else x.T @ x
            s = _descending_sqrt(xp, gram_eigvalsh(xp, small))
        return [_pad(xp, s, x.shape[0]), _pad(xp, s, x.shape[1])]
    if method == "svd":
        return [unfolding_spectrum(xp, fibre_matrix(xp, x, n), method)[0] for n in range(x.ndim)]
    return [_mode_spectrum(xp, x, n) for n in range(x.ndim)]
