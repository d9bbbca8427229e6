"""Tucker against a flattened low-rank matrix at the same parameter count."""

from __future__ import annotations

import math
from typing import Any

from tuckerlib.analysis._budget import check_budget, solve_budget
from tuckerlib.analysis._spectra import mode_spectra, unfolding_spectrum
from tuckerlib.decompositions._common import default_order, prepare_tensor, tail_energies, to_host
from tuckerlib.decompositions._factors import fibre_matrix
from tuckerlib.decompositions._sthosvd import sthosvd_steps

__all__ = ["tucker_vs_matrix"]


def _relative(squared_error: float, total: float) -> float:
    if total == 0.0:
        return 0.0
    return math.sqrt(min(max(squared_error / total, 0.0), 1.0))


def tucker_vs_matrix(x: Any, budget: int) -> dict[str, Any]:
    r"""Best Tucker approximation within a budget against a flattened low-rank matrix.

    The paper's argument in numbers: with the same number of parameters, is
    it better to keep the tensor's modes (Tucker) or to flatten it to
    ``unfold(x, 0)`` and use a rank-``r`` matrix (as LoRA does)?

    Parameters
    ----------
    x : array of shape (I_0, ..., I_{N-1})
        Real tensor of any array API library, ``N >= 2``.
    budget : int
        Parameters allowed to each approximation.

    Returns
    -------
    dict
        ``"tucker_error"`` (float): relative error of the ST-HOSVD at
        ``"tucker_ranks"`` (tuple of int), the ranks chosen by
        :func:`ranks_for_budget`; ``"matrix_error"`` (float): relative error
        of the best rank-``"matrix_rank"`` (int) approximation of
        ``unfold(x, 0)``, with ``r`` the largest rank such that
        ``r · (I_0 + Π_{n>0} I_n) <= budget`` (``0``, with error ``1.0``,
        when even rank 1 does not fit); ``"budget"`` (int). Errors are
        ``0.0`` for an all-zero tensor.

    Raises
    ------
    ValueError
        If ``x`` has fewer than 2 modes or holds NaN/inf, or ``budget`` is
        too small for rank 1 in every Tucker mode (the message gives the
        minimum).
    TypeError
        If ``x`` is complex or ``budget`` is not an integer.

    See Also
    --------
    ranks_for_budget, sthosvd

    Notes
    -----
    The matrix error follows from the spectrum of ``unfold(x, 0)`` by
    Eckart-Young: ``‖A - A_r‖² = Σ_{i >= r} σ_i²``. The Tucker error uses
    the ST-HOSVD identity ``‖x - \hat x‖² = Σ_n (discarded energy at step
    n)``; the first step reuses the eigendecomposition already computed for
    the spectra. For a matrix both errors come from its single spectrum
    (the best ``(R_0, R_1)`` Tucker approximation is the truncated SVD of
    rank ``min(R_0, R_1)``), so only one decomposition is computed; the
    Tucker form then always loses, by its ``R_0 R_1`` core entries. The
    spectra come from Gram matrices (see :func:`mode_spectra`), so errors
    below about ``sqrt(eps)`` of the input dtype are at rounding level.

    Examples
    --------
    >>> import numpy as np
    >>> from tuckerlib import tucker_vs_matrix
    >>> rng = np.random.default_rng(0)
    >>> factors = [np.linalg.qr(rng.standard_normal((12, 2)))[0] for _ in range(3)]
    >>> x = np.einsum("abc,ia,jb,kc->ijk", rng.standard_normal((2, 2, 2)), *factors)
    >>> result = tucker_vs_matrix(x, budget=80)
    >>> result["tucker_ranks"], result["matrix_rank"]
    ((2, 2, 2), 0)
    >>> result["tucker_error"] < 1e-6, result["matrix_error"]
    (True, 1.0)
    """
    xp, x = prepare_tensor(x)
    if x.ndim < 2:
        raise ValueError(f"x must have at least 2 modes, got shape {tuple(x.shape)}")
    budget = check_budget(budget)
    if x.ndim == 2:
        spectra = [to_host(s) for s in mode_spectra(x)]
        ranks = solve_budget(spectra, budget)
        tail = tail_energies(spectra[0])
        tucker_squared = float(tail[min(ranks)])
    else:
        pairs = [
            unfolding_spectrum(xp, fibre_matrix(xp, x, n), vectors=True) for n in range(x.ndim)
        ]
        spectra = [to_host(s) for s, _ in pairs]
        ranks = solve_budget(spectra, budget)
        order = default_order(x.shape, ranks)
        first = order[0]
        known = None if pairs[first][1] is None else {first: (pairs[first][1], spectra[first])}
        _, tucker_squared = sthosvd_steps(xp, x, ranks, order, "auto", known=known)
        tail = tail_energies(spectra[0])
    rows = x.shape[0]
    cols = math.prod(x.shape[1:])
    matrix_rank = min(budget // (rows + cols), rows, cols)
    total = float(tail[0])
    return {
        "tucker_error": _relative(tucker_squared, total),
        "tucker_ranks": tuple(ranks),
        "matrix_error": _relative(float(tail[matrix_rank]), total),
        "matrix_rank": int(matrix_rank),
        "budget": budget,
    }
