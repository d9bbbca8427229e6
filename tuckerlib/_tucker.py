"""The Tucker tensor value type: a core and one factor per mode."""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from types import ModuleType
from typing import Any

from tuckerlib._namespace import get_namespace, is_numpy
from tuckerlib._products import mode_product, multi_mode_product
from tuckerlib._ranks import tucker_params
from tuckerlib._validation import as_floating, as_list, as_numeric_array

__all__ = ["TuckerTensor", "tucker_to_tensor"]


def _as_tucker(core: Any, factors: Any) -> tuple[Any, tuple[Any, ...]]:
    """Validated ``(core, factors)``; ``factors`` may be any iterable, read once."""
    factors = as_list(factors, "factors", "a sequence of factor matrices, one per mode")
    xp = get_namespace(core, *factors)
    core = as_numeric_array(core, xp, "core")
    factors = tuple(as_numeric_array(f, xp, f"factors[{n}]") for n, f in enumerate(factors))
    _check_tucker(core, factors)
    return core, factors


def _check_tucker(core: Any, factors: Sequence[Any]) -> None:
    if core.ndim < 1:
        raise ValueError("core must have at least one mode, got a 0-D array")
    if len(factors) != core.ndim:
        raise ValueError(
            f"a core with {core.ndim} modes needs {core.ndim} factors, got {len(factors)}"
        )
    for n, factor in enumerate(factors):
        if factor.ndim != 2 or factor.shape[1] != core.shape[n]:
            raise ValueError(
                f"factors[{n}] must have shape (I_{n}, {core.shape[n]}) to match core mode {n}, "
                f"got {tuple(factor.shape)}"
            )


def _conj(xp: ModuleType, a: Any) -> Any:
    # The array API standard defines conj for complex dtypes only.
    return xp.conj(a) if xp.isdtype(a.dtype, "complex floating") else a


def _unit_scaled(xp: ModuleType, a: Any) -> tuple[Any, Any]:
    """``(a / m, m)`` with ``m`` the largest magnitude of ``a`` (1 for an all-zero ``a``)."""
    a = as_floating(a, xp)
    if math.prod(a.shape) == 0:
        return a, 1.0
    magnitude = xp.max(xp.abs(a))
    usable = xp.isfinite(magnitude) & (magnitude > 0)
    scale = xp.where(usable, magnitude, xp.ones_like(magnitude))
    return a / scale, scale


def tucker_to_tensor(core: Any, factors: Sequence[Any]) -> Any:
    r"""Full tensor :math:`\text{core} \times_0 U_0 \times_1 U_1 \cdots \times_{N-1} U_{N-1}`.

    Parameters
    ----------
    core : array of shape (R_0, ..., R_{N-1})
        The Tucker core.
    factors : sequence of N arrays
        ``factors[n]`` has shape ``(I_n, R_n)``.

    Returns
    -------
    array of shape (I_0, ..., I_{N-1})
        The reconstructed tensor, products applied in the cheapest order.

    Raises
    ------
    ValueError
        If the number or shapes of the factors do not match the core.
    TypeError
        If core and factors come from different array libraries, ``factors``
        is not a sequence, or an array is boolean or not numeric.

    See Also
    --------
    TuckerTensor.to_tensor : The same for a :class:`TuckerTensor`.

    Examples
    --------
    >>> import numpy as np
    >>> from tuckerlib import tucker_to_tensor
    >>> core = np.ones((1, 1))
    >>> tucker_to_tensor(core, [np.array([[1.0], [2.0]]), np.array([[3.0], [4.0]])])
    array([[3., 4.],
           [6., 8.]])
    """
    core, factors = _as_tucker(core, factors)
    return multi_mode_product(core, factors)


@dataclass(frozen=True, eq=False)
class TuckerTensor:
    r"""A tensor in Tucker form: :math:`G \times_0 U_0 \times_1 U_1 \cdots \times_{N-1} U_{N-1}`.

    An immutable value holding arrays of any array API library; it unpacks
    as ``core, factors = tucker``.

    Parameters
    ----------
    core : array of shape (R_0, ..., R_{N-1})
        The core tensor.
    factors : sequence of N arrays
        ``factors[n]`` has shape ``(I_n, R_n)``; stored as a tuple.

    Raises
    ------
    ValueError
        If the number or shapes of the factors do not match the core.
    TypeError
        If core and factors come from different array libraries, ``factors``
        is not a sequence (``None``, say), or an array is boolean or not
        numeric.

    Examples
    --------
    >>> import numpy as np
    >>> from tuckerlib import TuckerTensor
    >>> core = np.arange(6.0).reshape(2, 3)
    >>> t = TuckerTensor(core, [np.eye(4, 2), np.eye(5, 3)])
    >>> t.shape, t.rank, t.ndim, t.n_params
    ((4, 5), (2, 3), 2, 29)
    >>> core_, factors = t
    >>> t.to_tensor().shape
    (4, 5)
    >>> float(t.norm())  # equals the core's norm for orthonormal factors
    7.416198...
    """

    core: Any
    """The core tensor, of shape ``rank``."""
    factors: tuple[Any, ...]
    """One factor per mode; ``factors[n]`` has shape ``(I_n, R_n)``."""

    def __post_init__(self) -> None:
        core, factors = _as_tucker(self.core, self.factors)
        object.__setattr__(self, "core", core)
        object.__setattr__(self, "factors", factors)

    def __iter__(self) -> Iterator[Any]:
        """Unpack as ``core, factors``."""
        return iter((self.core, self.factors))

    def __repr__(self) -> str:
        return f"TuckerTensor(shape={self.shape}, rank={self.rank})"

    @property
    def shape(self) -> tuple[int, ...]:
        r"""Shape :math:`(I_0, \dots, I_{N-1})` of the full tensor."""
        return tuple(int(f.shape[0]) for f in self.factors)

    @property
    def rank(self) -> tuple[int, ...]:
        r"""Multilinear rank :math:`(R_0, \dots, R_{N-1})`: the core's shape."""
        return tuple(int(s) for s in self.core.shape)

    @property
    def ndim(self) -> int:
        """Number of modes ``N``."""
        return len(self.factors)

    @property
    def n_params(self) -> int:
        r"""Stored entries: :math:`\prod_n R_n + \sum_n I_n R_n` (see :func:`tucker_params`)."""
        return tucker_params(self.shape, self.rank)

    def to_tensor(self) -> Any:
        """Materialize the full tensor (see :func:`tucker_to_tensor`)."""
        return multi_mode_product(self.core, self.factors)

    def norm(self) -> Any:
        r"""Frobenius norm of the full tensor, without materializing it.

        Returns a 0-D array of the core's library (differentiable where the
        core and factors are; integer arrays give the default floating
        dtype). Uses :math:`\|x\|^2 = \langle G, G \times_0 U_0^H U_0 \dots \rangle`, which costs
        :math:`O(\sum I_n R_n^2 + R^{N+1})`; for orthonormal factors it equals the
        core's norm. The core and each factor are divided by their largest
        magnitude first, so the squares neither overflow nor underflow
        where the norm itself is representable.
        """
        xp = get_namespace(self.core, *self.factors)
        core, scale = _unit_scaled(xp, self.core)
        weighted = core
        for n, factor in enumerate(self.factors):
            factor, factor_scale = _unit_scaled(xp, factor)
            scale = scale * factor_scale
            weighted = mode_product(weighted, _conj(xp, factor).T @ factor, n)
        squared = xp.sum(_conj(xp, core) * weighted)
        if xp.isdtype(squared.dtype, "complex floating"):
            squared = xp.real(squared)
        # Rounding can push a tiny squared norm below zero.
        norm = scale * xp.sqrt(xp.clip(squared, min=0.0))
        # NumPy reductions return scalars, not the promised 0-D array.
        return xp.asarray(norm) if is_numpy(xp) else norm
