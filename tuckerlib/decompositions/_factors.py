"""Leading left singular vectors of a mode-n unfolding.

Only the column space of an unfolding matters for a Tucker factor, and both
the singular values and the left singular vectors are invariant under a
permutation of the columns. So the "unfolding" used here is the cheapest
matrix whose columns are the mode-``n`` fibres in *some* order (a view for
the first and last modes), not necessarily the Kolda-Bader order.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from types import ModuleType
from typing import Any

import numpy as np

from tuckerlib._layout import inverse, memory_order
from tuckerlib._namespace import is_numpy
from tuckerlib.decompositions._common import rank_for_threshold, to_host
from tuckerlib.decompositions._linalg import left_singular, orthonormal, sign_fix
from tuckerlib.decompositions._sketch import Sketch, randomized_factor

__all__ = [
    "METHODS",
    "check_method",
    "choose_method",
    "fibre_columns",
    "fibre_matrix",
    "mode_factor",
    "unfibre",
]

METHODS = ("auto", "svd", "gram", "randomized")

# "auto" only takes the Gram route when the tolerance asks for much more
# discarded energy than the eigenvalue rounding of the Gram matrix
# (about I_n * eps * ‖x‖²) could hide.
_GRAM_SAFETY = 10.0


def check_method(method: Any) -> str:
    """Return ``method`` if it is one of :data:`METHODS`."""
    if method not in METHODS:
        raise ValueError(f"method must be one of {', '.join(map(repr, METHODS))}; got {method!r}")
    return method


def choose_method(
    method: str, rows: int, cols: int, eps: float, tol: float | None, ndim: int
) -> str:
    """The concrete method ``"svd"``, ``"gram"`` or ``"randomized"`` for one unfolding.

    ``"auto"`` picks ``"gram"`` unless a tolerance is given that comes near
    the Gram's rounding level (``tol² / N < 10 · min(rows, cols) · eps``),
    where it picks ``"svd"``. The Gram route always uses the Gram matrix of
    the *smaller* side (see :func:`mode_factor`).
    """
    if method == "randomized":
        return method
    if method == "auto":
        small = min(rows, cols)
        if tol is not None and tol * tol / ndim < _GRAM_SAFETY * small * eps:
            return "svd"
        return "gram"
    return method


def fibre_matrix(xp: ModuleType, x: Any, mode: int, order: Sequence[int] | None = None) -> Any:
    """A ``(I_n, prod_{k != n} I_k)`` matrix whose columns are the mode-``n`` fibres.

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
    *,
    rank: int | None = None,
    threshold: float | None = None,
    tol: float | None = None,
    ndim: int = 1,
    sketch: Sketch | None = None,
    columns: Sequence[tuple[int, int]] | None = None,
) -> tuple[Any, np.ndarray | None, Any]:
    """The sign-fixed factor ``u`` of one unfolding, its host spectrum, and ``uᵀ a``.

    Either ``rank`` is given, or the smallest rank whose discarded energy is
    at most ``threshold`` is used. A factor from a sketch comes with no
    spectrum (``None``) but with the projected unfolding ``uᵀ a`` for free;
    otherwise the third value is ``None``. ``columns`` (the modes indexing
    the columns of ``a``, see :func:`fibre_columns`) shapes the Khatri-Rao
    test matrix of a sketch; without it the test matrix is a plain Gaussian
    one.
    """
    rows, cols = a.shape
    eps = float(xp.finfo(a.dtype).eps)
    concrete = choose_method(method, rows, cols, eps, tol, ndim)
    if concrete == "randomized":
        if sketch is None:
            sketch = Sketch(oversample=10, power_iter=1, rng=np.random.default_rng(0))
        if rank is not None and rank + sketch.oversample < min(rows, cols):
            columns = ((0, cols),) if columns is None else tuple(columns)
            u, projected = randomized_factor(xp, a, rank, sketch, columns)
            return u, None, projected
        # A sketch as wide as the matrix saves nothing: decompose it exactly.
        concrete = choose_method("auto", rows, cols, eps, None, ndim)
    threshold = 0.0 if threshold is None else threshold
    if concrete == "gram" and rows > cols and (rank is None or rank <= cols):
        return (*_tall_gram_factor(xp, a, rank, threshold), None)
    if concrete == "gram" and rank is not None and _use_subset(xp, rows, rank):
        u, spectrum = _subset_eigh(a @ a.T, rank)
        return sign_fix(xp, u), spectrum, None
    u, s = left_singular(xp, a, concrete, rank)
    spectrum = to_host(s)
    if rank is None:
        rank = rank_for_threshold(spectrum, threshold, rows)
    return sign_fix(xp, u[:, :rank]), spectrum, None


def _tall_gram_factor(
    xp: ModuleType, a: Any, rank: int | None, threshold: float
) -> tuple[Any, np.ndarray]:
    """Factor of a tall ``a`` from the small Gram matrix ``aᵀ a`` of its columns.

    With ``aᵀ a = V Σ² Vᵀ``, ``a V_R = U_R Σ_R`` has orthogonal columns, so
    its QR gives ``U_R`` (up to signs) without dividing by small singular
    values; a rank-deficient ``a`` still gets an orthonormal basis.
    """
    gram = a.T @ a
    if rank is not None and _use_subset(xp, a.shape[1], rank):
        v, spectrum = _subset_eigh(gram, rank)
    else:
        w, v = xp.linalg.eigh(gram)
        v = xp.flip(v, axis=1)
        spectrum = to_host(xp.sqrt(xp.clip(xp.flip(w), min=0.0)))
    if rank is None:
        rank = rank_for_threshold(spectrum, threshold, a.shape[1])
    u = orthonormal(xp, a @ v[:, :rank])
    return sign_fix(xp, u), spectrum


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
    """Top ``rank`` eigenvectors of a NumPy Gram matrix (descending) and a spectrum stand-in.

    The stand-in holds the top ``rank`` singular values followed by one
    value carrying the rest of the energy (``trace − Σ top``), which is all
    the callers use beyond the top values: the discarded energy.
    """
    import scipy.linalg

    size = gram.shape[0]
    w, v = scipy.linalg.eigh(gram, subset_by_index=[size - rank, size - 1], driver="evr")
    top = np.sqrt(np.clip(w[::-1].astype(np.float64), 0.0, None))
    rest = max(float(np.trace(gram, dtype=np.float64)) - float(np.sum(top**2)), 0.0)
    return v[:, ::-1], np.concatenate([top, [np.sqrt(rest)]])
