"""Sequentially truncated HOSVD (Vannieuwenhoven, Vandebril & Meerbergen 2012)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from tuckerlib._ranks import Rank
from tuckerlib._tucker import TuckerTensor
from tuckerlib.decompositions._factors import (
    truncations,
)
from tuckerlib.decompositions._kernels import sthosvd_steps
from tuckerlib.decompositions._prepare import (
    check_method,
    check_order,
    prepare_tensor,
    resolve_rank_or_tol,
)
from tuckerlib.decompositions._route import dask_backend
from tuckerlib.decompositions._truncation import default_order

__all__ = ["sthosvd"]


def sthosvd(
    x: Any,
    rank: Rank = None,
    *,
    tol: float | None = None,
    order: Sequence[int] | None = None,
    method: str = "auto",
) -> TuckerTensor:
    r"""Sequentially truncated higher-order SVD (ST-HOSVD).

    The modes are processed one after the other: the factor of mode ``n``
    comes from the unfolding of the tensor *already projected* onto the
    factors of the modes before it, so each step works on a smaller tensor
    and the error is never more than HOSVD's bound.

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
        Relative error target in (0, 1), instead of ``rank``: each step
        discards at most :math:`\text{tol}^2 \|x\|^2 / N` energy, so the relative error is
        guaranteed ``<= tol``.
    order : sequence of int, optional
        The order in which the modes are truncated, a permutation of
        ``0..N-1``. By default the mode with the largest size reduction
        :math:`I_n / R_n` goes first (with ``tol``, the largest mode first);
        ties keep the mode order.
    method : {"auto", "svd", "gram", "randomized"}, optional
        How each factor is computed; see :func:`hosvd`.

    Returns
    -------
    TuckerTensor
        Core of shape :math:`(R_0, \dots, R_{N-1})` and orthonormal, sign-fixed
        factors of shape ``(I_n, R_n)``, in the library, device and dtype
        of ``x``. Differentiable under torch autograd.

    Raises
    ------
    ValueError
        As :func:`hosvd`, and if ``order`` is not a permutation of the modes.
    TypeError
        If ``x`` is complex or a rank, tol or order has the wrong type, or
        ``tol`` is given for an ``x`` traced by ``jax.jit``.

    See Also
    --------
    hosvd : The one-shot variant.
    rhosvd : ST-HOSVD with randomized factors, for large tensors.
    hooi : Refines an ST-HOSVD towards a local optimum.

    Notes
    -----
    With :math:`\sigma^{(n)}_i` the singular values of the unfolding met at step
    ``n`` (of the partially projected tensor), the error is exactly the sum
    of the discarded energies ([1]_, Theorem 5.1),

    .. math:: \|x - \hat x\|^2 = \sum_n \sum_{i > R_n} (\sigma^{(n)}_i)^2
              \le \sum_n \sum_{i > R_n} (\sigma^{(n)}_{x, i})^2,

    where the right side is the HOSVD bound for the same ranks. The mode
    order changes the result slightly and the cost a lot: truncating the
    mode with the largest reduction first shrinks the tensor the most for
    the steps that follow ([1]_, §6.2).

    References
    ----------
    .. [1] N. Vannieuwenhoven, R. Vandebril and K. Meerbergen, "A new
       truncation strategy for the higher-order singular value
       decomposition", SIAM J. Sci. Comput. 34(2), A1027-A1052, 2012.

    Examples
    --------
    >>> import numpy as np
    >>> from tuckerlib import relative_error, sthosvd
    >>> rng = np.random.default_rng(0)
    >>> x = rng.standard_normal((8, 9, 10))
    >>> t = sthosvd(x, rank=(3, 4, 5))
    >>> t.rank, t.factors[0].shape
    ((3, 4, 5), (8, 3))
    >>> relative_error(x, sthosvd(x, tol=0.3)) <= 0.3
    True
    """
    prepared = prepare_tensor(x)
    shape = tuple(prepared.x.shape)
    ranks, tol = resolve_rank_or_tol(rank, tol, shape)
    method = check_method(method)
    if method == "randomized" and ranks is None:
        raise ValueError('method="randomized" needs rank; it cannot choose ranks from tol')
    order = default_order(shape, ranks) if order is None else check_order(order, len(shape))
    dask = dask_backend(prepared)
    if dask is not None:
        return dask.sthosvd(prepared, order, ranks, tol, method)
    cuts = truncations(prepared, ranks, tol)
    result = sthosvd_steps(prepared.xp, prepared.x, order, cuts, method)
    return prepared.result(result.core, result.factors)
