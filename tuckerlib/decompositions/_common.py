"""Input checks and host transfers shared by the decompositions and the analysis."""

from __future__ import annotations

import math
import numbers
import operator
from collections.abc import Sequence
from types import ModuleType
from typing import Any

import array_api_compat
import numpy as np

from tuckerlib._namespace import as_array, get_namespace
from tuckerlib._ranks import Rank, resolve_rank
from tuckerlib._validation import check_finite, check_ndim

__all__ = [
    "check_order",
    "check_tol",
    "default_order",
    "host_float",
    "prepare_tensor",
    "rank_for_threshold",
    "resolve_rank_or_tol",
    "squared_norm",
    "tail_energies",
    "to_host",
]


def _default_float(xp: ModuleType, x: Any) -> Any:
    info = xp.__array_namespace_info__()
    return info.default_dtypes(device=array_api_compat.device(x))["real floating"]


def prepare_tensor(x: Any, name: str = "x") -> tuple[ModuleType, Any]:
    """Return ``(xp, x)`` with ``x`` a finite real floating array of at least one mode.

    Integer and boolean inputs become the namespace's default floating dtype;
    floating inputs keep their dtype (float32 stays float32).
    """
    xp = get_namespace(x)
    x = as_array(x, xp)
    check_ndim(x, 1, name)
    if xp.isdtype(x.dtype, "complex floating"):
        raise TypeError(f"{name} must be real; complex tensors are not supported (got {x.dtype})")
    if not xp.isdtype(x.dtype, "real floating"):
        x = xp.astype(x, _default_float(xp, x))
    # A finite sum proves every entry finite in one pass without a boolean
    # temporary; only an overflowing sum needs the entry-wise check.
    if not math.isfinite(host_float(xp.sum(x))):
        check_finite(x, name, xp)
    return xp, x


def check_tol(tol: Any, name: str = "tol") -> float:
    """Return ``tol`` as a float in the open interval (0, 1)."""
    if isinstance(tol, bool) or not isinstance(tol, numbers.Real):
        raise TypeError(f"{name} must be a real number in (0, 1), got {type(tol).__name__}")
    value = float(tol)
    if not 0.0 < value < 1.0:
        raise ValueError(f"{name} must lie in the open interval (0, 1), got {tol}")
    return value


def resolve_rank_or_tol(
    rank: Rank, tol: float | None, shape: Sequence[int]
) -> tuple[tuple[int, ...] | None, float | None]:
    """Validate the ``rank``/``tol`` pair of HOSVD and ST-HOSVD.

    Exactly one of the two decides the ranks: ``tol`` (ranks chosen per mode)
    or ``rank`` (``None`` keeps every mode full). Passing both is an error.
    """
    if tol is None:
        return resolve_rank(rank, shape), None
    if rank is not None:
        raise ValueError(
            "pass either rank or tol, not both: tol chooses the ranks that guarantee "
            "a relative error <= tol"
        )
    return None, check_tol(tol)


def check_order(order: Any, ndim: int) -> tuple[int, ...]:
    """Return ``order`` as a permutation of ``range(ndim)``."""
    try:
        modes = tuple(operator.index(m) for m in order)
    except TypeError:
        raise TypeError(f"order must be a sequence of mode indices, got {order!r}") from None
    if sorted(modes) != list(range(ndim)):
        raise ValueError(
            f"order must be a permutation of the modes 0..{ndim - 1} (each once), got {modes}"
        )
    return modes


def default_order(shape: Sequence[int], ranks: Sequence[int] | None) -> tuple[int, ...]:
    """The mode order ST-HOSVD uses when none is given.

    Largest size reduction ``I_n / R_n`` first (Vannieuwenhoven et al. 2012,
    §6.2: shrinking the tensor early makes every later step cheaper); with
    ranks still unknown (``tol``), largest mode first. Ties keep mode order.
    """
    if ranks is None:
        return tuple(sorted(range(len(shape)), key=lambda n: (-shape[n], n)))
    return tuple(sorted(range(len(shape)), key=lambda n: (-shape[n] / ranks[n], n)))


def host_float(a: Any) -> float:
    """A 0-D array as a Python float, detached from autograd."""
    if array_api_compat.is_torch_array(a):
        a = a.detach()
    return float(a)


def squared_norm(xp: ModuleType, x: Any) -> float:
    """``‖x‖²`` as a Python float, accumulated in the array's own dtype."""
    return host_float(xp.sum(x * x))


def to_host(a: Any) -> np.ndarray:
    """A float64 NumPy copy of a 1-D array of any library (detached from autograd)."""
    if array_api_compat.is_torch_array(a):
        a = a.detach().cpu()
    elif array_api_compat.is_cupy_array(a):
        a = a.get()
    try:
        host = np.from_dlpack(a)
    except (TypeError, BufferError, RuntimeError, AttributeError):
        host = np.asarray(a)
    return np.asarray(host, dtype=np.float64)


def tail_energies(s: np.ndarray) -> np.ndarray:
    """``tail[r] = Σ_{i >= r} s_i²`` for ``r = 0..len(s)`` (``tail[len(s)] = 0``)."""
    squares = np.square(s)
    tail = np.zeros(len(s) + 1)
    tail[:-1] = np.cumsum(squares[::-1])[::-1]
    return tail


def rank_for_threshold(s: np.ndarray, threshold: float, size: int) -> int:
    """Smallest rank ``r >= 1`` whose discarded energy ``Σ_{i >= r} s_i²`` is <= threshold."""
    tail = tail_energies(s)
    admissible = np.flatnonzero(tail <= threshold)
    rank = int(admissible[0]) if admissible.size else len(s)
    return max(1, min(rank, size))
