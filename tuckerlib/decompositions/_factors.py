"""One step of every decomposition: the factor of one mode-n unfolding.

Only the column space of an unfolding matters for a Tucker factor, and both
the singular values and the left singular vectors are invariant under a
permutation of the columns. So the "unfolding" used here is the cheapest
matrix whose columns are the mode-``n`` fibres in *some* order (a view for
the first and last modes), not necessarily the Kolda-Bader order.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import numpy as np

from tuckerlib._accumulate import gram, matmul
from tuckerlib._host import require_values, to_host
from tuckerlib._layout import inverse, memory_order
from tuckerlib._namespace import is_numpy
from tuckerlib.decompositions._linalg import left_singular, orthonormal, sign_fix
from tuckerlib.decompositions._prepare import Prepared
from tuckerlib.decompositions._sketch import Sketch, randomized_factor
from tuckerlib.decompositions._truncation import rank_for_threshold, tail_energies

__all__ = [
    "FactorStep",
    "Truncation",
    "choose_method",
    "eigen_factor",
    "fibre_columns",
    "fibre_matrix",
    "mode_factor",
    "truncations",
    "unfibre",
]

# "auto" only takes the Gram route when the tolerance asks for much more
# discarded energy than the eigenvalue rounding of the Gram matrix
# (about I_n * eps * ‖x‖²) could hide.
_GRAM_SAFETY = 10.0


@dataclass(frozen=True)
class Truncation:
    r"""How many columns a factor keeps.

    A fixed ``rank``, or (``rank=None``) the fewest columns whose discarded
    energy is at most ``threshold``. ``fraction`` is that threshold over
    :math:`\|x\|^2` (:math:`\text{tol}^2 / N`): how close to rounding level the target is,
    which decides the ``"auto"`` method.
    """

    rank: int | None = None
    threshold: float = 0.0
    fraction: float | None = None

    def rank_of(self, spectrum: Any, size: int) -> int:
        """The rank to keep, given the spectrum (read on the host only for a threshold)."""
        if self.rank is not None:
            return self.rank
        return rank_for_threshold(
            to_host(spectrum, "choosing ranks from tol"), self.threshold, size
        )


@dataclass(frozen=True)
class FactorStep:
    r"""The result of one factor step.

    Parameters
    ----------
    factor : array of shape (I_n, R_n)
        Orthonormal, sign-fixed leading left singular vectors.
    spectrum : array or None
        The unfolding's singular values, descending, in its library (a
        sketch computes none). Only the host reads of :meth:`discarded`
        and of a threshold rank move it off the device.
    projected : array or None
        :math:`\text{factor}^\top a` when the step produced it for free (a sketch);
        otherwise the caller projects.
    """

    factor: Any
    spectrum: Any = None
    projected: Any = None

    @property
    def rank(self) -> int:
        """The number of columns kept."""
        return int(self.factor.shape[1])

    def discarded(self) -> float:
        """Energy of the unfolding outside the factor's span; ``nan`` without a spectrum."""
        if self.spectrum is None:
            return math.nan
        return float(tail_energies(to_host(self.spectrum, "the discarded energy"))[self.rank])


def truncations(
    prepared: Prepared, ranks: Sequence[int] | None, tol: float | None
) -> list[Truncation]:
    r"""One :class:`Truncation` per mode: the fixed ``ranks``, or the per-mode share of ``tol``.

    With ``tol``, each mode may discard :math:`\text{tol}^2 \|x\|^2 / N` energy, so that
    the total (a sum over the modes for HOSVD and ST-HOSVD) stays within
    :math:`\text{tol}^2 \|x\|^2`. Needs :math:`\|x\|^2`, so a tracer under ``jax.jit`` is refused.
    """
    ndim = prepared.x.ndim
    if tol is None:
        return [Truncation(rank=r) for r in ranks]
    require_values(prepared.x, "choosing ranks from tol")
    fraction = tol * tol / ndim
    return [Truncation(threshold=fraction * prepared.norm2, fraction=fraction)] * ndim


def choose_method(method: str, rows: int, cols: int, eps: float, fraction: float | None) -> str:
    r"""The concrete method ``"svd"``, ``"gram"`` or ``"randomized"`` for one unfolding.

    ``"auto"`` picks ``"gram"`` unless a tolerance asks for a per-mode discarded fraction
    :math:`\text{tol}^2 / N` near the Gram's rounding level
    (:math:`< 10 \cdot \min(\text{rows}, \text{cols}) \cdot \varepsilon`), where it picks ``"svd"``.
    The Gram route always uses the Gram matrix of the *smaller* side (see :func:`mode_factor`).
    """
    if method == "auto":
        small = min(rows, cols)
        if fraction is not None and fraction < _GRAM_SAFETY * small * eps:
            return "svd"
        return "gram"
    return method


def fibre_matrix(xp: ModuleType, x: Any, mode: int, order: Sequence[int] | None = None) -> Any:
    r"""A :math:`(I_n, \prod_{k \ne n} I_k)` matrix whose columns are the mode-``n`` fibres.

    The columns follow the C order of the other modes taken in ``order``
    (default: :func:`~tuckerlib._layout.memory_order` of ``x``), which
    makes the matrix a view (no copy) when mode ``n`` is the outermost or
    innermost axis in memory: modes 0 and ``N - 1`` of a C-contiguous
    tensor, modes ``N - 1`` and 0 of a Fortran-ordered one. The column
    order differs from Kolda-Bader's :func:`~tuckerlib.unfold`, which
    leaves singular values and left singular vectors unchanged.
    """
    order = memory_order(x) if order is None else tuple(order)
    rows = x.shape[mode]
    cols = math.prod(x.shape) // rows if rows else 0
    if order[-1] == mode:
        return xp.reshape(_permuted(xp, x, order), (cols, rows)).T
    lead = (mode, *(k for k in order if k != mode))
    return xp.reshape(_permuted(xp, x, lead), (rows, cols))


def fibre_columns(
    shape: Sequence[int], mode: int, order: Sequence[int]
) -> tuple[tuple[int, int], ...]:
    """``(mode, size)`` of the modes indexing the columns of :func:`fibre_matrix`, in C order."""
    return tuple((k, shape[k]) for k in order if k != mode)


def unfibre(
    xp: ModuleType, matrix: Any, mode: int, shape: Sequence[int], order: Sequence[int]
) -> Any:
    """Inverse of :func:`fibre_matrix` with the same ``order``: the tensor of ``shape``."""
    if order[-1] == mode:
        layout, matrix = tuple(order), matrix.T
    else:
        layout = (mode, *(k for k in order if k != mode))
    permuted = xp.reshape(matrix, tuple(shape[k] for k in layout))
    return _permuted(xp, permuted, inverse(layout))


def _permuted(xp: ModuleType, x: Any, axes: Sequence[int]) -> Any:
    axes = tuple(axes)
    return x if axes == tuple(range(len(axes))) else xp.permute_dims(x, axes)


def mode_factor(
    xp: ModuleType,
    a: Any,
    method: str,
    cut: Truncation,
    *,
    sketch: Sketch | None = None,
    columns: Sequence[tuple[int, int]] | None = None,
) -> FactorStep:
    """The factor step of one unfolding ``a`` (rows: the mode; columns: its fibres).

    ``method`` is one of ``"auto"``, ``"svd"``, ``"gram"``, ``"randomized"``.
    ``columns`` (the modes indexing the columns of ``a``, see
    :func:`fibre_columns`) shapes the Khatri-Rao test matrix of a sketch;
    without it the test matrix is a plain Gaussian one.
    """
    rows, cols = a.shape
    eps = float(xp.finfo(a.dtype).eps)
    concrete = choose_method(method, rows, cols, eps, cut.fraction)
    if concrete == "randomized":
        if sketch is None:
            sketch = Sketch(oversample=10, power_iter=1, rng=np.random.default_rng(0))
        if cut.rank is not None and cut.rank + sketch.oversample < min(rows, cols):
            columns = ((0, cols),) if columns is None else tuple(columns)
            u, projected = randomized_factor(xp, a, cut.rank, sketch, columns)
            return FactorStep(u, None, projected)
        # A sketch as wide as the matrix saves nothing: decompose it exactly.
        concrete = choose_method("auto", rows, cols, eps, None)
    if concrete == "gram" and rows > cols and (cut.rank is None or cut.rank <= cols):
        v, spectrum = eigen_factor(xp, gram(xp, a.T), cut, rows)
        return FactorStep(sign_fix(xp, orthonormal(xp, matmul(xp, a, v))), spectrum)
    if concrete == "gram" and rows <= cols:
        u, spectrum = eigen_factor(xp, gram(xp, a), cut, rows)
        return FactorStep(sign_fix(xp, u), spectrum)
    u, s = left_singular(xp, a, "svd", cut.rank)
    return FactorStep(sign_fix(xp, u[:, : cut.rank_of(s, rows)]), s)


def eigen_factor(xp: ModuleType, gram: Any, cut: Truncation, size: int) -> tuple[Any, Any]:
    r"""Leading eigenvectors of a symmetric Gram matrix ``a aᵀ`` or ``aᵀ a``, and ``a``'s spectrum.

    The vectors come descending and truncated by ``cut`` (a threshold rank
    is clipped to ``size``, the mode's size); the spectrum holds the
    singular values of ``a`` (square roots of the eigenvalues). A tall
    ``a`` passes :math:`a^\top a` and gets the right singular vectors ``V_R``:
    :math:`a V_R = U_R \Sigma_R` has orthogonal columns, so its QR gives ``U_R``
    without dividing by small singular values, and a rank-deficient ``a``
    still gets an orthonormal basis.
    """
    if cut.rank is not None and _use_subset(xp, gram.shape[0], cut.rank):
        return _subset_eigh(gram, cut.rank)
    w, v = xp.linalg.eigh(gram)
    spectrum = descending_sqrt(xp, w)
    return xp.flip(v, axis=1)[:, : cut.rank_of(spectrum, size)], spectrum


def descending_sqrt(xp: ModuleType, w: Any) -> Any:
    """Singular values, descending, from the ascending eigenvalues of a Gram matrix."""
    # Rounding can leave the eigenvalues of zero singular values slightly negative.
    return xp.sqrt(xp.clip(xp.flip(w), min=0.0))


# SciPy's MRRR solver for only the top eigenpairs pays on large Gram
# matrices with a small rank (benchmarks/bench_decompositions.py: hosvd of a
# 2048 x 4000 float32 matrix at rank 16 about 2-5x faster, 1024 x 3000 about
# 3x); below that the full NumPy solver is as fast, and mixing the NumPy and
# SciPy wheels' separate OpenBLAS thread pools only adds jitter.
SUBSET_MIN_SIZE = 1024
SUBSET_MAX_FRACTION = 8


def _use_subset(xp: ModuleType, size: int, rank: int) -> bool:
    return is_numpy(xp) and size >= SUBSET_MIN_SIZE and rank * SUBSET_MAX_FRACTION <= size


def _subset_eigh(gram: np.ndarray, rank: int) -> tuple[np.ndarray, np.ndarray]:
    r"""Top ``rank`` eigenvectors of a NumPy Gram matrix (descending) and a spectrum stand-in.

    The stand-in holds the top ``rank`` singular values followed by one
    value carrying the rest of the energy (:math:`\text{trace} - \sum \text{top}`), which is all
    the callers use beyond the top values: the discarded energy.
    """
    import scipy.linalg

    size = gram.shape[0]
    w, v = scipy.linalg.eigh(gram, subset_by_index=[size - rank, size - 1], driver="evr")
    top = np.sqrt(np.clip(w[::-1].astype(np.float64), 0.0, None))
    rest = max(float(np.trace(gram, dtype=np.float64)) - float(np.sum(top**2)), 0.0)
    return v[:, ::-1], np.concatenate([top, [np.sqrt(rest)]])
