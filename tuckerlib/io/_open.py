"""The public entry point: open any supported checkpoint by path."""

from __future__ import annotations

import os
from pathlib import Path

from tuckerlib.io._base import Checkpoint, CheckpointError, read_error
from tuckerlib.io._files import TORCH_SUFFIXES, open_file
from tuckerlib.io._sharded import ShardedCheckpoint

__all__ = ["open_checkpoint"]


def _only(candidates: list[Path], directory: Path, what: str) -> Path | None:
    if len(candidates) > 1:
        names = ", ".join(sorted(p.name for p in candidates))
        raise CheckpointError(f"{directory}: several {what} ({names}); pass one of them")
    return candidates[0] if candidates else None


def _resolve_directory(directory: Path) -> Path:
    try:
        return _find_checkpoint(directory)
    except OSError as exc:
        raise read_error(directory, exc) from None


def _find_checkpoint(directory: Path) -> Path:
    indexes = sorted(directory.glob("*.index.json"))
    safetensors_indexes = [p for p in indexes if p.name.endswith(".safetensors.index.json")]
    index = _only(safetensors_indexes or indexes, directory, "index files")
    if index is not None:
        return index
    single = _only(sorted(directory.glob("*.safetensors")), directory, "safetensors files")
    if single is None:
        torch_files = [p for p in sorted(directory.iterdir()) if p.suffix in TORCH_SUFFIXES]
        single = _only(torch_files, directory, "PyTorch checkpoint files")
    if single is None:
        raise CheckpointError(
            f"{directory}: no checkpoint here (no *.index.json, *.safetensors or .pt/.bin file)"
        )
    return single


def open_checkpoint(path: str | os.PathLike[str]) -> Checkpoint:
    """Open a model checkpoint as a lazy, read-only mapping of name to array.

    Only the index is read when opening; each tensor is read (memory-mapped
    where the format allows) when it is looked up, so a model of any size can
    be processed one tensor at a time.

    Parameters
    ----------
    path : path-like
        One of:

        * a ``.safetensors`` file (read with NumPy alone, no PyTorch);
        * a ``*.index.json`` file listing shards, or a directory holding one
          (``*.safetensors.index.json`` preferred), as Hugging Face writes
          large models; a directory holding a single ``.safetensors`` or
          ``.pt``/``.bin`` file opens that file;
        * a PyTorch ``.pt``/``.pth``/``.bin``/``.ckpt`` state dict, loaded with
          ``torch.load(weights_only=True)`` so that no code in it runs.

    Returns
    -------
    Checkpoint
        A mapping from tensor name to ``numpy.ndarray``, also usable as
        a context manager that closes the files.

    Raises
    ------
    CheckpointError
        If the path does not exist or cannot be read, the format is not
        recognized or is malformed, PyTorch is needed but missing, or a
        PyTorch pickle asks for anything but tensors. The message starts
        with the path of the file at fault.
    TypeError
        If ``path`` is not a string or path-like object.
    ValueError
        If ``path`` is empty.

    See Also
    --------
    Checkpoint.read : Read one tensor into memory, streaming from the file.

    Notes
    -----
    ``bfloat16`` tensors are widened to ``float32`` exactly (a bfloat16 is the
    upper half of a float32), ``float16`` ones are returned as stored; neither
    needs PyTorch.

    Examples
    --------
    >>> import tempfile
    >>> from pathlib import Path
    >>> import numpy as np
    >>> from safetensors.numpy import save_file
    >>> from tuckerlib.io import open_checkpoint
    >>> path = Path(tempfile.mkdtemp()) / "model.safetensors"
    >>> save_file({"fc.weight": np.ones((3, 4), np.float32)}, path)
    >>> with open_checkpoint(path) as ckpt:
    ...     print(list(ckpt), ckpt.info("fc.weight"), ckpt["fc.weight"].sum())
    ['fc.weight'] TensorInfo(shape=(3, 4), dtype='F32') 12.0
    """
    if not isinstance(path, str | os.PathLike):
        raise TypeError(f"path must be a str or os.PathLike, got {type(path).__name__}")
    if not os.fspath(path):
        raise ValueError("path is empty; give the checkpoint file or directory")
    path = Path(path)
    if path.is_dir():
        path = _resolve_directory(path)
    elif not path.exists():
        raise CheckpointError(f"{path}: no such file or directory")
    if path.name.endswith(".index.json"):
        return ShardedCheckpoint(path)
    return open_file(path)
