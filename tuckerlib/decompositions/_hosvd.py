"""Truncated higher-order SVD (De Lathauwer, De Moor & Vandewalle 2000)."""

from __future__ import annotations

from typing import Any

from tuckerlib._products import multi_mode_product
from tuckerlib._ranks import Rank
from tuckerlib._tucker import TuckerTensor
from tuckerlib.decompositions._factors import truncations
from tuckerlib.decompositions._kernels import hosvd_factors
from tuckerlib.decompositions._prepare import (
    check_method,
    prepare_tensor,
    resolve_rank_or_tol,
)
from tuckerlib.decompositions._route import dask_backend

__all__ = ["hosvd"]


def hosvd(
    x: Any, rank: Rank = None, *, tol: float | None = None, method: str = "auto"
) -> TuckerTensor:
    r"""Truncated higher-order singular value decomposition (HOSVD).

    Each factor ``U_n`` holds the leading left singular vectors of the
    mode-``n`` unfolding of ``x`` itself, computed independently per mode;
    the core is :math:`x \times_0 U_0^\top \dots \times_{N-1} U_{N-1}^\top`.

    Parameters
    ----------
    x : array of shape (I_0, ..., I_{N-1})
        Real tensor of any array API library (a Dask array is decomposed
        chunk by chunk; see the scaling guide). Integer input is converted
        to the library's default floating dtype; float32 stays float32;
        float16 and bfloat16 are computed in float32 and the results
        returned in the input's dtype. Input whose energy would overflow or
        underflow a Gram matrix is scaled by a power of two first (exact).
    rank : int, sequence of int or None, or None, optional
        Multilinear rank (see :func:`resolve_rank`). ``None`` with no
        ``tol`` keeps every mode full (an exact decomposition).
    tol : float, optional
        Relative error target in (0, 1), instead of ``rank``: each mode
        keeps the fewest singular vectors whose discarded energy is at most
        :math:`\text{tol}^2 \|x\|^2 / N`, which guarantees a relative error ``<= tol``.
    method : {"auto", "svd", "gram", "randomized"}, optional
        How each factor is computed: ``"svd"`` from the SVD of the
        unfolding, ``"gram"`` from the eigendecomposition of the Gram
        matrix of the smaller side (fast, but squares the condition number),
        ``"randomized"`` by a randomized range finder (needs ``rank``; a
        fixed seed, so results are reproducible; see :func:`rhosvd` for
        control), ``"auto"`` as described in the Notes.

    Returns
    -------
    TuckerTensor
        Core of shape :math:`(R_0, \dots, R_{N-1})` and orthonormal, sign-fixed
        factors of shape ``(I_n, R_n)``, in the library, device and dtype
        of ``x``. Differentiable under torch autograd.

    Raises
    ------
    ValueError
        If ``x`` is 0-D, has a mode of size 0, holds NaN/inf or is a meta
        tensor, a rank is below 1 or a rank sequence exceeds a mode size,
        ``tol`` is outside (0, 1), both ``rank`` and ``tol`` are given,
        ``method`` is unknown, or ``method="randomized"`` is combined with
        ``tol``.
    TypeError
        If ``x`` is complex or a rank/tol has the wrong type, or ``tol``
        is given for an ``x`` traced by ``jax.jit`` (ranks from ``tol`` are
        read on the host; fixed integer ranks work under ``jax.jit``).

    See Also
    --------
    sthosvd : Usually as accurate and cheaper.
    hooi : Iterates to a (locally) optimal approximation.

    Notes
    -----
    With :math:`\sigma^{(n)}_i` the singular values of the mode-``n`` unfolding, the
    HOSVD error obeys ([1]_, property 10)

    .. math:: \|x - \hat x\|^2 \le \sum_n \sum_{i > R_n} (\sigma^{(n)}_i)^2
              \le N \|x - x_{\text{best}}\|^2.

    ``method="auto"`` uses the eigendecomposition of the Gram matrix of the smaller side of each
    unfolding (:math:`A A^\top` if it is wide; :math:`A^\top A` and a QR of ``A V_R`` if it is
    tall), unless :math:`\text{tol}^2 / N < 10 \min(I_n, J_n)\, \varepsilon`
    (:math:`J_n = \prod_{k \ne n} I_k`), where the SVD is used. The larger Gram matrix is never
    formed.

    References
    ----------
    .. [1] L. De Lathauwer, B. De Moor and J. Vandewalle, "A multilinear
       singular value decomposition", SIAM J. Matrix Anal. Appl. 21(4),
       1253-1278, 2000.

    Examples
    --------
    >>> import numpy as np
    >>> from tuckerlib import hosvd, relative_error
    >>> rng = np.random.default_rng(0)
    >>> x = rng.standard_normal((8, 9, 10))
    >>> t = hosvd(x, rank=(3, 4, 5))
    >>> t.rank
    (3, 4, 5)
    >>> relative_error(x, hosvd(x)) < 1e-13
    True
    >>> t = hosvd(x, tol=0.5)
    >>> relative_error(x, t) <= 0.5
    True
    """
    prepared = prepare_tensor(x)
    ranks, tol = resolve_rank_or_tol(rank, tol, prepared.x.shape)
    method = check_method(method)
    if method == "randomized" and ranks is None:
        raise ValueError('method="randomized" needs rank; it cannot choose ranks from tol')
    dask = dask_backend(prepared)
    if dask is not None:
        return dask.hosvd(prepared, ranks, tol, method)
    factors = hosvd_factors(prepared, truncations(prepared, ranks, tol), method)
    return prepared.result(multi_mode_product(prepared.x, factors, transpose=True), factors)
