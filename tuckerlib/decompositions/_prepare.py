"""Validation at the boundary: the tensor and the arguments every decomposition shares.

:func:`prepare_tensor` is the one place a tensor is checked and brought to
the form the algorithms assume (real floating, at least float32, no value
range that would overflow or underflow a Gram matrix); the small checks
below validate the other arguments once, before any work is done.
"""

from __future__ import annotations

import math
import numbers
import operator
from collections.abc import Sequence
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import array_api_compat
import numpy as np

from tuckerlib._accumulate import squared_norm
from tuckerlib._host import host_float, is_dask, is_traced
from tuckerlib._layout import memory_order
from tuckerlib._namespace import as_array, get_namespace
from tuckerlib._ranks import Rank, resolve_rank
from tuckerlib._tucker import TuckerTensor
from tuckerlib._validation import check_finite, check_ndim

__all__ = [
    "METHODS",
    "Prepared",
    "check_method",
    "check_order",
    "check_tol",
    "magnitude_scale",
    "prepare_tensor",
    "resolve_rank_or_tol",
]

METHODS = ("auto", "svd", "gram", "randomized")


@dataclass(frozen=True)
class Prepared:
    r"""A validated tensor, ready for the algorithms.

    ``x`` is the input scaled by ``scale`` (a power of two, exact; ``1.0``
    unless the input's magnitude would overflow or underflow a Gram
    matrix) and, for half-precision input, cast to float32. ``norm2`` is
    :math:`\|x\|^2` of the scaled tensor, or ``None`` where it is not known yet:
    for a Dask array the first pass over the data measures it (and decides
    the scale), and under ``jax.jit`` it is never known.
    """

    xp: ModuleType
    x: Any
    dtype: Any
    scale: float = 1.0
    norm2: float | None = None

    @property
    def lazy(self) -> bool:
        """Whether ``x`` is a Dask array (handled by the Dask path)."""
        return is_dask(self.x)

    def result(self, core: Any, factors: Sequence[Any]) -> TuckerTensor:
        """The Tucker tensor of the *input*: the core unscaled, both in the input's dtype."""
        xp = self.xp
        if self.scale != 1.0:
            core = core * (1.0 / self.scale)
        if core.dtype != self.dtype:
            core = xp.astype(core, self.dtype)
            factors = [xp.astype(f, self.dtype) for f in factors]
        return TuckerTensor(core, list(factors))


def _default_float(xp: ModuleType, x: Any) -> Any:
    info = xp.__array_namespace_info__()
    return info.default_dtypes(device=array_api_compat.device(x))["real floating"]


def _check_values_exist(x: Any, name: str) -> None:
    if array_api_compat.is_torch_array(x) and x.is_meta:
        raise ValueError(
            f"{name} is a meta tensor: meta tensors hold a shape but no values, so there is "
            "nothing to decompose; materialize it on a real device (cpu, cuda) first"
        )


def prepare_tensor(x: Any, name: str = "x") -> Prepared:
    r"""Validate ``x`` once and return it in the form the algorithms assume.

    Integer and boolean inputs become the namespace's default floating
    dtype; float32 and float64 keep their dtype; half precision (float16,
    bfloat16) is computed in float32 and its results returned in its own
    dtype. Every mode must have size >= 1. An eager tensor is checked for
    NaN/inf here, in the same pass that measures :math:`\|x\|^2`; a Dask array in
    the Dask path's first pass; a ``jax.jit`` tracer cannot be checked.
    """
    xp = get_namespace(x)
    x = as_array(x, xp)
    check_ndim(x, 1, name)
    _check_values_exist(x, name)
    if xp.isdtype(x.dtype, "complex floating"):
        raise TypeError(f"{name} must be real; complex tensors are not supported (got {x.dtype})")
    if any(size == 0 for size in x.shape):
        raise ValueError(
            f"{name} has a mode of size 0 (shape {tuple(x.shape)}); a Tucker decomposition "
            "needs every mode to have size >= 1"
        )
    if not xp.isdtype(x.dtype, "real floating"):
        x = xp.astype(x, _default_float(xp, x))
    dtype = x.dtype
    if xp.finfo(dtype).bits < 32:
        x = xp.astype(x, xp.float32)
    if is_dask(x) or is_traced(x):
        return Prepared(xp, x, dtype)
    norm2 = _squared_norm(xp, x)
    scale = magnitude_scale(norm2, xp.finfo(x.dtype), lambda: _largest(xp, x, name))
    if scale != 1.0:
        x = x * scale
        norm2 = _squared_norm(xp, x)
    return Prepared(xp, x, dtype, scale, norm2)


def _squared_norm(xp: ModuleType, x: Any) -> float:
    r""":math:`\|x\|^2` in the array's own dtype: one dot product, without a temporary.

    The tensor is flattened in its memory order (a view for every axis
    permutation of a contiguous array), so NumPy and PyTorch run one BLAS
    dot where ``sum(x * x)`` would allocate a tensor-sized temporary.
    """
    flat = xp.reshape(xp.permute_dims(x, memory_order(x)), (-1,))
    # Overflow is expected for extreme inputs: it is what decides the scale.
    with np.errstate(over="ignore", invalid="ignore"):
        return host_float(squared_norm(xp, flat))


def _largest(xp: ModuleType, x: Any, name: str) -> float:
    check_finite(x, name, xp)
    return host_float(xp.max(xp.abs(x)))


def magnitude_scale(norm2: float, finfo: Any, largest: Any) -> float:
    r"""The power of two that keeps a tensor's Gram matrices from overflowing or underflowing.

    ``1.0`` when :math:`\text{norm}2 = \|x\|^2` lies in
    :math:`[\text{tiny} / \varepsilon, \text{huge} \cdot \varepsilon]` of the dtype (every Gram
    entry is bounded by :math:`\|x\|^2`); otherwise ``largest()`` (which raises for NaN/inf) gives
    ``max |x|`` and the scale brings it into ``[0.5, 1)``. Only extreme inputs pay for the second
    look at the data.
    """
    tiny, eps, huge = float(finfo.smallest_normal), float(finfo.eps), float(finfo.max)
    if math.isfinite(norm2) and tiny / eps <= norm2 <= huge * eps:
        return 1.0
    top = largest()
    if top == 0.0:
        return 1.0
    lowest, highest = math.frexp(tiny)[1] + 1, math.frexp(huge)[1] - 2
    return math.ldexp(1.0, min(max(-math.frexp(top)[1], lowest), highest))


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


def check_method(method: Any) -> str:
    """Return ``method`` if it is one of :data:`METHODS`."""
    if method not in METHODS:
        raise ValueError(f"method must be one of {', '.join(map(repr, METHODS))}; got {method!r}")
    return method
