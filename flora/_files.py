"""Reading and writing the two files of an adapter directory, with errors that name the file.

A file that is missing, unreadable or malformed is a
:class:`tuckerlib.io.CheckpointError` (a ``ValueError``) whose message starts
with its path, as for any checkpoint; the command lines report it as exit
status 2. A write that fails (a full disk, a file too large) is an
:class:`OSError` naming the file.
"""

from __future__ import annotations

import contextlib
import errno
import json
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from tuckerlib.io import CheckpointError, open_checkpoint

__all__ = ["check_tensor_values", "read_json", "read_tensors", "writing"]


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    # json keeps the last of two equal keys silently; a config naming a layer twice is corrupt.
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise ValueError(f"key {key!r} appears twice")
        result[key] = value
    return result


def _require_file(path: Path) -> None:
    if path.is_dir():
        raise CheckpointError(f"{path}: is a directory, not a file")
    if not path.exists():
        raise CheckpointError(f"{path}: no such file")


def read_json(path: Path) -> Any:
    """The JSON document in ``path``.

    Raises
    ------
    CheckpointError
        If the file is missing, a directory, unreadable, not UTF-8 or not
        valid JSON (a key given twice included).
    """
    _require_file(path)
    try:
        text = path.read_bytes().decode("utf-8")
        return json.loads(text, object_pairs_hook=_unique_keys)
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot read ({exc.strerror or exc})") from None
    except (ValueError, RecursionError) as exc:  # bad UTF-8 or JSON, a repeated key, deep nesting
        raise CheckpointError(f"{path}: not valid JSON ({exc})") from None


def read_tensors(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of the safetensors file ``path``, in its stored dtype.

    The header is checked by :func:`tuckerlib.io.open_checkpoint` first, whose
    errors say what is wrong (truncated, not a safetensors file, a bad
    entry); the tensors are then loaded with ``safetensors``, never
    unpickled.

    Raises
    ------
    CheckpointError
        If the file is missing, a directory, unreadable or malformed.
    """
    _require_file(path)
    with open_checkpoint(path):
        pass
    try:
        return load_file(str(path))
    except SafetensorError as exc:
        raise CheckpointError(f"{path}: not a valid safetensors file ({exc})") from None
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot read ({exc.strerror or exc})") from None


def check_tensor_values(tensors: Mapping[str, object]) -> None:
    """Refuse values that cannot go into an adapter file, naming their keys.

    Raises
    ------
    TypeError
        If a value is not a ``torch.Tensor`` (a NumPy array, a number).
    ValueError
        If a tensor is a meta tensor (no values), sparse, or a floating
        tensor with NaN or infinite entries.
    """
    for key, value in tensors.items():
        if not isinstance(value, torch.Tensor):
            raise TypeError(
                f"adapter tensor {key!r} must be a torch.Tensor, got {type(value).__name__}"
            )
    meta = sorted(k for k, v in tensors.items() if v.is_meta)
    sparse = sorted(k for k, v in tensors.items() if not v.is_meta and v.layout != torch.strided)
    if meta or sparse:
        raise ValueError(
            f"adapter tensors must be dense tensors with values; meta tensors: {meta}, "
            f"sparse tensors: {sparse}"
        )
    bad = sorted(
        k for k, v in tensors.items() if v.is_floating_point() and not bool(v.isfinite().all())
    )
    if bad:
        raise ValueError(f"adapter tensors {bad} hold NaN or infinite values")


@contextlib.contextmanager
def writing(path: Path) -> Iterator[Path]:
    """Run a writer of ``path``; its failures become one :class:`OSError` naming ``path``.

    ``safetensors`` reports a failed write (``File too large``) as its own
    error and ``write(2)`` reports a full disk without a file name.
    """
    try:
        yield path
    except SafetensorError as exc:
        raise OSError(errno.EIO, str(exc) or "safetensors could not write", str(path)) from None
    except OSError as exc:
        reason = exc.strerror or str(exc) or type(exc).__name__
        raise OSError(exc.errno, reason, str(path)) from None
