"""The kernels the in-memory and the Dask decompositions share.

ST-HOSVD's steps (:func:`sthosvd_steps`), the HOSVD's factors
(:func:`hosvd_factors`) and HOOI's sweeps (:func:`iterate`) run on in-memory
arrays; :mod:`tuckerlib.decompositions._dask` runs them on the small
tensors its passes over the data leave, and the algorithms' modules
(``_hosvd``, ``_sthosvd``, ``_rhosvd``, ``_hooi``) call them directly.
This module imports neither, so no module of the package imports another
that imports it back; :mod:`tuckerlib.decompositions._route` decides which
of the two runs.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from types import ModuleType
from typing import Any

from tuckerlib._accumulate import matmul
from tuckerlib._host import host_float
from tuckerlib._layout import memory_order
from tuckerlib._products import mode_product
from tuckerlib.decompositions._factors import (
    FactorStep,
    Truncation,
    fibre_columns,
    fibre_matrix,
    mode_factor,
    unfibre,
)
from tuckerlib.decompositions._prepare import Prepared
from tuckerlib.decompositions._sketch import Sketch

__all__ = ["HOOIInfo", "Truncated", "hosvd_factors", "iterate", "sthosvd_steps", "sweep"]


@dataclass(frozen=True)
class Truncated:
    """An ST-HOSVD before it is handed back: core, factors (by mode) and each mode's step.

    ``steps`` follow the processing order and keep the spectra (not the
    projections), so :meth:`squared_error` can be read off them.
    """

    core: Any
    factors: tuple[Any, ...]
    steps: tuple[FactorStep, ...]

    def squared_error(self) -> float:
        r""":math:`\|x - \hat{x}\|^2`: the sum of the discarded energies.

        See [1]_ of :func:`sthosvd`, Thm. 5.1.

        ``nan`` when a step used a sketch, which computes no spectrum.
        """
        return sum(step.discarded() for step in self.steps)


def sthosvd_steps(
    xp: ModuleType,
    x: Any,
    order: Sequence[int],
    cuts: Sequence[Truncation],
    method: str,
    *,
    sketch: Sketch | None = None,
    first: FactorStep | None = None,
) -> Truncated:
    """Run ST-HOSVD in ``order``, truncating mode ``n`` by ``cuts[n]``.

    ``first``, when given, is the already computed step of the first mode
    in ``order`` (its factor and spectrum), so that work is not repeated.
    """
    core = x
    factors: list[Any] = [None] * x.ndim
    steps = []
    for n in order:
        # The fibre matrix serves both the factor and the projection: for a
        # mode in the middle of the memory order it is a copy, made once.
        layout = memory_order(core)
        a = fibre_matrix(xp, core, n, layout)
        if first is not None:
            step, first = first, None
        else:
            columns = fibre_columns(core.shape, n, layout)
            step = mode_factor(xp, a, method, cuts[n], sketch=sketch, columns=columns)
        projected = matmul(xp, step.factor.T, a) if step.projected is None else step.projected
        factors[n] = step.factor
        steps.append(replace(step, projected=None))
        shape = (*core.shape[:n], step.rank, *core.shape[n + 1 :])
        core = unfibre(xp, projected, n, shape, layout)
    return Truncated(core, tuple(factors), tuple(steps))


def hosvd_factors(prepared: Prepared, cuts: Sequence[Truncation], method: str) -> list[Any]:
    """Every mode's factor, each from the unfolding of ``x`` itself (eager input)."""
    xp, x = prepared.xp, prepared.x
    layout = memory_order(x)
    return [
        mode_factor(
            xp,
            fibre_matrix(xp, x, n, layout),
            method,
            cut,
            columns=fibre_columns(x.shape, n, layout),
        ).factor
        for n, cut in enumerate(cuts)
    ]


@dataclass(frozen=True)
class HOOIInfo:
    r"""Convergence record of :func:`hooi`.

    Parameters
    ----------
    errors : tuple of float
        Relative error :math:`\|x - \hat{x}\| / \|x\|` of the initialization (``errors[0]``)
        and after each sweep over all modes (``errors[k]``). It never
        increases, up to rounding at the level of ``sqrt(eps)``, because
        it is computed from :math:`\|x\|^2 - \|G\|^2`.
    converged : bool
        Whether a sweep changed the error by at most ``tol`` before
        ``max_iter`` sweeps were spent.
    n_iter : int
        Sweeps run, ``len(errors) - 1``.

    Examples
    --------
    >>> import numpy as np
    >>> from tuckerlib import hooi
    >>> x = np.random.default_rng(0).standard_normal((6, 7, 8))
    >>> _, info = hooi(x, 2, max_iter=3, tol=0.0, return_info=True)
    >>> info.n_iter, info.converged, len(info.errors)
    (3, False, 4)
    """

    #: Relative error of the initialization and after each sweep.
    errors: tuple[float, ...]
    #: Whether a sweep changed the error by at most ``tol``.
    converged: bool
    #: Number of sweeps run.
    n_iter: int


def _relative_error(norm2: float, core_norm2: float) -> float:
    if norm2 == 0.0:
        return 0.0
    return math.sqrt(max(norm2 - core_norm2, 0.0) / norm2)


def sweep(
    xp: ModuleType,
    project_all_but: Callable[[Sequence[Any], int], Any],
    factors: list[Any],
    order: Sequence[int],
) -> Any:
    """One HOOI sweep: update every factor in ``order`` (in place); return the new core.

    ``project_all_but(factors, n)`` is ``x`` projected onto every factor but
    the ``n``-th, in namespace ``xp``: the one pass over ``x`` a mode costs.
    """
    core = None
    for n in order:
        projected = project_all_but(factors, n)
        cut = Truncation(rank=factors[n].shape[1])
        factors[n] = mode_factor(xp, fibre_matrix(xp, projected, n), "auto", cut).factor
        core = mode_product(projected, factors[n], n, transpose=True)
    return core


def iterate(
    xp: ModuleType,
    project_all_but: Callable[[Sequence[Any], int], Any],
    start: tuple[Any, list[Any]],
    norm2: float,
    order: Sequence[int],
    stop: tuple[int, float],
) -> tuple[Any, list[Any], HOOIInfo]:
    """HOOI sweeps from ``start = (core, factors)`` until ``stop = (max_iter, tol)``.

    Returns the best core and factors (never worse than the start) and the record.
    """
    max_iter, tol = stop
    best_core, factors = start
    best_factors = list(factors)
    factors = list(factors)
    errors = [_relative_error(norm2, _squared(xp, best_core))]
    converged = False
    for _ in range(max_iter):
        core = sweep(xp, project_all_but, factors, order)
        errors.append(_relative_error(norm2, _squared(xp, core)))
        if errors[-1] < min(errors[:-1]):
            best_core, best_factors = core, list(factors)
        if abs(errors[-2] - errors[-1]) <= tol:
            converged = True
            break
    info = HOOIInfo(errors=tuple(errors), converged=converged, n_iter=len(errors) - 1)
    return best_core, best_factors, info


def _squared(xp: ModuleType, a: Any) -> float:
    return host_float(xp.sum(a * a))
