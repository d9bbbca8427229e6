"""Energy arithmetic on host spectra: discarded energies, ranks from thresholds, mode order."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

__all__ = ["default_order", "rank_for_threshold", "tail_energies"]


def tail_energies(s: np.ndarray) -> np.ndarray:
    r""":math:`\text{tail}[r] = \sum_{i \ge r} s_i^2`, ``r = 0..len(s)`` (``tail[len(s)] = 0``)."""
    squares = np.square(s)
    tail = np.zeros(len(s) + 1)
    tail[:-1] = np.cumsum(squares[::-1])[::-1]
    return tail


def rank_for_threshold(s: np.ndarray, threshold: float, size: int) -> int:
    r"""Smallest rank ``r >= 1`` whose tail energy :math:`\sum_{i \ge r} s_i^2` is <= threshold."""
    tail = tail_energies(s)
    admissible = np.flatnonzero(tail <= threshold)
    rank = int(admissible[0]) if admissible.size else len(s)
    return max(1, min(rank, size))


def default_order(shape: Sequence[int], ranks: Sequence[int] | None) -> tuple[int, ...]:
    """The mode order ST-HOSVD uses when none is given.

    Largest size reduction :math:`I_n / R_n` first (Vannieuwenhoven et al. 2012,
    §6.2: shrinking the tensor early makes every later step cheaper); with
    ranks still unknown (``tol``), largest mode first. Ties keep mode order.
    """
    if ranks is None:
        return tuple(sorted(range(len(shape)), key=lambda n: (-shape[n], n)))
    return tuple(sorted(range(len(shape)), key=lambda n: (-shape[n] / ranks[n], n)))
