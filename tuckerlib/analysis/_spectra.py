"""Singular values of every unfolding of a tensor."""

from __future__ import annotations

from types import ModuleType
from typing import Any

import array_api_compat

from tuckerlib.decompositions._common import prepare_tensor
from tuckerlib.decompositions._factors import fibre_matrix

__all__ = ["mode_spectra", "unfolding_spectrum"]

SPECTRUM_METHODS = ("gram", "svd")


def _pad(xp: ModuleType, s: Any, size: int) -> Any:
    if s.shape[0] >= size:
        return s[:size]
    zeros = xp.zeros(size - s.shape[0], dtype=s.dtype, device=array_api_compat.device(s))
    return xp.concat([s, zeros])


def _descending_sqrt(xp: ModuleType, w: Any) -> Any:
    # Rounding leaves eigenvalues of a singular Gram matrix slightly negative.
    return xp.sqrt(xp.clip(xp.flip(w), min=0.0))


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
        return _descending_sqrt(xp, xp.linalg.eigvalsh(gram)), None
    return _pad(xp, _descending_sqrt(xp, xp.linalg.eigvalsh(a.T @ a)), rows), None


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
        wide matrices met here; singular values below about
        ``sqrt(eps) · σ_max`` are then at rounding level (energies, i.e.
        squared values, stay accurate to ``eps · σ_max²``). ``"svd"``
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
            s = _descending_sqrt(xp, xp.linalg.eigvalsh(small))
        return [_pad(xp, s, x.shape[0]), _pad(xp, s, x.shape[1])]
    return [unfolding_spectrum(xp, fibre_matrix(xp, x, n), method)[0] for n in range(x.ndim)]
