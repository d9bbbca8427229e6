"""Checks of the arguments that every model-level function shares.

Each raises a ``TypeError`` or ``ValueError`` naming the argument, before
anything is read or changed.
"""

from __future__ import annotations

import numbers
import operator
from collections.abc import Sequence

from torch import nn

from flora.spec import is_bool

__all__ = ["check_flag", "check_fraction", "check_model", "check_names", "check_positive_int"]


def check_model(model: object, name: str = "model") -> nn.Module:
    """``model`` if it is a ``torch.nn.Module``; a TypeError naming ``name`` otherwise."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"{name} must be a torch.nn.Module, got {type(model).__name__}")
    return model


def check_flag(value: object, name: str) -> bool:
    """``value`` if it is ``True`` or ``False``: a truthy ``"no"`` must not mean ``True``."""
    if not is_bool(value):
        raise TypeError(f"{name} must be True or False, got {value!r}")
    return bool(value)


def check_names(value: object, name: str, known: Sequence[str]) -> tuple[str, ...]:
    """Adapter names: one string or a sequence of distinct strings, each one of ``known``.

    Raises
    ------
    TypeError
        If ``value`` is neither a string nor a sequence of strings.
    ValueError
        If it is empty, repeats a name, or names an adapter not in ``known``.
    """
    if isinstance(value, str):
        names: tuple[str, ...] = (value,)
    elif isinstance(value, Sequence) and all(isinstance(n, str) for n in value):
        names = tuple(value)
    else:
        raise TypeError(f"{name} must be an adapter name or a list of them, got {value!r}")
    if not names:
        raise ValueError(f"{name} must name at least one adapter; the model has {list(known)}")
    if len(set(names)) != len(names):
        raise ValueError(f"{name} names an adapter twice: {list(names)}")
    unknown = [n for n in names if n not in known]
    if unknown:
        raise ValueError(f"{name}: the model has no adapter {unknown}; it has {list(known)}")
    return names


def check_positive_int(value: object, name: str) -> int:
    """``value`` as an int >= 1: Python and NumPy integers, never bool or float."""
    if is_bool(value):
        raise TypeError(f"{name} must be an int >= 1, got {value!r}")
    try:
        value = operator.index(value)
    except TypeError:
        raise TypeError(f"{name} must be an int >= 1, got {value!r}") from None
    if value < 1:
        raise ValueError(f"{name} must be >= 1, got {value}")
    return value


def check_fraction(value: object, name: str) -> float:
    """``value`` as a float in ``(0, 1]`` (Python or NumPy real; not bool or str)."""
    if is_bool(value) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a number in (0, 1], got {value!r}")
    if not 0 < value <= 1:
        raise ValueError(f"{name} must lie in (0, 1], got {value}")
    return float(value)
