"""Singular values of every unfolding of a tensor."""

from __future__ import annotations

from typing import Any

from tuckerlib.decompositions._for_analysis import (
    in_input_library,
    prepare_tensor,
    unfolding_spectra,
)

__all__ = ["mode_spectra"]

SPECTRUM_METHODS = ("gram", "svd")


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
        about :math:`\epsilon \cdot \sigma_{\max}^2`, so singular values below about
        :math:`\sqrt{\epsilon} \cdot \sigma_{\max}` are rounding noise (never negative: tiny
        negative eigenvalues are clipped to 0). ``eps`` is that of the
        input's dtype: float32 input is analysed in float32. ``"svd"``
        computes them with an SVD, accurate to :math:`\epsilon \cdot \sigma_{\max}`.

    Returns
    -------
    list of 1-D arrays
        ``spectra[n]`` has length ``I_n``: the singular values of
        ``unfold(x, n)`` in descending order, zero-padded when ``I_n``
        exceeds the number of columns. Same library, device and dtype as
        ``x`` (Dask input gives Dask arrays; half-precision input, computed
        in float32, gives float32 spectra, whose energies would overflow
        float16), so the list carries the tensor's shape and can be passed
        to :func:`energy_ranks` and :func:`ranks_for_budget` instead of ``x``.

    Raises
    ------
    ValueError
        If ``x`` is 0-D, has a mode of size 0, holds NaN/inf or is a meta
        tensor, or ``method`` is unknown.
    TypeError
        If ``x`` is complex, or traced by ``jax.jit`` (a spectrum is read
        on the host).

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
    blocks of that unfolding rather than from a full copy. For a Dask
    array all ``N`` Gram matrices are blocked contractions computed in one
    pass over ``x`` (``method`` is ignored: an SVD would gather the
    unfolding). Input whose energy would overflow or underflow a Gram
    matrix is scaled by a power of two first (exact), so every finite
    tensor has its spectra.

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
    prepared, spectra = unfolding_spectra(prepare_tensor(x), method)
    return [in_input_library(prepared, s.values) for s in spectra]
