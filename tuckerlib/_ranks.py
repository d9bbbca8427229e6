"""The rank rules (an int, a sequence with ``None`` entries, or ``None``), in one place."""

from __future__ import annotations

import math
import operator
from collections.abc import Iterable, Sequence

from tuckerlib._validation import as_int, as_list, as_shape

__all__ = ["resolve_rank", "tucker_params"]

Rank = int | Sequence[int | None] | None


def resolve_rank(rank: Rank, shape: Sequence[int], name: str = "rank") -> tuple[int, ...]:
    r"""Turn a rank specification into one integer rank per mode.

    Parameters
    ----------
    rank : int, sequence of int or None, or None
        ``None`` keeps every mode full. An ``int`` applies to every mode and
        is clipped to each mode's size. A sequence (any iterable but a
        string or mapping) gives one rank per mode (``None`` entries keep
        that mode full); entries must lie in ``[1, shape[n]]``.
    shape : sequence of int
        The tensor's shape :math:`(I_0, \dots, I_{N-1})`: non-negative integers.
    name : str, optional
        The argument name used in error messages.

    Returns
    -------
    tuple of int
        One rank per mode.

    Raises
    ------
    ValueError
        If a rank is below 1, a sequence has the wrong length, a sequence
        entry exceeds its mode's size, or a size in ``shape`` is negative.
    TypeError
        If a rank or a size is not an integer (``bool`` included), or
        ``rank`` is neither an integer nor a sequence.

    Examples
    --------
    >>> from tuckerlib import resolve_rank
    >>> resolve_rank(8, (4, 16, 32))
    (4, 8, 8)
    >>> resolve_rank((2, None, 3), (4, 16, 32))
    (2, 16, 3)
    """
    shape = as_shape(shape)
    if rank is None:
        return shape
    if _is_scalar(rank):
        value = as_int(rank, name)
        if value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")
        return tuple(min(value, size) for size in shape)
    rank = as_list(rank, name, "an integer or a sequence of one rank (or None) per mode")
    if len(rank) != len(shape):
        raise ValueError(
            f"{name} has {len(rank)} entries but the tensor has {len(shape)} modes (shape {shape})"
        )
    ranks = []
    for mode, (r, size) in enumerate(zip(rank, shape, strict=True)):
        if r is None:
            ranks.append(size)
            continue
        value = as_int(r, f"{name}[{mode}]")
        if not 1 <= value <= size:
            raise ValueError(
                f"{name}[{mode}]={value} is outside [1, {size}] (mode {mode} has size {size}; "
                f"shape {shape})"
            )
        ranks.append(value)
    return tuple(ranks)


def _is_scalar(rank: object) -> bool:
    """Whether ``rank`` is one rank for every mode rather than one per mode."""
    if isinstance(rank, (str, bytes)) or not isinstance(rank, Iterable):
        return True
    try:
        operator.index(rank)  # type: ignore[call-overload]
    except TypeError:
        return False
    return True


def tucker_params(shape: Sequence[int], rank: Rank) -> int:
    r"""Number of parameters of a Tucker tensor: :math:`\prod_n R_n + \sum_n I_n R_n`.

    Parameters
    ----------
    shape : sequence of int
        The full tensor's shape :math:`(I_0, \dots, I_{N-1})`.
    rank : int, sequence of int or None, or None
        The Tucker ranks, resolved by the rank rules of :func:`resolve_rank`.

    Returns
    -------
    int
        Core entries plus factor entries.

    Raises
    ------
    ValueError
        If a size in ``shape`` is negative or ``rank`` breaks the rules of
        :func:`resolve_rank`.
    TypeError
        If a size or a rank is not an integer.

    Examples
    --------
    >>> from tuckerlib import tucker_params
    >>> tucker_params((64, 64, 3, 3), (16, 16, 2, 2))
    3084
    """
    shape = as_shape(shape)
    ranks = resolve_rank(rank, shape)
    return math.prod(ranks) + sum(s * r for s, r in zip(shape, ranks, strict=True))
