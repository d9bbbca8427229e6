"""Randomized ST-HOSVD: one randomized range finder per mode."""

from __future__ import annotations

from typing import Any

import numpy as np

from tuckerlib._ranks import Rank, resolve_rank
from tuckerlib._tucker import TuckerTensor
from tuckerlib._validation import check_int
from tuckerlib.decompositions._factors import truncations
from tuckerlib.decompositions._kernels import sthosvd_steps
from tuckerlib.decompositions._prepare import prepare_tensor
from tuckerlib.decompositions._route import dask_backend
from tuckerlib.decompositions._sketch import Sketch
from tuckerlib.decompositions._truncation import default_order

__all__ = ["rhosvd"]

Seed = int | np.random.Generator | None


def _check_seed(seed: Any) -> np.random.Generator:
    if seed is None or isinstance(seed, np.random.Generator):
        return np.random.default_rng(seed)
    return np.random.default_rng(
        check_int(seed, "seed", 0, "None, an int or a numpy.random.Generator")
    )


def rhosvd(
    x: Any,
    rank: Rank,
    *,
    oversample: int = 10,
    power_iter: int = 1,
    seed: Seed = None,
) -> TuckerTensor:
    r"""Randomized sequentially truncated HOSVD.

    ST-HOSVD in which each factor comes from a randomized range finder
    ([1]_, [2]_) instead of a full SVD of the unfolding: the unfolding ``A`` (:math:`I_n \times J`)
    is multiplied by a :math:`J \times (R_n + p)` Khatri-Rao product of small
    Gaussian matrices, refined by ``q`` power iterations, and the leading
    ``R_n`` left singular vectors are read off small projected matrices.
    This touches ``A`` only in ``2q + 1`` matrix products (two for
    ``q = 0``), which is what pays on large tensors.

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
    oversample : int, optional
        Extra sketch columns ``p`` beyond the rank (Halko et al. suggest 5
        to 10).
    power_iter : int, optional
        Power (subspace) iterations ``q``, each a product with :math:`A^\top` and one
        with ``A``; each sharpens a slowly decaying spectrum at the price of
        two more passes over the unfolding.
    seed : int, numpy.random.Generator or None, optional
        Seed of the Gaussian test matrices. They are drawn on the host with
        ``numpy.random.default_rng`` and moved to the input's device,
        so one seed gives the same result on every backend and device.
        ``None`` draws fresh randomness.

    Returns
    -------
    TuckerTensor
        Core of shape :math:`(R_0, \dots, R_{N-1})` and orthonormal, sign-fixed
        factors of shape ``(I_n, R_n)``, in the library, device and dtype
        of ``x``. Differentiable under torch autograd.

    Raises
    ------
    ValueError
        If ``rank`` is ``None``, a rank is below 1 or a rank sequence
        exceeds a mode size, ``oversample``/``power_iter``/``seed`` is
        negative, or ``x`` is 0-D, has a mode of size 0, holds NaN/inf or
        is a meta tensor.
    TypeError
        If ``x`` is complex or an argument has the wrong type.

    See Also
    --------
    sthosvd : The deterministic algorithm this randomizes.

    Notes
    -----
    Modes are processed in :func:`sthosvd`'s default order. When
    :math:`R_n + p` reaches the smaller side of an unfolding, that mode is
    decomposed exactly instead (a sketch that wide saves nothing).

    Each mode, with :math:`k = R_n + p`:

    1. :math:`Y = A\Omega` with :math:`\Omega` the Khatri-Rao product of one :math:`I_m \times k`
       standard normal matrix per other mode ``m`` ([3]_): only
       :math:`k \cdot \sum_m I_m` numbers are drawn instead of :math:`k \cdot J`.
       ``Q = orth(Y)``.
    2. ``q`` power iterations ([1]_, Algorithm 4.4): :math:`Z = A^\top Q`, then,
       except in the last one, ``Q = orth(AZ)``.
    3. For ``q = 0``, the factor is read off :math:`Q^\top A` ([1]_, Algorithm 5.1).
       For :math:`q \ge 1`, the last ``Z`` and ``AZ`` determine ``A P_Z``, the
       projection of the rows of ``A`` onto the range of ``Z``
       (a generalized Nyström approximation, [4]_, [5]_); the factor is the
       leading left singular vectors of ``A P_Z`` and the projected
       unfolding :math:`u^\top A P_Z` costs no further pass over ``A``.

    The range of ``Z`` is that of :math:`(A^\top A)^q \Omega`, so, for a dense Gaussian
    :math:`\Omega`, the argument of [1]_ (Corollary 10.10, with :math:`A^\top A` in place of
    :math:`A A^\top A`) bounds the expected error of the rank-``k`` approximation by

    .. math:: \mathbb{E}\,\|A - A P_Z\| \le
              \Bigl[\Bigl(1 + \sqrt{\tfrac{R_n}{p-1}}\Bigr)\sigma_{R_n+1}^{2q}
              + \tfrac{e\sqrt{k}}{p}\Bigl(\sum_{j>R_n}\sigma_j^{4q}\Bigr)^{1/2}
              \Bigr]^{1/(2q)}, \qquad q \ge 1,

    with :math:`\sigma_i` the singular values of the unfolding: close to the optimal
    :math:`\sigma_{R_n+1}` for a decaying spectrum. Halko et al.'s own scheme
    reaches the exponent ``2q + 1`` with one more pass (:math:`Q^\top A` after a
    last ``Q = orth(AZ)``); on the benchmark tensor of
    ``benchmarks/bench_decompositions.py`` (400³, rank 10) ``q = 1`` gives
    an error 1.006× that of :func:`sthosvd` instead of 1.0003×, in three
    passes instead of four. The Khatri-Rao test matrix is not Gaussian, and
    the bound is not proven for it. With :math:`q \ge 1` its errors match a dense
    Gaussian one's (over 20 random 30³ tensors, mode 0 at rank 5 with
    ``p = 5``, both 1.0010× the optimal error on average); with ``q = 0``
    they are about 5% larger (1.22× against 1.17×).

    References
    ----------
    .. [1] N. Halko, P.-G. Martinsson and J. A. Tropp, "Finding structure
       with randomness: probabilistic algorithms for constructing
       approximate matrix decompositions", SIAM Review 53(2), 217-288, 2011.
    .. [2] R. Minster, A. K. Saibaba and M. E. Kilmer, "Randomized
       algorithms for low-rank tensor decompositions in the Tucker format",
       SIAM J. Math. Data Sci. 2(1), 189-215, 2020.
    .. [3] Y. Sun, Y. Guo, C. Luo, J. A. Tropp and M. Udell, "Low-rank Tucker
       approximation of a tensor from streaming data", SIAM J. Math. Data
       Sci. 2(4), 1123-1150, 2020.
    .. [4] E. K. Bjarkason, "Pass-efficient randomized algorithms for
       low-rank matrix approximation using any number of views", SIAM J.
       Sci. Comput. 41(4), A2355-A2383, 2019.
    .. [5] Y. Nakatsukasa, "Fast and stable randomized low-rank matrix
       approximation", arXiv:2009.11392, 2020.

    Examples
    --------
    >>> import numpy as np
    >>> from tuckerlib import relative_error, rhosvd, sthosvd
    >>> rng = np.random.default_rng(0)
    >>> x = rng.standard_normal((30, 30, 30))
    >>> t = rhosvd(x, rank=5, seed=42)
    >>> t.rank
    (5, 5, 5)
    >>> bool(np.allclose(t.core, rhosvd(x, rank=5, seed=42).core))
    True
    >>> relative_error(x, t) < 1.05 * relative_error(x, sthosvd(x, rank=5))
    True
    """
    prepared = prepare_tensor(x)
    if rank is None:
        raise ValueError("rhosvd needs rank (an int or one rank per mode); got None")
    ranks = resolve_rank(rank, prepared.x.shape)
    sketch = Sketch(
        oversample=check_int(oversample, "oversample", 0),
        power_iter=check_int(power_iter, "power_iter", 0),
        rng=_check_seed(seed),
    )
    order = default_order(prepared.x.shape, ranks)
    dask = dask_backend(prepared)
    if dask is not None:
        return dask.sthosvd(prepared, order, ranks, None, "randomized", sketch=sketch)
    cuts = truncations(prepared, ranks, None)
    result = sthosvd_steps(prepared.xp, prepared.x, order, cuts, "randomized", sketch=sketch)
    return prepared.result(result.core, result.factors)
