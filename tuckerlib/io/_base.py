"""The read-only checkpoint mapping shared by every reader."""

from __future__ import annotations

import math
from abc import abstractmethod
from collections.abc import Iterator, Mapping
from pathlib import Path
from types import TracebackType
from typing import Any, NamedTuple

import numpy as np

__all__ = ["Checkpoint", "CheckpointError", "TensorInfo", "read_error", "unique_keys", "widen_bf16"]

# 1 MiB chunks keep the temporary copies of a streamed tensor small next to
# the tensor itself (and below the sizes malloc keeps around after freeing)
# while still amortizing the per-chunk overhead.
DEFAULT_CHUNK_BYTES = 2**20

# safetensors dtype codes and the little-endian NumPy dtype that stores them.
# BF16 is stored as its 16 raw bits and widened on read (see widen_bf16).
STORAGE_DTYPES: dict[str, np.dtype] = {
    "F64": np.dtype("<f8"),
    "F32": np.dtype("<f4"),
    "F16": np.dtype("<f2"),
    "BF16": np.dtype("<u2"),
    "I64": np.dtype("<i8"),
    "I32": np.dtype("<i4"),
    "I16": np.dtype("<i2"),
    "I8": np.dtype("i1"),
    "U64": np.dtype("<u8"),
    "U32": np.dtype("<u4"),
    "U16": np.dtype("<u2"),
    "U8": np.dtype("u1"),
    "BOOL": np.dtype("?"),
}

FLOATING_CODES = frozenset({"F64", "F32", "F16", "BF16"})


class CheckpointError(ValueError):
    """A checkpoint is missing, unreadable, malformed or unsafe to load.

    The message starts with the path of the file at fault.
    """


def unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """``json.loads`` hook: a JSON object naming a key twice is malformed.

    Python keeps the last of two equal keys silently, which would drop a
    tensor of a corrupt header or index without a word.
    """
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise ValueError(f"key {key!r} appears twice")
        result[key] = value
    return result


def read_error(path: Path, exc: OSError) -> CheckpointError:
    """A :class:`CheckpointError` naming ``path`` for an operating-system error reading it."""
    return CheckpointError(f"{path}: cannot read ({exc.strerror or exc})")


class TensorInfo(NamedTuple):
    """Shape and stored dtype of one tensor, known without reading its data.

    Attributes
    ----------
    shape : tuple of int
        The tensor's shape.
    dtype : str
        The stored dtype as a safetensors code: ``"F64"``, ``"F32"``,
        ``"F16"``, ``"BF16"``, ``"I64"`` ... ``"U8"``, ``"BOOL"`` (other
        codes, such as 8-bit floats, are reported as stored and cannot be
        read).
    """

    shape: tuple[int, ...]
    dtype: str

    @property
    def is_floating(self) -> bool:
        """Whether the stored dtype is a floating-point type this package reads."""
        return self.dtype in FLOATING_CODES

    @property
    def numel(self) -> int:
        """Number of elements."""
        return math.prod(self.shape)


def widen_bf16(bits: np.ndarray) -> np.ndarray:
    """Convert raw bfloat16 bits (``uint16``) to ``float32``, exactly.

    A bfloat16 number is the upper half of a float32, so shifting its bits
    left by 16 gives the float32 of the same value; no PyTorch is needed.
    """
    return (bits.astype(np.uint32) << np.uint32(16)).view(np.float32)


def natural_dtype(code: str) -> np.dtype:
    """The NumPy dtype a tensor stored as ``code`` (a supported code) is returned in."""
    if code == "BF16":
        return np.dtype(np.float32)
    return STORAGE_DTYPES[code].newbyteorder("=")


class Checkpoint(Mapping[str, np.ndarray]):
    """A read-only, lazy mapping from tensor names to NumPy arrays.

    Opening a checkpoint reads its index only; each tensor is read when it
    is looked up. Subclasses exist for a single ``.safetensors`` file, a
    sharded directory and a PyTorch state dict; use :func:`open_checkpoint`.

    Indexing (``ckpt[name]``) returns an array that may be a read-only,
    memory-mapped view of the file (bfloat16 tensors are widened to a
    ``float32`` copy). :meth:`read` returns an array that owns its memory and
    releases the file pages it touched, so streaming a model tensor by tensor
    keeps the resident memory at about the size of one tensor.
    """

    path: Path
    _infos: dict[str, TensorInfo]

    def info(self, name: str) -> TensorInfo:
        """Shape and stored dtype of tensor ``name``, without reading its data.

        Raises
        ------
        KeyError
            If there is no tensor called ``name``.
        """
        try:
            return self._infos[name]
        except KeyError:
            raise KeyError(f"no tensor {name!r} in {self.path}") from None

    @property
    def files(self) -> tuple[Path, ...]:
        """Every file this checkpoint reads (for a sharded one, the index and its shards)."""
        return (self.path,)

    def __getitem__(self, name: str) -> np.ndarray:
        return self.read(name)

    def _target_dtype(self, name: str, dtype: np.dtype | type | str | None) -> np.dtype:
        code = self.info(name).dtype
        if code not in STORAGE_DTYPES:
            raise CheckpointError(f"{self.path}: tensor {name!r} has unsupported dtype {code}")
        if dtype is None:
            return natural_dtype(code)
        try:
            return np.dtype(dtype)
        except TypeError:
            raise TypeError(f"dtype must be a NumPy dtype, got {dtype!r}") from None

    def __iter__(self) -> Iterator[str]:
        return iter(self._infos)

    def __len__(self) -> int:
        return len(self._infos)

    def __contains__(self, name: object) -> bool:
        return name in self._infos

    @abstractmethod
    def chunks(
        self, name: str, dtype: np.dtype | None = None, chunk_bytes: int = DEFAULT_CHUNK_BYTES
    ) -> Iterator[np.ndarray]:
        """Yield the flattened (C-order) tensor ``name`` in consecutive 1-D pieces.

        Each piece is a fresh array of ``dtype`` (default: the natural dtype
        of the stored one, ``float32`` for bfloat16) of at most about
        ``chunk_bytes`` bytes of stored data; the file pages behind it are
        released once it has been produced, where the platform allows it.

        Raises
        ------
        KeyError
            If there is no tensor called ``name``.
        CheckpointError
            If the tensor's dtype cannot be read.
        TypeError, ValueError
            If ``dtype`` is not a dtype or ``chunk_bytes`` not an integer >= 1.
        """

    @abstractmethod
    def close(self) -> None:
        """Release the file handles; arrays already returned stay valid."""

    def read(self, name: str, dtype: np.dtype | type | str | None = None) -> np.ndarray:
        """Return tensor ``name`` as a new array that owns its memory.

        Parameters
        ----------
        name : str
            The tensor's name.
        dtype : dtype-like, optional
            The dtype of the result; default: the natural dtype of the stored
            one (``float32`` for bfloat16).

        Returns
        -------
        numpy.ndarray
            The tensor, converted chunk by chunk so that the temporary memory
            stays at about 1 MiB beyond the result.

        Raises
        ------
        KeyError
            If there is no tensor called ``name``.
        CheckpointError
            If the tensor's dtype cannot be read.
        TypeError
            If ``dtype`` is not a dtype.
        """
        info = self.info(name)
        target = self._target_dtype(name, dtype)
        out = np.empty(info.numel, dtype=target)
        start = 0
        for piece in self.chunks(name, target):
            out[start : start + piece.size] = piece
            start += piece.size
        return out.reshape(info.shape)

    def __enter__(self) -> Checkpoint:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({str(self.path)!r}, {len(self)} tensors)"
