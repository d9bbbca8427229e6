"""Ranks read off a spectrum: energy thresholds, effective and stable rank."""

from __future__ import annotations

from typing import Any

import numpy as np

from tuckerlib.analysis._inputs import check_energy, check_spectrum, host_spectra

__all__ = ["effective_rank", "energy_rank", "energy_ranks", "stable_rank"]

# Cumulative sums of squares carry a few ulps of rounding; an energy target
# met to within this relative slack counts as met (so energy=1.0 ignores
# rounding-level singular values).
_SLACK = 16 * float(np.finfo(np.float64).eps)


def _unit_scaled(values: np.ndarray) -> np.ndarray:
    """``values`` divided by their largest entry, so squares neither overflow nor underflow."""
    top = float(np.max(values)) if values.size else 0.0
    return values / top if top > 0.0 else values


def energy_rank(s: np.ndarray, energy: float) -> int:
    r"""Smallest ``r >= 1`` with :math:`\sum_{i<r} s_i^2 \ge \text{energy} \cdot \sum_i s_i^2`."""
    kept = np.cumsum(np.square(s))
    if kept.size == 0 or kept[-1] == 0.0:
        return 1
    target = energy * kept[-1] * (1.0 - _SLACK)
    return max(1, int(np.searchsorted(kept, target, side="left")) + 1)


def energy_ranks(x_or_spectra: Any, energy: float = 0.99) -> tuple[int, ...]:
    r"""Smallest rank per mode that keeps a given fraction of the energy.

    Parameters
    ----------
    x_or_spectra : array or list of 1-D arrays
        A tensor (its :func:`mode_spectra` are computed), or the spectra
        themselves, one per mode. A ``list``, ``tuple`` or any other
        iterable that is not an array (a generator, read once) is always
        read as spectra.
    energy : float, optional
        Fraction of :math:`\sum_i \sigma_i^2` to keep, in (0, 1].

    Returns
    -------
    tuple of int
        :math:`R_n = min{r \ge 1 : \sum_{i<r} (\sigma^{(n)}_i)^2 \ge \text{energy} \cdot \|x\|^2}`
        per mode;
        ``1`` for a mode with zero energy. Non-decreasing in ``energy``.

    Raises
    ------
    ValueError
        If ``energy`` is outside (0, 1], a spectrum is not 1-D, empty,
        negative or non-finite, or the tensor has a mode of size 0 (or is
        invalid, as for :func:`mode_spectra`).
    TypeError
        If ``energy`` is not a real number, a spectrum holds complex or
        non-numeric values, or ``x_or_spectra`` is neither an array nor an
        iterable of spectra.

    See Also
    --------
    mode_spectra, ranks_for_budget

    Notes
    -----
    Truncating mode ``n`` alone at ``R_n`` leaves a relative error of at most
    ``sqrt(1 - energy)``; a truncated HOSVD at these ranks has relative
    error at most ``sqrt(N (1 - energy))``.

    Examples
    --------
    >>> import numpy as np
    >>> from tuckerlib import energy_ranks
    >>> energy_ranks([np.array([3.0, 2.0, 1.0]), np.array([1.0, 0.0])], energy=0.9)
    (2, 1)
    """
    energy = check_energy(energy)
    return tuple(energy_rank(s, energy) for s in host_spectra(x_or_spectra))


def effective_rank(s: Any) -> float:
    r"""Effective rank of a spectrum (Roy & Vetterli 2007).

    Parameters
    ----------
    s : 1-D array or sequence of float
        Non-negative singular values, of any array library.

    Returns
    -------
    float
        ``exp(H(p))`` with :math:`p_i = \sigma_i / \sum_j \sigma_j` and the Shannon entropy
        :math:`H(p) = -\sum_i p_i \log p_i` (``0 log 0 = 0``): between 1 and the
        number of nonzero values, equal to ``k`` for ``k`` equal nonzero
        values. ``0.0`` for an all-zero (or empty) spectrum.

    Raises
    ------
    ValueError
        If ``s`` is not 1-D, or holds negative or non-finite values.
    TypeError
        If ``s`` holds complex, boolean or non-numeric values, or is not a
        sequence at all (a string, ``None``).

    See Also
    --------
    stable_rank : A rank measure dominated by the largest values.

    Notes
    -----
    The values are divided by the largest one first, so a spectrum near the
    top (``1e308``) or the bottom (subnormal) of the float64 range gives
    the same result as its rescaled copy.

    References
    ----------
    .. [1] O. Roy and M. Vetterli, "The effective rank: a measure of
       effective dimensionality", 15th European Signal Processing
       Conference (EUSIPCO), 606-610, 2007.

    Examples
    --------
    >>> from tuckerlib import effective_rank
    >>> effective_rank([1.0, 1.0, 1.0, 0.0])
    3.0
    >>> round(effective_rank([3.0, 1.0]), 4)
    1.7548
    """
    values = _unit_scaled(check_spectrum(s, "s"))
    total = values.sum()
    if total == 0.0:
        return 0.0
    p = values / total
    # Subnormal values can underflow to p = 0, which contributes 0 log 0 = 0.
    p = p[p > 0.0]
    return float(np.exp(-np.sum(p * np.log(p))))


def stable_rank(s: Any) -> float:
    r"""Stable (numerical) rank of a spectrum, :math:`\|s\|^2 / \sigma_{\max}^2`.

    Parameters
    ----------
    s : 1-D array or sequence of float
        Non-negative singular values, of any array library.

    Returns
    -------
    float
        :math:`\sum_i \sigma_i^2 / \max_i \sigma_i^2`, the squared Frobenius over squared
        spectral norm of the matrix: between 1 and the rank, and ``0.0`` for
        an all-zero (or empty) spectrum.

    Raises
    ------
    ValueError
        If ``s`` is not 1-D, or holds negative or non-finite values.
    TypeError
        If ``s`` holds complex, boolean or non-numeric values, or is not a
        sequence at all.

    See Also
    --------
    effective_rank

    Examples
    --------
    >>> from tuckerlib import stable_rank
    >>> stable_rank([2.0, 1.0, 1.0])
    1.5
    """
    values = check_spectrum(s, "s")
    if values.size == 0 or values[0] == 0.0:
        return 0.0
    return float(np.sum(np.square(values / values[0])))
