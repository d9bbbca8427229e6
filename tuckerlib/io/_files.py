"""Open one checkpoint file with the reader its format needs."""

from __future__ import annotations

from pathlib import Path

from tuckerlib.io._base import Checkpoint, CheckpointError, read_error
from tuckerlib.io._safetensors import SafetensorsCheckpoint
from tuckerlib.io._torch import TorchCheckpoint

__all__ = ["open_file"]

TORCH_SUFFIXES = frozenset({".pt", ".pth", ".bin", ".ckpt"})

# A zip archive (PyTorch >= 1.6) or a raw pickle stream (legacy format).
_TORCH_MAGIC = (b"PK\x03\x04", b"\x80")


def _looks_like_torch(path: Path) -> bool:
    try:
        with path.open("rb") as handle:
            start = handle.read(4)
    except OSError as exc:
        raise read_error(path, exc) from None
    return start.startswith(_TORCH_MAGIC)


def open_file(path: Path) -> Checkpoint:
    """Open a single ``.safetensors`` or PyTorch checkpoint file.

    The suffix decides the reader; a file with another suffix is recognized
    by its first bytes.
    """
    if not path.is_file():
        what = "not a regular file" if path.exists() else "no such file"
        raise CheckpointError(f"{path}: {what}")
    if path.suffix == ".safetensors":
        return SafetensorsCheckpoint(path)
    if path.suffix in TORCH_SUFFIXES or _looks_like_torch(path):
        return TorchCheckpoint(path)
    return SafetensorsCheckpoint(path)
