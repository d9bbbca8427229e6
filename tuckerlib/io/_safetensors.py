"""A pure-NumPy, memory-mapped reader of ``.safetensors`` files.

The format (https://github.com/huggingface/safetensors) is an 8-byte
little-endian header length, a JSON header mapping each tensor name to its
dtype, shape and byte range, then the raw little-endian data. Nothing in it
is executable, so reading it is safe whatever its origin.
"""

from __future__ import annotations

import contextlib
import json
import math
import mmap
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from tuckerlib._validation import check_int
from tuckerlib.io._base import (
    DEFAULT_CHUNK_BYTES,
    STORAGE_DTYPES,
    Checkpoint,
    CheckpointError,
    TensorInfo,
    read_error,
    unique_keys,
    widen_bf16,
)

__all__ = ["SafetensorsCheckpoint"]

# The reference implementation refuses headers above 100 MB; so do we, so a
# corrupt length field cannot make us allocate gigabytes.
MAX_HEADER_BYTES = 100_000_000


def _read_header(path: Path, handle: Any, size: int) -> tuple[dict[str, Any], int]:
    if size < 8:
        raise CheckpointError(f"{path}: not a safetensors file (only {size} bytes)")
    length = int.from_bytes(handle.read(8), "little")
    if length > min(size - 8, MAX_HEADER_BYTES):
        raise CheckpointError(
            f"{path}: not a safetensors file (header length {length} exceeds the file)"
        )
    try:
        header = json.loads(handle.read(length), object_pairs_hook=unique_keys)
    except (ValueError, RecursionError) as exc:  # bad UTF-8 or JSON, a repeated key, deep nesting
        raise CheckpointError(f"{path}: not a safetensors file (bad JSON header: {exc})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: not a safetensors file (header is not a JSON object)")
    return header, 8 + length


def _naturals(value: Any, count: int | None = None) -> tuple[int, ...] | None:
    """``value`` as a tuple of JSON integers >= 0 (of ``count`` entries), else ``None``.

    ``"3"``, ``4.9`` or ``true`` are not sizes: converting them would read
    a corrupt header as a different, valid-looking tensor.
    """
    if not isinstance(value, list) or (count is not None and len(value) != count):
        return None
    if not all(type(v) is int and v >= 0 for v in value):
        return None
    return tuple(value)


def _parse_entry(path: Path, name: str, entry: Any, data_bytes: int) -> tuple[TensorInfo, int, int]:
    if not isinstance(entry, dict) or not isinstance(entry.get("dtype"), str):
        raise CheckpointError(f"{path}: malformed header entry for tensor {name!r}")
    code = entry["dtype"]
    shape = _naturals(entry.get("shape"))
    offsets = _naturals(entry.get("data_offsets"), 2)
    if shape is None:
        raise CheckpointError(
            f"{path}: malformed header entry for tensor {name!r}: shape must be a list of "
            f"non-negative integers, got {entry.get('shape')!r}"
        )
    if offsets is None or offsets[0] > offsets[1]:
        raise CheckpointError(
            f"{path}: malformed header entry for tensor {name!r}: data_offsets must be two "
            f"integers 0 <= begin <= end, got {entry.get('data_offsets')!r}"
        )
    begin, end = offsets
    if end > data_bytes:
        raise CheckpointError(f"{path}: tensor {name!r} extends past the end of the file")
    storage = STORAGE_DTYPES.get(code)
    if storage is not None and end - begin != math.prod(shape) * storage.itemsize:
        raise CheckpointError(
            f"{path}: tensor {name!r} has {end - begin} bytes but shape {list(shape)} "
            f"of {code} needs {math.prod(shape) * storage.itemsize}"
        )
    return TensorInfo(shape, code), begin, end


def _check_tiling(path: Path, spans: list[tuple[int, int, str]], data_bytes: int) -> None:
    """Refuse byte ranges that do not cover the data section once, in order.

    The reference parser requires it: no two tensors share bytes (one would
    alias the other), and no byte belongs to none.
    """
    position = 0
    for begin, end, name in sorted(spans):
        if begin != position:
            problem = "overlaps the tensor before it" if begin < position else "leaves a gap"
            raise CheckpointError(
                f"{path}: tensor {name!r} (bytes {begin}-{end}) {problem}: data_offsets must "
                "cover the data section once, without overlaps or gaps"
            )
        position = end
    if position != data_bytes:
        raise CheckpointError(
            f"{path}: the tensors cover {position} of the {data_bytes} data bytes: "
            "data_offsets must cover the data section once, without overlaps or gaps"
        )


class SafetensorsCheckpoint(Checkpoint):
    """One ``.safetensors`` file, memory-mapped; tensors in file order.

    Parameters
    ----------
    path : path-like
        The file.

    Attributes
    ----------
    metadata : dict of str to str
        The header's ``__metadata__`` (empty when absent).

    Raises
    ------
    CheckpointError
        If the file is not a well-formed safetensors file or cannot be read
        (a directory, no permission...).
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        try:
            with self.path.open("rb") as handle:
                size = os.fstat(handle.fileno()).st_size
                header, self._data_start = _read_header(self.path, handle, size)
                self._mmap: mmap.mmap | None = mmap.mmap(
                    handle.fileno(), 0, access=mmap.ACCESS_READ
                )
        except OSError as exc:
            raise read_error(self.path, exc) from None
        metadata = header.pop("__metadata__", None) or {}
        self.metadata: dict[str, str] = dict(metadata) if isinstance(metadata, dict) else {}
        data_bytes = size - self._data_start
        try:
            parsed = {
                name: _parse_entry(self.path, name, entry, data_bytes)
                for name, entry in header.items()
            }
            spans = [(begin, end, name) for name, (_, begin, end) in parsed.items()]
            _check_tiling(self.path, spans, data_bytes)
        except CheckpointError:
            self.close()
            raise
        order = sorted(parsed, key=lambda name: parsed[name][1])
        self._infos = {name: parsed[name][0] for name in order}
        self._offsets = {name: self._data_start + parsed[name][1] for name in order}

    def _raw(self, name: str, start: int = 0, count: int | None = None) -> np.ndarray:
        info = self.info(name)
        storage = STORAGE_DTYPES[info.dtype]
        if self._mmap is None:
            raise CheckpointError(f"{self.path}: checkpoint is closed")
        count = info.numel - start if count is None else count
        offset = self._offsets[name] + start * storage.itemsize
        return np.frombuffer(self._mmap, dtype=storage, count=count, offset=offset)

    def __getitem__(self, name: str) -> np.ndarray:
        info = self.info(name)
        if info.dtype == "BF16" or info.dtype not in STORAGE_DTYPES:
            return self.read(name)
        return self._raw(name).reshape(info.shape)

    def chunks(
        self, name: str, dtype: np.dtype | None = None, chunk_bytes: int = DEFAULT_CHUNK_BYTES
    ) -> Iterator[np.ndarray]:
        """Yield the flattened tensor ``name`` in pieces; see :meth:`Checkpoint.chunks`."""
        info = self.info(name)
        target = self._target_dtype(name, dtype)
        chunk_bytes = check_int(chunk_bytes, "chunk_bytes", 1)
        itemsize = STORAGE_DTYPES[info.dtype].itemsize
        step = max(1, chunk_bytes // itemsize)
        for start in range(0, info.numel, step):
            count = min(step, info.numel - start)
            raw = self._raw(name, start, count)
            piece = widen_bf16(raw) if info.dtype == "BF16" else raw
            piece = piece.astype(target, copy=piece is raw)
            del raw
            self._release(self._offsets[name] + start * itemsize, count * itemsize)
            yield piece

    def _release(self, offset: int, nbytes: int) -> None:
        # Clean file-backed pages count towards the resident set until they
        # are unmapped; dropping them keeps a streamed read at one tensor.
        if self._mmap is None or not hasattr(mmap, "MADV_DONTNEED"):
            return
        begin = offset - offset % mmap.PAGESIZE
        length = min(offset + nbytes, len(self._mmap)) - begin
        if length > 0:
            self._mmap.madvise(mmap.MADV_DONTNEED, begin, length)

    def close(self) -> None:
        """Unmap the file once no array returned by indexing refers to it."""
        if self._mmap is not None:
            mapped, self._mmap = self._mmap, None
            # Views handed out by __getitem__ keep the mapping alive; it is
            # unmapped when the last of them is garbage-collected.
            with contextlib.suppress(BufferError):
                mapped.close()
