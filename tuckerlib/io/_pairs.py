"""Pair the tensors of two checkpoints by name and stream their differences."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

import numpy as np

from tuckerlib.io._base import Checkpoint, TensorInfo

__all__ = ["Pairing", "pair_checkpoints", "read_delta"]


@dataclass(frozen=True)
class Pairing:
    """Which tensors of two checkpoints can be compared, and why others cannot.

    Parameters
    ----------
    names : list of str
        Tensors present in both checkpoints with the same shape, a floating
        dtype and at least two dimensions, in the tuned checkpoint's order.
    skipped : list of (str, str)
        ``(name, reason)`` for every other tensor that passed the name
        filters: missing on one side, shapes differ, not floating point, or
        fewer than two dimensions.
    """

    #: Comparable tensors, in the tuned checkpoint's order.
    names: list[str] = field(default_factory=list)
    #: ``(name, reason)`` of every other tensor that passed the filters.
    skipped: list[tuple[str, str]] = field(default_factory=list)


def _shape_text(shape: tuple[int, ...]) -> str:
    return "x".join(str(d) for d in shape) if shape else "scalar"


def _skip_reason(base: TensorInfo, tuned: TensorInfo) -> str | None:
    if base.shape != tuned.shape:
        return f"shape differs (base {_shape_text(base.shape)}, tuned {_shape_text(tuned.shape)})"
    for info in (base, tuned):
        if not info.is_floating:
            return f"not floating point ({info.dtype})"
    if len(tuned.shape) < 2:
        # A vector has a single mode whose unfolding has rank 1: there is no
        # rank structure to report, and adapters leave biases and norms dense.
        return f"{len(tuned.shape)}-D tensor (bias, norm or scalar): no rank structure"
    if math.prod(tuned.shape) == 0:
        return "empty tensor"
    return None


def _pattern(pattern: str | re.Pattern[str] | None, name: str) -> re.Pattern[str] | None:
    if pattern is None:
        return None
    text = pattern.pattern if isinstance(pattern, re.Pattern) else pattern
    if not isinstance(text, str):
        raise TypeError(
            f"{name} must be a regular expression (str or re.Pattern) matching str names, "
            f"got {type(text).__name__}"
        )
    if isinstance(pattern, re.Pattern):
        return pattern
    try:
        return re.compile(pattern)
    except re.error as exc:
        raise ValueError(f"{name} is not a valid regular expression {pattern!r}: {exc}") from None


def _check_checkpoints(base: object, tuned: object) -> None:
    for name, value in (("base", base), ("tuned", tuned)):
        if not isinstance(value, Checkpoint):
            raise TypeError(
                f"{name} must be a Checkpoint (see open_checkpoint), got {type(value).__name__}"
            )


def pair_checkpoints(
    base: Checkpoint,
    tuned: Checkpoint,
    *,
    include: str | re.Pattern[str] | None = None,
    exclude: str | re.Pattern[str] | None = None,
) -> Pairing:
    """Pair tensors of ``base`` and ``tuned`` by name, from their metadata only.

    Parameters
    ----------
    base, tuned : Checkpoint
        The checkpoints before and after fine-tuning.
    include, exclude : str or re.Pattern, optional
        Regular expressions searched (``re.search``) in each name: only
        names matching ``include`` and not matching ``exclude`` are
        considered at all (neither paired nor listed as skipped).

    Returns
    -------
    Pairing
        The comparable names and the skipped ones with their reasons.

    Raises
    ------
    ValueError
        If a pattern is not a valid regular expression (the message names
        ``include`` or ``exclude``).
    TypeError
        If ``base`` or ``tuned`` is not a :class:`Checkpoint`, or a pattern
        is neither a string nor a compiled pattern.

    See Also
    --------
    read_delta : Read the difference of one paired tensor.

    Examples
    --------
    >>> import tempfile
    >>> from pathlib import Path
    >>> import numpy as np
    >>> from safetensors.numpy import save_file
    >>> from tuckerlib.io import open_checkpoint, pair_checkpoints
    >>> tmp = Path(tempfile.mkdtemp())
    >>> w = np.ones((4, 3), np.float32)
    >>> save_file({"fc.weight": w, "fc.bias": w[0], "old": w}, tmp / "base.safetensors")
    >>> save_file({"fc.weight": 2 * w, "fc.bias": w[0], "new": w}, tmp / "tuned.safetensors")
    >>> pairing = pair_checkpoints(
    ...     open_checkpoint(tmp / "base.safetensors"), open_checkpoint(tmp / "tuned.safetensors")
    ... )
    >>> pairing.names
    ['fc.weight']
    >>> for name, reason in pairing.skipped:
    ...     print(f"{name}: {reason}")
    fc.bias: 1-D tensor (bias, norm or scalar): no rank structure
    new: missing in base
    old: missing in tuned
    """
    _check_checkpoints(base, tuned)
    include_re = _pattern(include, "include")
    exclude_re = _pattern(exclude, "exclude")

    def wanted(name: str) -> bool:
        if include_re is not None and not include_re.search(name):
            return False
        return exclude_re is None or not exclude_re.search(name)

    pairing = Pairing()
    for name in filter(wanted, tuned):
        if name not in base:
            pairing.skipped.append((name, "missing in base"))
            continue
        reason = _skip_reason(base.info(name), tuned.info(name))
        if reason is None:
            pairing.names.append(name)
        else:
            pairing.skipped.append((name, reason))
    pairing.skipped.extend(
        (name, "missing in tuned") for name in base if wanted(name) and name not in tuned
    )
    return pairing


def _dtype_kind(dtype: object) -> str:
    try:
        return np.dtype(dtype).kind  # type: ignore[call-overload]
    except TypeError:
        raise TypeError(f"dtype must be a NumPy dtype, got {dtype!r}") from None


def read_delta(
    base: Checkpoint, tuned: Checkpoint, name: str, dtype: np.dtype | type | str | None = None
) -> np.ndarray:
    r"""Read ``tuned[name] - base[name]`` without holding either tensor in memory.

    The tuned tensor is read into the result, then the base tensor is
    subtracted chunk by chunk, so the peak memory is the result plus a few
    MiB.

    Parameters
    ----------
    base, tuned : Checkpoint
        The checkpoints before and after fine-tuning.
    name : str
        A tensor present in both, with the same shape.
    dtype : dtype-like, optional
        The real floating dtype of :math:`\Delta W`; default ``float64`` if either side
        is stored in float64, else ``float32`` (the difference of two
        bfloat16 or float16 numbers is exact in float32).

    Returns
    -------
    numpy.ndarray
        The difference, of the tensors' shape.

    Raises
    ------
    KeyError
        If ``name`` is missing from either checkpoint.
    ValueError
        If the two tensors' shapes differ or ``dtype`` is not a real
        floating dtype.
    TypeError
        If ``base`` or ``tuned`` is not a :class:`Checkpoint` or ``dtype``
        is not a dtype.

    Examples
    --------
    >>> import tempfile
    >>> from pathlib import Path
    >>> import numpy as np
    >>> from safetensors.numpy import save_file
    >>> from tuckerlib.io import open_checkpoint, read_delta
    >>> tmp = Path(tempfile.mkdtemp())
    >>> save_file({"w": np.ones((2, 2), np.float32)}, tmp / "a.safetensors")
    >>> save_file({"w": np.full((2, 2), 3, np.float32)}, tmp / "b.safetensors")
    >>> base, tuned = open_checkpoint(tmp / "a.safetensors"), open_checkpoint(tmp / "b.safetensors")
    >>> read_delta(base, tuned, "w")
    array([[2., 2.],
           [2., 2.]], dtype=float32)
    """
    _check_checkpoints(base, tuned)
    base_info, tuned_info = base.info(name), tuned.info(name)
    if base_info.shape != tuned_info.shape:
        raise ValueError(
            f"tensor {name!r} has shape {base_info.shape} in base but {tuned_info.shape} in tuned"
        )
    if dtype is None:
        wide = "F64" in (base_info.dtype, tuned_info.dtype)
        dtype = np.float64 if wide else np.float32
    elif _dtype_kind(dtype) != "f":
        raise ValueError(f"dtype must be a real floating dtype for a difference, got {dtype!r}")
    delta = tuned.read(name, dtype)
    flat = delta.reshape(-1)
    start = 0
    for piece in base.chunks(name, delta.dtype):
        flat[start : start + piece.size] -= piece
        start += piece.size
    return delta
