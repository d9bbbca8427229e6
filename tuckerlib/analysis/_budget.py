"""Tucker ranks that keep the most energy within a parameter budget."""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping
from typing import Any

import numpy as np

from tuckerlib._ranks import tucker_params
from tuckerlib._validation import as_int, as_list, check_int, check_mode
from tuckerlib.analysis._inputs import check_sizes, host_spectra, shape_of

__all__ = ["check_budget", "ranks_for_budget"]

# Up to this many rank combinations of the enumerated modes are searched
# exhaustively (a few vectorized arrays of this size); beyond it, the best
# point of an evenly thinned grid of this size is refined by a coordinate
# search over two modes at a time.
SEARCH_LIMIT = 1 << 21
_TIE = 1e-12
# The search counts parameters in int64; a tensor beyond this many full-rank
# Tucker parameters would overflow it.
MAX_PARAMS = 1 << 62


def check_budget(budget: Any) -> int:
    """Return ``budget`` as an integer >= 1."""
    return check_int(budget, "budget", 1, "an integer number of parameters")


def _check_fixed(fixed: Any, shape: tuple[int, ...]) -> list[int | None]:
    ndim = len(shape)
    pinned: list[int | None] = [None] * ndim
    if fixed is None:
        return pinned
    if isinstance(fixed, Mapping):
        items = _pinned_items(fixed, ndim)
    else:
        entries = as_list(
            fixed, "fixed", "a dict {mode: rank} or a sequence with one rank or None per mode"
        )
        if len(entries) != ndim:
            raise ValueError(
                f"fixed has {len(entries)} entries but the tensor has {ndim} modes (shape {shape})"
            )
        items = [(n, r) for n, r in enumerate(entries) if r is not None]
    for n, r in items:
        value = as_int(r, f"fixed rank of mode {n}")
        if not 1 <= value <= shape[n]:
            raise ValueError(f"fixed rank of mode {n} is {value}, outside [1, {shape[n]}]")
        pinned[n] = value
    return pinned


def _pinned_items(fixed: Mapping[Any, Any], ndim: int) -> list[tuple[int, Any]]:
    """``(mode, rank)`` pairs of a dict with negative modes normalized; no mode twice."""
    items: dict[int, tuple[Any, Any]] = {}
    for key, rank in fixed.items():
        mode = check_mode(key, ndim, "fixed mode")
        if mode in items:
            raise ValueError(
                f"fixed pins mode {mode} twice (keys {items[mode][0]!r} and {key!r} name the same "
                f"mode of a {ndim}-mode tensor)"
            )
        items[mode] = (key, rank)
    return [(mode, rank) for mode, (_, rank) in items.items()]


def _kept(s: np.ndarray) -> np.ndarray:
    r""":math:`\text{kept}[r] = \sum_{i<r} s_i^2` for ``r = 0..len(s)``."""
    return np.concatenate([[0.0], np.cumsum(np.square(s))])


def _log_fraction(kept: np.ndarray) -> np.ndarray:
    """``log(kept[r] / kept[-1])``: the log of the fraction a mode keeps at rank ``r``.

    Rank 0 is never chosen (``-inf``); a mode without energy keeps all of it.
    """
    if kept[-1] <= 0.0:
        return np.zeros_like(kept)
    with np.errstate(divide="ignore"):
        return np.log(kept / kept[-1])


def _smallest_equivalent(kept: np.ndarray, r: int, total: float) -> int:
    """Smallest rank keeping the same energy as ``r`` (to rounding)."""
    same = np.flatnonzero(kept[: r + 1] >= kept[r] - _TIE * total)
    return max(1, int(same[0]))


def _matrix_ranks(
    kept: np.ndarray, shape: tuple[int, ...], pinned: list[int | None], budget: int, total: float
) -> tuple[int, ...]:
    # For a matrix, the best (R_0, R_1) approximation is the rank-min(R_0, R_1)
    # truncated SVD (Eckart-Young): a rank above the other one is wasted, so
    # optimize the true error, not the per-mode surrogate.
    rows, cols = shape
    if pinned[0] is not None and pinned[1] is not None:
        return (pinned[0], pinned[1])
    if pinned[0] is None and pinned[1] is None:
        r = min(rows, cols)
        while r * r + r * (rows + cols) > budget:
            r -= 1
        r = _smallest_equivalent(kept, r, total)
        return (r, r)
    p = 0 if pinned[0] is not None else 1
    q = 1 - p
    a = pinned[p]
    assert a is not None
    r = min(a, shape[q], (budget - shape[p] * a) // (a + shape[q]))
    r = _smallest_equivalent(kept, r, total)
    return (a, r) if p == 0 else (r, a)


class _Problem:
    r""":math:`\max \sum_n \log f_n(R_n)` subject to ``tucker_params(shape, R) <= budget``."""

    def __init__(
        self,
        kept: list[np.ndarray],
        shape: tuple[int, ...],
        pinned: list[int | None],
        budget: int,
        total: float,
    ) -> None:
        free = [n for n in range(len(shape)) if pinned[n] is None]
        # The largest free mode gets its rank in closed form: the rest fixed,
        # parameters are linear in it and its kept energy increases with it.
        self.last = max(free, key=lambda n: (shape[n], -n))
        self.enumerated = [n for n in free if n != self.last]
        fixed = [n for n in range(len(shape)) if pinned[n] is not None]
        self.fixed_prod = math.prod(pinned[n] for n in fixed)  # type: ignore[misc]
        self.fixed_max = max((pinned[n] for n in fixed), default=1)  # type: ignore[type-var]
        self.fixed_sum = sum(shape[n] * pinned[n] for n in fixed)  # type: ignore[operator]
        self.score = [_log_fraction(k) for k in kept]
        self.fixed_energy = sum(self.score[n][pinned[n]] for n in fixed)
        self.shape, self.pinned = shape, pinned
        last = kept[self.last]
        # equivalent[r]: the smallest rank of the closed-form mode keeping the
        # energy of rank r, so flat (e.g. zero-padded) tails cost nothing.
        self.equivalent = np.array([_smallest_equivalent(last, r, total) for r in range(len(last))])
        self.budget = budget

    def best(self, choices: list[np.ndarray]) -> tuple[dict[int, int], float, int]:
        r"""Best ranks over the grid ``choices`` (one 1-D array per enumerated mode).

        Only usable ranks count, no rank above the product of the others
        (a Tucker tensor cannot use it: :math:`R_n^2 \le \prod_m R_m`), unless the
        grid holds no usable point within the budget.
        """
        k = len(choices)
        prod = np.full((1,) * k, self.fixed_prod, dtype=np.int64)
        used = np.full((1,) * k, self.fixed_sum, dtype=np.int64)
        energy = np.full((1,) * k, self.fixed_energy)
        biggest = np.full((1,) * k, self.fixed_max, dtype=np.int64)
        for axis, (n, r) in enumerate(zip(self.enumerated, choices, strict=True)):
            r = r.reshape((1,) * axis + (-1,) + (1,) * (k - axis - 1))
            prod = prod * r
            used = used + self.shape[n] * r
            energy = energy + self.score[n][r]
            biggest = np.maximum(biggest, r)
        size = self.shape[self.last]
        affordable = np.minimum((self.budget - used) // (prod + size), size)
        usable = self._complete(prod, used, energy, np.minimum(affordable, prod), biggest)
        if np.isfinite(usable[1]).any():
            return self._pick(choices, *usable)
        return self._pick(choices, *self._complete(prod, used, energy, affordable, None))

    def _complete(
        self,
        prod: np.ndarray,
        used: np.ndarray,
        energy: np.ndarray,
        r_last: np.ndarray,
        biggest: np.ndarray | None,
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The closed-form mode's rank, each point's energy and parameters.

        With ``biggest`` (the largest other rank) a point that is not usable
        scores ``-inf``, like one over the budget.
        """
        size = self.shape[self.last]
        feasible = r_last >= 1
        r_last = self.equivalent[np.clip(r_last, 0, size)]
        if biggest is not None:
            feasible = feasible & (biggest * biggest <= prod * r_last)
        energy = np.where(feasible, energy + self.score[self.last][r_last], -np.inf)
        params = prod * r_last + used + size * r_last
        return r_last, energy, params

    def _pick(
        self, choices: list[np.ndarray], r_last: np.ndarray, energy: np.ndarray, params: np.ndarray
    ) -> tuple[dict[int, int], float, int]:
        """The point of most energy, the fewest parameters among equals."""
        top = energy.max()
        # Scores are logs of kept fractions: equal to rounding means equal energy.
        params = np.where(energy >= top - _TIE, params, np.iinfo(np.int64).max)
        index = np.unravel_index(int(np.argmin(params)), params.shape)
        ranks = {n: int(c[i]) for n, c, i in zip(self.enumerated, choices, index, strict=True)}
        ranks[self.last] = int(np.broadcast_to(r_last, params.shape)[index])
        return ranks, float(energy[index]), int(params[index])

    def exhaustive(self) -> dict[int, int]:
        return self.best([np.arange(1, self.shape[n] + 1) for n in self.enumerated])[0]

    def coarse(self, limit: int) -> dict[int, int]:
        """Best ranks over an evenly thinned grid of at most ``limit`` points."""
        per_mode = max(2, int(limit ** (1.0 / len(self.enumerated))))
        choices = [
            np.unique(np.linspace(1, self.shape[n], per_mode).round().astype(np.int64))
            for n in self.enumerated
        ]
        return self.best(choices)[0]

    def coordinate(self, start: dict[int, int]) -> dict[int, int]:
        """Improve ``start`` over two enumerated modes at a time until nothing changes."""
        current = {m: start[m] for m in self.enumerated}
        groups = list(itertools.combinations(self.enumerated, 2)) or [(m,) for m in self.enumerated]
        score = (-np.inf, 0)
        for _ in range(100):
            previous = score
            for group in groups:
                choices = [
                    np.arange(1, self.shape[m] + 1) if m in group else np.array([current[m]])
                    for m in self.enumerated
                ]
                ranks, energy, params = self.best(choices)
                current = {m: ranks[m] for m in self.enumerated}
                score = (energy, -params)
            if score <= previous:
                break
        return self.best([np.array([current[m]]) for m in self.enumerated])[0]

    def solve(self, limit: int) -> tuple[int, ...]:
        grid = math.prod(self.shape[n] for n in self.enumerated)
        ranks = self.exhaustive() if grid <= limit else self.coordinate(self.coarse(limit))
        return tuple(
            self.pinned[n] if self.pinned[n] is not None else ranks[n]  # type: ignore[misc]
            for n in range(len(self.shape))
        )


def solve_budget(
    spectra: list[np.ndarray], budget: int, fixed: Any = None, *, limit: int = SEARCH_LIMIT
) -> tuple[int, ...]:
    """:func:`ranks_for_budget` on validated host spectra."""
    shape = shape_of(spectra)
    check_sizes(shape, "x")
    pinned = _check_fixed(fixed, shape)
    floor = tuple(1 if p is None else p for p in pinned)
    minimum = tucker_params(shape, floor)
    if budget < minimum:
        raise ValueError(
            f"budget={budget} is too small for shape {shape}: ranks {floor} (rank 1 in every "
            f"free mode) already need {minimum} parameters; the minimum budget is {minimum}"
        )
    # Any budget beyond full ranks buys nothing more.
    full = tucker_params(shape, tuple(shape))
    budget = min(budget, full)
    if len(shape) > 2 and full >= MAX_PARAMS:
        raise ValueError(
            f"shape {shape} is too large for the rank search: full ranks need {full} parameters, "
            f"more than 2**62"
        )
    # Only energy fractions matter: one common scale keeps the squares finite.
    top = max(float(np.max(s)) if len(s) else 0.0 for s in spectra)
    if top > 0.0:
        spectra = [s / top for s in spectra]
    kept = [_kept(s) for s in spectra]
    total = max(float(k[-1]) for k in kept)
    if all(p is not None for p in pinned):
        return floor
    if len(shape) == 2:
        return _matrix_ranks(kept[0], shape, pinned, budget, total)
    return _Problem(kept, shape, pinned, budget, total).solve(limit)


def ranks_for_budget(x_or_spectra: Any, budget: int, *, fixed: Any = None) -> tuple[int, ...]:
    r"""Tucker ranks that keep the most energy within a parameter budget.

    Parameters
    ----------
    x_or_spectra : array or list of 1-D arrays
        A tensor (its :func:`mode_spectra` are computed), or its zero-padded
        mode spectra (a ``list``, ``tuple`` or other iterable that is not an
        array is always read as spectra; the lengths give the shape).
    budget : int
        Maximum number of Tucker parameters,
        :math:`\text{tucker\_params}(\text{shape}, \text{ranks}) = \prod_n R_n + \sum_n I_n R_n`. A
        budget
        above that of full ranks, however large, allows full ranks.
    fixed : dict or sequence, optional
        Ranks to pin: a ``dict`` ``{mode: rank}`` (negative modes count from
        the end; two keys naming one mode are an error) or a sequence of one
        rank or ``None`` (free) per mode, e.g. ``{2: 3, 3: 3}`` to keep the
        kernel modes of a 3×3 convolution full.

    Returns
    -------
    tuple of int
        One rank per mode, ``tucker_params(shape, ranks) <= budget``, and
        usable: no rank above the product of the others (see Notes).

    Raises
    ------
    ValueError
        If ``budget`` is below ``tucker_params`` of rank 1 in every free mode
        (the message gives that minimum), a fixed rank is outside
        ``[1, I_n]`` or its mode out of range or pinned twice, a mode has
        size 0, or the input is invalid.
    TypeError
        If ``budget`` or a fixed rank is not an integer, ``fixed`` is
        neither a dict nor a sequence, or a spectrum is not real.

    See Also
    --------
    tucker_params, energy_ranks, tucker_vs_matrix

    Notes
    -----
    For ``N >= 3`` modes the energy that ranks ``R`` keep is estimated by
    the product of the fractions each mode keeps,

    .. math:: \max_{R} \prod_n f_n(R_n), \qquad
              f_n(R_n) = \frac{\sum_{i < R_n} (\sigma^{(n)}_i)^2}{\|x\|^2}
              \quad\text{s.t.}\quad \prod_n R_n + \sum_n I_n R_n \le B,

    which is exact when the tensor's energy is spread independently over
    its modes (e.g. a Gaussian core) and equals 1 at any ranks that contain
    a planted multilinear rank. It is maximized as a sum of logs. Unlike the
    additive surrogate :math:`\sum_n f_n` (``N`` minus the relative HOSVD error
    bound), it heavily penalizes a mode that keeps little, as it should: the
    error of any Tucker approximation is at least what its worst mode
    discards. On
    the example network's convolutions and on random tensors the product
    gave a lower ST-HOSVD error at 26 of 40 budgets and a higher one at
    none (``benchmarks/bench_rank_objective.py``). The free mode of largest
    size gets its rank in closed form (its kept fraction increases with it
    and the parameter count is linear in it); all combinations of the other
    free modes are searched exhaustively when there are at most ``2**21`` of
    them (e.g. 2 304 for a 256×256×3×3 convolution), and by a coordinate
    search otherwise. Among equal energies the fewest parameters win.

    Only usable ranks are considered, :math:`R_n \le \prod_{m \ne n} R_m`: the core's
    mode-``n`` unfolding has rank at most the product of the other ranks,
    so a larger ``R_n`` pays for factor columns that no core entry reaches,
    while the surrogate, which reads the spectra of ``x``, would count their
    energy. With kernel ranks pinned to 1, for example, the two channel
    ranks come out equal. Only when the pinned ranks leave no usable choice
    within the budget is the best unusable one returned.

    For a matrix (``N = 2``) the surrogate would be misleading: both modes
    share one spectrum, and the best ``(R_0, R_1)`` Tucker approximation is
    the truncated SVD of rank ``min(R_0, R_1)`` (Eckart-Young), so a rank
    above the other is wasted. The exact optimum is then :math:`R_0 = R_1 = r`
    with the largest ``r`` such that :math:`r^2 + r (I_0 + I_1) \le B` (with a
    pinned mode, the free one gets ``min(pinned, largest feasible)``).

    Examples
    --------
    >>> import numpy as np
    >>> from tuckerlib import ranks_for_budget, tucker_params
    >>> rng = np.random.default_rng(0)
    >>> x = rng.standard_normal((16, 8, 3, 3))
    >>> ranks = ranks_for_budget(x, 400, fixed={2: 3, 3: 3})
    >>> ranks[2:], tucker_params(x.shape, ranks) <= 400
    ((3, 3), True)
    >>> ranks_for_budget(np.eye(10), 69)  # 3² + 3 · (10 + 10) = 69
    (3, 3)
    """
    budget = check_budget(budget)
    return solve_budget(host_spectra(x_or_spectra), budget, fixed)
