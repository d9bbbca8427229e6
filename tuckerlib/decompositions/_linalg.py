"""Small dense linear algebra shared by the factor routines: signs, SVDs, bases."""

from __future__ import annotations

from types import ModuleType
from typing import Any

import array_api_compat

from tuckerlib._accumulate import gram

__all__ = ["left_singular", "orthonormal", "sign_fix"]


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
        w, v = xp.linalg.eigh(gram(xp, a))
        # eigh sorts ascending; rounding can leave tiny negative eigenvalues.
        s = xp.sqrt(xp.clip(xp.flip(w), min=0.0))
        return xp.flip(v, axis=1), s
    full = rank is not None and rank > min(rows, cols)
    u, s, _ = xp.linalg.svd(a, full_matrices=full)
    if s.shape[0] < u.shape[1]:
        pad = xp.zeros(u.shape[1] - s.shape[0], dtype=s.dtype, device=array_api_compat.device(s))
        s = xp.concat([s, pad])
    return u, s


def orthonormal(xp: ModuleType, y: Any) -> Any:
    """An orthonormal basis of the columns of ``y`` (the ``Q`` of its reduced QR)."""
    q, _ = xp.linalg.qr(y)
    return q
