"""Higher-order orthogonal iteration (De Lathauwer, De Moor & Vandewalle 2000b)."""

from __future__ import annotations

import numbers
from typing import Any, Literal, overload

from tuckerlib._host import require_values
from tuckerlib._namespace import get_namespace
from tuckerlib._products import multi_mode_product
from tuckerlib._ranks import Rank, resolve_rank
from tuckerlib._tucker import TuckerTensor
from tuckerlib._validation import check_int
from tuckerlib.decompositions._factors import truncations
from tuckerlib.decompositions._kernels import HOOIInfo, hosvd_factors, iterate, sthosvd_steps
from tuckerlib.decompositions._linalg import sign_fix
from tuckerlib.decompositions._prepare import Prepared, prepare_tensor
from tuckerlib.decompositions._route import dask_backend
from tuckerlib.decompositions._truncation import default_order

__all__ = ["HOOIInfo", "hooi"]

INITS = ("sthosvd", "hosvd")


def _check_stop_tol(tol: Any) -> float:
    if isinstance(tol, bool) or not isinstance(tol, numbers.Real):
        raise TypeError(f"tol must be a real number >= 0, got {type(tol).__name__}")
    if not float(tol) >= 0.0:
        raise ValueError(f"tol must be >= 0, got {tol}")
    return float(tol)


def check_init(init: Any, x: Any, ranks: tuple[int, ...]) -> Any:
    """Return ``init``: a known name, or a Tucker tensor of ``x``'s library, shape and rank."""
    if isinstance(init, TuckerTensor):
        try:
            get_namespace(x, init.core)
        except TypeError:
            raise TypeError(
                f"init must hold arrays of the same library as x ({type(x).__module__}), got a "
                f"TuckerTensor of {type(init.core).__module__} arrays; convert one of them first"
            ) from None
        if init.shape != tuple(x.shape) or init.rank != ranks:
            raise ValueError(
                f"init must have shape {tuple(x.shape)} and rank {ranks}, "
                f"got shape {init.shape} and rank {init.rank}"
            )
        return init
    if isinstance(init, str) and init in INITS:
        return init
    raise ValueError(f'init must be "sthosvd", "hosvd" or a TuckerTensor, got {init!r}')


def _initial(prepared: Prepared, ranks: tuple[int, ...], init: Any) -> tuple[Any, list[Any]]:
    """The core and factors HOOI starts from (eager input)."""
    xp, x = prepared.xp, prepared.x
    if isinstance(init, TuckerTensor):
        # Orthonormal bases of the same column spaces; the core is then the
        # best one for them, so this start is never worse than init itself.
        factors = [sign_fix(xp, xp.linalg.qr(xp.astype(f, x.dtype))[0]) for f in init.factors]
        return multi_mode_product(x, factors, transpose=True), factors
    cuts = truncations(prepared, ranks, None)
    if init == "hosvd":
        factors = hosvd_factors(prepared, cuts, "auto")
        return multi_mode_product(x, factors, transpose=True), factors
    result = sthosvd_steps(xp, x, default_order(x.shape, ranks), cuts, "auto")
    return result.core, list(result.factors)


@overload
def hooi(
    x: Any,
    rank: Rank,
    *,
    init: str | TuckerTensor = ...,
    max_iter: int = ...,
    tol: float = ...,
    return_info: Literal[False] = ...,
) -> TuckerTensor: ...
@overload
def hooi(
    x: Any,
    rank: Rank,
    *,
    init: str | TuckerTensor = ...,
    max_iter: int = ...,
    tol: float = ...,
    return_info: Literal[True],
) -> tuple[TuckerTensor, HOOIInfo]: ...
def hooi(
    x: Any,
    rank: Rank,
    *,
    init: str | TuckerTensor = "sthosvd",
    max_iter: int = 50,
    tol: float = 1e-8,
    return_info: bool = False,
) -> TuckerTensor | tuple[TuckerTensor, HOOIInfo]:
    r"""Higher-order orthogonal iteration (HOOI): a Tucker approximation by alternating.

    Each sweep updates every factor in turn to the leading left singular
    vectors of ``x`` projected onto all the *other* factors, the exact
    minimizer of the error over that one factor. The error therefore
    never increases from sweep to sweep.

    Parameters
    ----------
    x : array of shape (I_0, ..., I_{N-1})
        Real tensor of any array API library (a Dask array is decomposed
        chunk by chunk; see the scaling guide). Integer input is converted
        to the library's default floating dtype; float32 stays float32;
        float16 and bfloat16 are computed in float32 and the results
        returned in the input's dtype. Input whose energy would overflow or
        underflow a Gram matrix is scaled by a power of two first (exact).
    rank : int or sequence of int or None
        Multilinear rank (see :func:`resolve_rank`); required.
    init : {"sthosvd", "hosvd"} or TuckerTensor, optional
        The starting point: an ST-HOSVD (default) or HOSVD of ``x`` at
        ``rank``, or a given Tucker tensor of that shape and rank (its
        factors are orthonormalized first). No random start is offered:
        it needs more sweeps to reach the same error.
    max_iter : int, optional
        Maximum number of sweeps (``0`` returns the initialization).
    tol : float, optional
        Stop when a sweep changes the relative error by at most ``tol``.
    return_info : bool, optional
        Also return a :class:`HOOIInfo` with the error of every sweep and
        whether the iteration converged.

    Returns
    -------
    TuckerTensor
        The best iterate (lowest error, never worse than ``init``): core of
        shape :math:`(R_0, \dots, R_{N-1})` and orthonormal, sign-fixed factors of
        shape ``(I_n, R_n)``, in the library, device and dtype of ``x``.
    HOOIInfo
        Only with ``return_info=True``.

    Raises
    ------
    ValueError
        If ``rank`` is ``None``, a rank is below 1 or a rank sequence
        exceeds a mode size, ``init`` is unknown or does not match ``x``
        and ``rank``, ``max_iter < 0``, ``tol < 0``, or ``x`` is 0-D, has
        a mode of size 0, holds NaN/inf or is a meta tensor.
    TypeError
        If ``x`` is complex or an argument has the wrong type, ``init``
        holds arrays of another library than ``x``, or ``x`` is traced by
        ``jax.jit`` (the stopping rule reads the error on the host).

    See Also
    --------
    sthosvd : The default initialization, often within a few percent.

    Notes
    -----
    HOOI maximizes :math:`\|G\|^2 = \|x \times_0 U_0^\top \cdots \times_{N-1} U_{N-1}^\top \|^2`
    over
    orthonormal factors, since for orthonormal factors and the optimal core

    .. math:: \|x - \hat x\|^2 = \|x\|^2 - \|G\|^2

    ([1]_, Theorem 4.2). The errors reported use this identity, so values
    below ``sqrt(eps)`` are at rounding level. HOOI converges to a
    stationary point, not necessarily the global optimum.

    References
    ----------
    .. [1] L. De Lathauwer, B. De Moor and J. Vandewalle, "On the best
       rank-1 and rank-(R1, R2, ..., RN) approximation of higher-order
       tensors", SIAM J. Matrix Anal. Appl. 21(4), 1324-1342, 2000.

    Examples
    --------
    >>> import numpy as np
    >>> from tuckerlib import hooi, relative_error, sthosvd
    >>> rng = np.random.default_rng(0)
    >>> x = rng.standard_normal((10, 11, 12))
    >>> t, info = hooi(x, rank=3, return_info=True)
    >>> t.rank
    (3, 3, 3)
    >>> info.errors[-1] <= info.errors[0]
    True
    >>> relative_error(x, t) <= relative_error(x, sthosvd(x, rank=3))
    True
    """
    prepared = prepare_tensor(x)
    if rank is None:
        raise ValueError("hooi needs rank (an int or one rank per mode); got None")
    ranks = resolve_rank(rank, prepared.x.shape)
    stop = (check_int(max_iter, "max_iter", 0), _check_stop_tol(tol))
    init = check_init(init, prepared.x, ranks)
    require_values(prepared.x, "hooi's stopping rule (the error after each sweep)")
    dask = dask_backend(prepared)
    if dask is not None:
        tucker, info = dask.hooi(prepared, ranks, init, stop)
    else:
        xp, x = prepared.xp, prepared.x
        core, factors, info = iterate(
            xp,
            lambda factors, n: multi_mode_product(x, factors, skip=n, transpose=True),
            _initial(prepared, ranks, init),
            prepared.norm2,
            default_order(x.shape, ranks),
            stop,
        )
        tucker = prepared.result(core, factors)
    return (tucker, info) if return_info else tucker
