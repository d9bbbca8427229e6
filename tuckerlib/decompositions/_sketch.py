r"""The factor of one unfolding from a randomized sketch (range finder).

For an unfolding ``A`` (:math:`I_n \times J`, ``J`` the product of the other mode
sizes) and sketch width :math:`k = R_n + p`:

1. :math:`Y = A \Omega` with a :math:`J \times k` Khatri-Rao test matrix :math:`\Omega` (one small
   Gaussian matrix per remaining mode, Sun et al. 2020), ``Q = orth(Y)``.
2. ``q`` power iterations (Halko, Martinsson & Tropp 2011, Algorithm 4.4):
   :math:`Z = A^\top Q`, then ``Q = orth(A Z)``, re-orthonormalized on the short
   side after every product.
3. The factor and the projection :math:`u^\top A`:

   * ``q = 0``: from :math:`B = Q^\top A` (Halko et al., Algorithm 5.1), two passes.
   * :math:`q \ge 1`: the last power iteration's row sketch :math:`Z = A^\top Q` and
     ``A Z`` already determine ``A P_Z`` (``P_Z`` the orthogonal projector
     onto the columns of ``Z``, the generalized Nyström approximation of
     Nakatsukasa 2020), so the factor and the projection come from
     :math:`k \times k` matrices and one :math:`R_n \times k` by :math:`k \times J` product, without
     a
     fourth pass over ``A`` (Bjarkason 2019, "any number of views"):
     ``2q + 1`` passes in all instead of ``2q + 2``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import array_api_compat
import numpy as np

from tuckerlib._accumulate import matmul
from tuckerlib.decompositions._linalg import left_singular, orthonormal, sign_fix

__all__ = [
    "Sketch",
    "gaussian_draws",
    "gaussian_khatri_rao",
    "nystrom_coefficients",
    "randomized_factor",
]


@dataclass(frozen=True)
class Sketch:
    """Settings of the randomized range finder for one decomposition."""

    oversample: int
    power_iter: int
    rng: np.random.Generator


def gaussian_draws(
    rng: np.random.Generator, columns: Sequence[tuple[int, int]], width: int, single: bool
) -> dict[int, np.ndarray]:
    """One standard normal ``(size, width)`` host matrix per ``(mode, size)`` in ``columns``.

    Drawn in ascending mode order (float32 when ``single``, for float32
    tensors; float64 otherwise), so one seed gives the same matrices whatever the memory
    layout, backend or device.
    """
    host_dtype = np.float32 if single else np.float64
    return {
        mode: rng.standard_normal((size, width), dtype=host_dtype) for mode, size in sorted(columns)
    }


def gaussian_khatri_rao(
    xp: ModuleType,
    rng: np.random.Generator,
    columns: Sequence[tuple[int, int]],
    width: int,
    like: Any,
) -> Any:
    r"""A :math:`J \times \text{width}` Khatri-Rao product of Gaussians (:math:`J = \prod` sizes).

    ``columns`` lists ``(mode, size)`` in the C order of the rows (the
    column order of :func:`~tuckerlib.decompositions._factors.fibre_matrix`):
    row ``(j_1, ..., j_m)`` of column ``l`` is :math:`\prod_i G_{\text{mode\_i}}[j_i, l]`
    with the matrices ``G_mode`` of :func:`gaussian_draws`; the product is
    formed in ``like``'s library, dtype and device.
    """
    drawn = gaussian_draws(rng, columns, width, like.dtype == xp.float32)
    device = array_api_compat.device(like)
    omega = None
    for mode, _ in columns:
        factor = xp.asarray(drawn[mode], dtype=like.dtype, device=device)
        if omega is None:
            omega = factor
        else:
            omega = xp.reshape(omega[:, None, :] * factor[None, :, :], (-1, width))
    return omega


def randomized_factor(
    xp: ModuleType, a: Any, rank: int, sketch: Sketch, columns: Sequence[tuple[int, int]]
) -> tuple[Any, Any]:
    r"""Leading ``rank`` left singular vectors ``u`` of ``a`` and :math:`u^\top a`, from a sketch.

    ``columns`` holds ``(mode, size)`` of the modes that index the columns
    of ``a``, in column order (the sizes multiply to ``a.shape[1]``); see
    the module docstring for the algorithm.
    """
    rows, cols = a.shape
    width = min(rank + sketch.oversample, rows, cols)
    omega = gaussian_khatri_rao(xp, sketch.rng, columns, width, a)
    q = orthonormal(xp, matmul(xp, a, omega))
    if sketch.power_iter == 0:
        return _projected_factor(xp, a, q, rank)
    for _ in range(sketch.power_iter - 1):
        z = matmul(xp, q.T, a).T
        # Orthonormalizing the long side (cols x k) costs as much as a pass
        # over ``a``; skipping it loses only directions below sqrt(eps)·σ_1,
        # the floor the Gram route has anyway. The short side is always
        # orthonormalized, so no power of the spectrum beyond σ² builds up.
        if cols <= rows:
            z = orthonormal(xp, z)
        q = orthonormal(xp, matmul(xp, a, z))
    return _nystrom_factor(xp, a, q, rank)


def _projected_factor(xp: ModuleType, a: Any, q: Any, rank: int) -> tuple[Any, Any]:
    r"""The factor within ``range(q)`` from :math:`B = q^\top a`; :math:`u^\top a` from ``B``."""
    b = matmul(xp, q.T, a)
    ub, _ = left_singular(xp, b, "gram" if q.shape[1] <= a.shape[1] else "svd")
    u = sign_fix(xp, q @ ub[:, :rank])
    return u, (q.T @ u).T @ b


def _nystrom_factor(xp: ModuleType, a: Any, q: Any, rank: int) -> tuple[Any, Any]:
    r"""The factor and projection of ``a P_Z`` for the row sketch :math:`Z = a^\top q`."""
    zt = matmul(xp, q.T, a)
    u, coefficients = nystrom_coefficients(xp, q, matmul(xp, a, zt.T), rank)
    return u, coefficients @ zt


def nystrom_coefficients(xp: ModuleType, q: Any, y: Any, rank: int) -> tuple[Any, Any]:
    r"""The factor ``u`` and the ``rank × k`` matrix ``C`` with ``uᵀ a P_Z = C Zᵀ``.

    Only small matrices: ``q`` (:math:`\text{rows} \times k`, orthonormal) and ``y = a Z``
    for the row sketch :math:`Z = a^\top q` (:math:`\text{cols} \times k`), which the caller keeps.

    With :math:`Z^\top Z = V \Lambda V^\top` and :math:`W = V \Lambda^{-1/2}`, ``Z W`` is an
    orthonormal basis of ``range(Z)``, and :math:`a Z W = Q_1 R_1 W` (:math:`a Z = Q_1 R_1`). The
    SVD of the :math:`k \times k` matrix :math:`C = R_1 W` then gives the factor :math:`u = Q_1 U_C`
    and :math:`u^\top a P_Z = (U_C^\top C) W^\top Z^\top`. Eigenvalues of :math:`Z^\top Z` below its
    rounding level (:math:`k \cdot \varepsilon \cdot \lambda_\text{max}`) are dropped instead of
    inverted, the floor every Gram route has.
    """
    # ZᵀZ = qᵀ a aᵀ q = qᵀ (a Z): no product with the long Z needed.
    gram = matmul(xp, q.T, y)
    gram = (gram + gram.T) / 2
    w, v = xp.linalg.eigh(gram)
    eps = float(xp.finfo(y.dtype).eps)
    keep = w > w[-1] * (w.shape[0] * eps)
    ones, zeros = xp.ones_like(w), xp.zeros_like(w)
    basis = v * xp.where(keep, ones / xp.sqrt(xp.where(keep, w, ones)), zeros)
    q1, r1 = xp.linalg.qr(y)
    c = r1 @ basis
    uc, _, _ = xp.linalg.svd(c)
    u = sign_fix(xp, q1 @ uc[:, :rank])
    return u, ((q1.T @ u).T @ c) @ basis.T
