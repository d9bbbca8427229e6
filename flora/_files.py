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
import os
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load

from tuckerlib.io import CheckpointError, open_checkpoint
from tuckerlib.io.flora_format import loads

__all__ = [
    "check_tensor_values",
    "read_json",
    "read_tensors",
    "read_together",
    "writing",
]


def _require_file(path: Path) -> None:
    if path.is_dir():
        raise CheckpointError(f"{path}: is a directory, not a file")
    if not path.exists():
        raise CheckpointError(f"{path}: no such file")


def _read_bytes(path: Path) -> bytes:
    _require_file(path)
    try:
        return path.read_bytes()
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot read ({exc.strerror or exc})") from None


def read_together(directory: Path, names: Sequence[str]) -> dict[str, bytes] | None:
    """The bytes of the files ``names`` in one directory, all from the same directory.

    The directory is opened once and the files are read through it, so a
    directory renamed or exchanged meanwhile (another save) cannot mix its
    files with the new ones. None if a file cannot be read this way (it is
    missing, or was removed with a replaced directory): read by path then,
    for an error that names it, or try again.
    """
    try:
        fd = os.open(directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return None
    try:
        result = {}
        for name in names:
            file = os.open(name, os.O_RDONLY, dir_fd=fd)
            with os.fdopen(file, "rb") as handle:
                result[name] = handle.read()
        return result
    except OSError:
        return None
    finally:
        os.close(fd)


def read_json(path: Path, data: bytes | None = None) -> tuple[Any, bytes]:
    """The JSON document in ``path`` (or in ``data``, read from it), and its bytes.

    Raises
    ------
    CheckpointError
        If the file is missing, a directory, unreadable, not UTF-8 or not
        valid JSON (a key given twice included).
    """
    data = _read_bytes(path) if data is None else data
    try:
        return loads(data), data
    except ValueError as exc:  # bad UTF-8, bad JSON, a repeated key or deep nesting
        raise CheckpointError(f"{path}: {exc}") from None


def read_tensors(
    path: Path, data: bytes | None = None
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Every tensor of the safetensors file ``path``, in its stored dtype, and its metadata.

    The header is checked by :func:`tuckerlib.io.open_checkpoint` first, whose
    errors say what is wrong (truncated, not a safetensors file, a bad
    entry); the tensors and metadata are then taken from the file's bytes
    (``data`` if given, read from it) with ``safetensors``, never unpickled.

    Raises
    ------
    CheckpointError
        If the file is missing, a directory, unreadable or malformed.
    """
    _require_file(path)
    with open_checkpoint(path):
        pass
    data = _read_bytes(path) if data is None else data
    try:
        tensors = load(data)
        size = int.from_bytes(data[:8], "little")
        metadata = json.loads(data[8 : 8 + size]).get("__metadata__") or {}
    except (SafetensorError, ValueError, RecursionError) as exc:
        raise CheckpointError(f"{path}: not a valid safetensors file ({exc})") from None
    return tensors, metadata


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
