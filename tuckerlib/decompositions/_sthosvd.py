"""Sequentially truncated HOSVD (Vannieuwenhoven, Vandebril & Meerbergen 2012)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from types import ModuleType
from typing import Any

import numpy as np

from tuckerlib._layout import memory_order
from tuckerlib._ranks import Rank
from tuckerlib._tucker import TuckerTensor
from tuckerlib.decompositions._common import (
    check_order,
    default_order,
    prepare_tensor,
    rank_for_threshold,
    resolve_rank_or_tol,
    squared_norm,
    tail_energies,
)
from tuckerlib.decompositions._factors import (
    check_method,
    fibre_columns,
    fibre_matrix,
    mode_factor,
    unfibre,
)
from tuckerlib.decompositions._linalg import sign_fix
from tuckerlib.decompositions._sketch import Sketch

__all__ = ["sthosvd", "sthosvd_steps"]


def sthosvd_steps(
    xp: ModuleType,
    x: Any,
    ranks: Sequence[int] | None,
    order: Sequence[int],
    method: str,
    *,
    threshold: float | None = None,
    tol: float | None = None,
    sketch: Sketch | None = None,
    known: Mapping[int, tuple[Any, np.ndarray]] | None = None,
) -> tuple[TuckerTensor, float]:
    """Run ST-HOSVD in ``order``; return the result and its squared error.

    The squared error is the sum of the energies discarded at each step
    (exact for ST-HOSVD, [Vannieuwenhoven et al. 2012, Thm. 5.1]); it is
    ``nan`` when a step used a sketch, which computes no spectrum.
    ``known`` maps the *first* mode in ``order`` to an already computed
    ``(all left singular vectors, host spectrum)`` of ``x``, so that work is
    not repeated.
    """
    core = x
    factors: list[Any] = [None] * x.ndim
    discarded = 0.0
    for step, n in enumerate(order):
        rank = None if ranks is None else ranks[n]
        # The fibre matrix serves both the factor and the projection: for a
        # mode in the middle of the memory order it is a copy, made once.
        layout = memory_order(core)
        a = fibre_matrix(xp, core, n, layout)
        projected = None
        if step == 0 and known is not None and n in known:
            vectors, spectrum = known[n]
            if rank is None:
                rank = rank_for_threshold(spectrum, threshold or 0.0, x.shape[n])
            factor = sign_fix(xp, vectors[:, :rank])
        else:
            factor, spectrum, projected = mode_factor(
                xp,
                a,
                method,
                rank=rank,
                threshold=threshold,
                tol=tol,
                ndim=x.ndim,
                sketch=sketch,
                columns=fibre_columns(core.shape, n, layout),
            )
        rank = factor.shape[1]
        factors[n] = factor
        discarded += float("nan") if spectrum is None else float(tail_energies(spectrum)[rank])
        if projected is None:
            projected = factor.T @ a
        shape = (*core.shape[:n], rank, *core.shape[n + 1 :])
        core = unfibre(xp, projected, n, shape, layout)
    return TuckerTensor(core, factors), discarded


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
        Real tensor of any array API library. Integer input is converted to
        the library's default floating dtype; float32 stays float32.
    rank : int, sequence of int or None, or None, optional
        Multilinear rank (see :func:`resolve_rank`). ``None`` with no
        ``tol`` keeps every mode full (an exact decomposition).
    tol : float, optional
        Relative error target in (0, 1), instead of ``rank``: each step
        discards at most ``tol² ‖x‖² / N`` energy, so the relative error is
        guaranteed ``<= tol``.
    order : sequence of int, optional
        The order in which the modes are truncated, a permutation of
        ``0..N-1``. By default the mode with the largest size reduction
        ``I_n / R_n`` goes first (with ``tol``, the largest mode first);
        ties keep the mode order.
    method : {"auto", "svd", "gram", "randomized"}, optional
        How each factor is computed; see :func:`hosvd`.

    Returns
    -------
    TuckerTensor
        Core of shape ``(R_0, ..., R_{N-1})`` and orthonormal, sign-fixed
        factors of shape ``(I_n, R_n)``, in the library, device and dtype
        of ``x``. Differentiable under torch autograd.

    Raises
    ------
    ValueError
        As :func:`hosvd`, and if ``order`` is not a permutation of the modes.
    TypeError
        If ``x`` is complex or a rank, tol or order has the wrong type.

    See Also
    --------
    hosvd : The one-shot variant.
    rhosvd : ST-HOSVD with randomized factors, for large tensors.
    hooi : Refines an ST-HOSVD towards a local optimum.

    Notes
    -----
    With ``σ^{(n)}_i`` the singular values of the unfolding met at step
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
    xp, x = prepare_tensor(x)
    ranks, tol = resolve_rank_or_tol(rank, tol, x.shape)
    method = check_method(method)
    if method == "randomized" and ranks is None:
        raise ValueError('method="randomized" needs rank; it cannot choose ranks from tol')
    order = default_order(x.shape, ranks) if order is None else check_order(order, x.ndim)
    threshold = None if tol is None else tol * tol * squared_norm(xp, x) / x.ndim
    tucker, _ = sthosvd_steps(xp, x, ranks, order, method, threshold=threshold, tol=tol)
    return tucker
