"""Tucker against a flattened low-rank matrix at the same parameter count."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import array_api_compat
import numpy as np

from tuckerlib._host import to_host
from tuckerlib._metrics import frobenius_norm
from tuckerlib._validation import as_list
from tuckerlib.analysis._budget import check_budget, solve_budget
from tuckerlib.analysis._inputs import check_spectrum
from tuckerlib.decompositions._for_analysis import (
    Prepared,
    prepare_tensor,
    sthosvd_relative_error,
    tail_energies,
    unfolding_spectra,
)

__all__ = ["tucker_vs_matrix"]


def _relative(squared_error: float, total: float) -> float:
    if total == 0.0:
        return 0.0
    return math.sqrt(min(max(squared_error / total, 0.0), 1.0))


def _given_spectra(spectra: Any, prepared: Prepared) -> list[np.ndarray]:
    r"""Host copies of ``mode_spectra(x)`` given by the caller, checked against ``x``.

    They are scaled like the prepared tensor, whose :math:`\|x\|` they must match.
    """
    expected = "a list of 1-D arrays (mode_spectra(x))"
    if array_api_compat.is_array_api_obj(spectra):
        raise TypeError(f"spectra must be {expected}, got an array of shape {spectra.shape}")
    given = as_list(spectra, "spectra", expected)
    host = [check_spectrum(s, f"spectra[{n}]") * prepared.scale for n, s in enumerate(given)]
    shape = tuple(int(d) for d in prepared.x.shape)
    lengths = tuple(len(s) for s in host)
    if lengths != shape:
        raise ValueError(
            f"spectra must hold one spectrum of length I_n per mode of x, i.e. lengths {shape}; "
            f"got lengths {lengths}"
        )
    _check_energies(host, prepared)
    return host


def _check_energies(host: list[np.ndarray], prepared: Prepared) -> None:
    r"""Every unfolding holds all entries of ``x``: each spectrum's energy must be :math:`\|x\|^2`.

    The tolerance follows ``x``'s dtype: the Gram route of
    :func:`mode_spectra` gets energies right to about ``eps`` times the
    mode size, and never closer than ``sqrt(eps)`` is asked for.
    """
    xp, x = prepared.xp, prepared.x
    eps = float(xp.finfo(x.dtype).eps)
    tolerance = max(math.sqrt(eps), 32 * max(x.shape) * eps)
    norm = frobenius_norm(x, xp) if prepared.norm2 is None else math.sqrt(prepared.norm2)
    for n, s in enumerate(host):
        top = float(s[0]) if len(s) else 0.0
        given = top * float(np.linalg.norm(s / top)) if top > 0.0 else 0.0
        ratio = given / norm if norm > 0.0 else (math.inf if given > 0.0 else 1.0)
        mismatch = abs(ratio * ratio - 1.0)
        if mismatch > tolerance:
            raise ValueError(
                f"spectra[{n}] does not belong to x: its energy gives a norm of {given:.6g} but "
                f"||x||_F = {norm:.6g} (relative energy difference {mismatch:.2g}, tolerance "
                f"{tolerance:.2g} for {x.dtype}); pass spectra=mode_spectra(x)"
            )


def tucker_vs_matrix(
    x: Any, budget: int, *, spectra: Sequence[Any] | None = None
) -> dict[str, Any]:
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
    spectra : list of 1-D arrays, optional
        The output of ``mode_spectra(x)`` when the caller already has it
        (any library; one descending spectrum of length ``I_n`` per mode):
        the ranks and the matrix error are then taken from it instead of
        being computed again. Each spectrum's energy :math:`\sum \sigma_i^2` must equal
        :math:`\|x\|^2` to a tolerance set by ``x``'s dtype (``sqrt(eps)``, or
        :math:`32 \cdot \max(I_n) \cdot \varepsilon` if larger), so the spectra of a tensor of
        another norm are refused rather than trusted. For a matrix nothing
        else is computed; for a tensor the ST-HOSVD for the Tucker error
        still runs.

    Returns
    -------
    dict
        ``"tucker_error"`` (float): relative error of the ST-HOSVD at
        ``"tucker_ranks"`` (tuple of int), the ranks chosen by
        :func:`ranks_for_budget`; ``"matrix_error"`` (float): relative error
        of the best rank-``"matrix_rank"`` (int) approximation of
        ``unfold(x, 0)``, with ``r`` the largest rank such that
        :math:`r \cdot (I_0 + \prod_{n>0} I_n) \le \text{budget}` (``0``, with error ``1.0``,
        when even rank 1 does not fit); ``"budget"`` (int). Errors are
        ``0.0`` for an all-zero tensor.

    Raises
    ------
    ValueError
        If ``x`` has fewer than 2 modes or holds NaN/inf, or ``budget`` is
        too small for rank 1 in every Tucker mode (the message gives the
        minimum), or ``spectra`` does not hold one valid spectrum of
        length ``I_n`` per mode of ``x`` whose energy is :math:`\|x\|^2`.
    TypeError
        If ``x`` is complex, ``budget`` is not an integer, or ``spectra`` is
        not a sequence of real 1-D arrays.

    See Also
    --------
    ranks_for_budget, sthosvd

    Notes
    -----
    The matrix error follows from the spectrum of ``unfold(x, 0)`` by
    Eckart-Young: :math:`\|A - A_r\|^2 = \sum_{i \ge r} \sigma_i^2`. The Tucker error uses
    the ST-HOSVD identity :math:`\|x - \hat x\|^2 = \sum_n (\text{discarded energy at step} n)`; the
    first step reuses the eigendecomposition already computed for
    the spectra. For a matrix both errors come from its single spectrum
    (the best ``(R_0, R_1)`` Tucker approximation is the truncated SVD of
    rank ``min(R_0, R_1)``), so only one decomposition is computed; the
    Tucker form then always loses, by its :math:`R_0 R_1` core entries. The
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

    With the spectra already at hand (as ``tuckerlib analyze`` has them):

    >>> from tuckerlib import mode_spectra
    >>> reused = tucker_vs_matrix(x, budget=80, spectra=mode_spectra(x))
    >>> reused["tucker_ranks"], reused["matrix_error"], reused["tucker_error"] < 1e-6
    ((2, 2, 2), 1.0, True)
    """
    prepared = prepare_tensor(x)
    if prepared.x.ndim < 2:
        raise ValueError(f"x must have at least 2 modes, got shape {tuple(prepared.x.shape)}")
    budget = check_budget(budget)
    shape = tuple(int(d) for d in prepared.x.shape)
    found = None
    if spectra is not None:
        host = _given_spectra(spectra, prepared)
    else:
        prepared, found = unfolding_spectra(prepared, vectors=len(shape) > 2)
        host = [to_host(s.values) for s in found]
    ranks = solve_budget(host, budget)
    tail = tail_energies(host[0])
    total = float(tail[0])
    if len(shape) == 2:
        tucker_error = _relative(float(tail[min(ranks)]), total)
    else:
        tucker_error = sthosvd_relative_error(prepared, ranks, found)
    rows = shape[0]
    cols = math.prod(shape[1:])
    matrix_rank = min(budget // (rows + cols), rows, cols)
    return {
        "tucker_error": tucker_error,
        "tucker_ranks": tuple(ranks),
        "matrix_error": _relative(float(tail[matrix_rank]), total),
        "matrix_rank": int(matrix_rank),
        "budget": budget,
    }
