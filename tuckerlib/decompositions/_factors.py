"""Leading left singular vectors of a mode-n unfolding.

Only the column space of an unfolding matters for a Tucker factor, and both
the singular values and the left singular vectors are invariant under a
permutation of the columns. So the "unfolding" used here is the cheapest
matrix whose columns are the mode-``n`` fibres in *some* order (a view for
the first and last modes), not necessarily the Kolda-Bader order.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import array_api_compat
import numpy as np

from tuckerlib._namespace import is_numpy
from tuckerlib.decompositions._common import rank_for_threshold, to_host

__all__ = [
    "METHODS",
    "Sketch",
    "check_method",
    "choose_method",
    "fibre_matrix",
    "left_singular",
    "mode_factor",
    "randomized_factor",
    "sign_fix",
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


def fibre_matrix(xp: ModuleType, x: Any, mode: int) -> Any:
    """A ``(I_n, prod_{k != n} I_k)`` matrix whose columns are the mode-``n`` fibres.

    Mode 0 and the last mode are views (no copy); the columns are in a
    different order than Kolda-Bader's :func:`~tuckerlib.unfold`, which
    leaves singular values and left singular vectors unchanged.
    """
    shape = tuple(x.shape)
    rows = shape[mode]
    cols = math.prod(shape) // rows if rows else 0
    if mode == 0:
        return xp.reshape(x, (rows, cols))
    if mode == len(shape) - 1:
        return xp.reshape(x, (cols, rows)).T
    order = (mode, *(k for k in range(len(shape)) if k != mode))
    return xp.reshape(xp.permute_dims(x, order), (rows, cols))


def unfibre(xp: ModuleType, matrix: Any, mode: int, shape: tuple[int, ...]) -> Any:
    """Inverse of :func:`fibre_matrix`: the tensor of ``shape`` with those mode fibres."""
    ndim = len(shape)
    if mode == 0:
        return xp.reshape(matrix, shape)
    if mode == ndim - 1:
        return xp.reshape(matrix.T, shape)
    order = (mode, *(k for k in range(ndim) if k != mode))
    permuted = xp.reshape(matrix, tuple(shape[k] for k in order))
    return xp.permute_dims(permuted, tuple(order.index(k) for k in range(ndim)))


def sign_fix(xp: ModuleType, u: Any) -> Any:
    """Flip columns so the entry of largest magnitude in each is positive."""
    rows = u.shape[0]
    pivot_rows = xp.argmax(xp.abs(u), axis=0)
    index = xp.arange(rows, device=array_api_compat.device(u))
    hit = xp.reshape(index, (rows, 1)) == xp.reshape(pivot_rows, (1, -1))
    pivots = xp.sum(xp.where(hit, u, xp.zeros_like(u)), axis=0)
    ones = xp.ones_like(pivots)
    return u * xp.where(pivots < 0, -ones, ones)


def left_singular(xp: ModuleType, a: Any, method: str, rank: int | None = None) -> tuple[Any, Any]:
    """All left singular vectors and values of ``a``, in descending order.

    Parameters
    ----------
    xp : module
        The array namespace.
    a : array of shape (rows, cols)
        The unfolding.
    method : {"svd", "gram"}
        ``"gram"`` (only used for ``rows <= cols``) eigendecomposes ``a @ a.T``.
    rank : int, optional
        The number of columns the caller will keep; a tall ``a`` with
        ``rank > cols`` gets a full square basis.

    Returns
    -------
    u : array of shape (rows, K)
        Orthonormal columns, ``K = rows`` unless ``a`` is tall (then ``cols``,
        or ``rows`` when ``rank > cols``).
    s : array of shape (K,)
        Singular values (zero beyond ``min(rows, cols)``).
    """
    rows, cols = a.shape
    if method == "gram":
        w, v = xp.linalg.eigh(a @ a.T)
        # eigh sorts ascending; rounding can leave tiny negative eigenvalues.
        s = xp.sqrt(xp.clip(xp.flip(w), min=0.0))
        return xp.flip(v, axis=1), s
    full = rank is not None and rank > min(rows, cols)
    u, s, _ = xp.linalg.svd(a, full_matrices=full)
    if s.shape[0] < u.shape[1]:
        pad = xp.zeros(u.shape[1] - s.shape[0], dtype=s.dtype, device=array_api_compat.device(s))
        s = xp.concat([s, pad])
    return u, s


def _orthonormal(xp: ModuleType, y: Any) -> Any:
    q, _ = xp.linalg.qr(y)
    return q


def randomized_factor(
    xp: ModuleType,
    a: Any,
    rank: int,
    oversample: int,
    power_iter: int,
    rng: np.random.Generator,
) -> tuple[Any, Any]:
    """Leading ``rank`` left singular vectors ``u`` of ``a`` and ``uᵀ a``, by a range finder.

    Halko, Martinsson & Tropp (2011), Algorithms 4.4 (subspace iteration,
    re-orthonormalized on the short side after every product pair) and 5.1
    (the factor from the small projected matrix ``Qᵀ a``, here through its
    ``k × k`` Gram matrix). The Gaussian test matrix is drawn on the host
    from ``rng`` (in float32 for float32 input, float64 otherwise) so a seed
    gives the same sketch on every backend and device.
    """
    rows, cols = a.shape
    sketch = min(rank + oversample, rows, cols)
    single = a.dtype == xp.float32
    omega = rng.standard_normal((cols, sketch), dtype=np.float32 if single else np.float64)
    omega = xp.asarray(omega, dtype=a.dtype, device=array_api_compat.device(a))
    q = _orthonormal(xp, a @ omega)
    for _ in range(power_iter):
        z = a.T @ q
        # Orthonormalizing the long side (cols x k) costs as much as a pass
        # over ``a``; skipping it loses only directions below sqrt(eps)·σ_1,
        # the floor the Gram route has anyway. The short side is always
        # orthonormalized, so no power of the spectrum beyond σ² builds up.
        if cols <= rows:
            z = _orthonormal(xp, z)
        q = _orthonormal(xp, a @ z)
    b = q.T @ a
    ub, _ = left_singular(xp, b, "gram" if sketch <= cols else "svd")
    ub = ub[:, :rank]
    u = sign_fix(xp, q @ ub)
    # uᵀ a = (sign-fixed ub)ᵀ b: the projection comes without another pass over a.
    return u, (q.T @ u).T @ b


@dataclass(frozen=True)
class Sketch:
    """Settings of the randomized range finder for one decomposition."""

    oversample: int
    power_iter: int
    rng: np.random.Generator


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
) -> tuple[Any, np.ndarray | None, Any]:
    """The sign-fixed factor ``u`` of one unfolding, its host spectrum, and ``uᵀ a``.

    Either ``rank`` is given, or the smallest rank whose discarded energy is
    at most ``threshold`` is used. A factor from a sketch comes with no
    spectrum (``None``) but with the projected unfolding ``uᵀ a`` for free;
    otherwise the third value is ``None``.
    """
    rows, cols = a.shape
    eps = float(xp.finfo(a.dtype).eps)
    concrete = choose_method(method, rows, cols, eps, tol, ndim)
    if concrete == "randomized":
        if sketch is None:
            sketch = Sketch(oversample=10, power_iter=1, rng=np.random.default_rng(0))
        if rank is not None and rank + sketch.oversample < min(rows, cols):
            u, projected = randomized_factor(
                xp, a, rank, sketch.oversample, sketch.power_iter, sketch.rng
            )
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
    u = _orthonormal(xp, a @ v[:, :rank])
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
