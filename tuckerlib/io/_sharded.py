"""Read a checkpoint split into shards listed by a ``*.index.json`` file.

This is the layout Hugging Face uses for large models: a
``model.safetensors.index.json`` whose ``"weight_map"`` maps each tensor name
to the shard file (in the same directory) that holds it.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path, PurePosixPath, PureWindowsPath

import numpy as np

from tuckerlib.io._base import (
    DEFAULT_CHUNK_BYTES,
    Checkpoint,
    CheckpointError,
    read_error,
    unique_keys,
)
from tuckerlib.io._files import open_file

__all__ = ["ShardedCheckpoint", "shard_path"]


def _read_weight_map(path: Path) -> dict[str, str]:
    try:
        index = json.loads(path.read_text(encoding="utf-8"), object_pairs_hook=unique_keys)
    except OSError as exc:
        raise read_error(path, exc) from None
    except (ValueError, RecursionError) as exc:  # bad UTF-8 or JSON, a repeated key, deep nesting
        raise CheckpointError(f"{path}: not a checkpoint index (bad JSON: {exc})") from None
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()
    ):
        raise CheckpointError(f'{path}: not a checkpoint index (no "weight_map" of names to files)')
    return weight_map


def shard_path(index: Path, filename: str) -> Path:
    """Where the shard ``filename`` named in ``index`` lies: inside the index's directory.

    The name is judged as text, before anything is opened: it must be a
    relative path (no drive, no root, no NUL) whose ``..`` parts never climb
    above the directory. Links already on disk are the owner's arrangement
    and are followed (the Hugging Face cache keeps shards as links into a
    ``blobs`` folder).

    Raises
    ------
    CheckpointError
        Naming the index and the entry, for a name that leaves the directory.
    """
    windows = PureWindowsPath(filename)
    depth = 0
    for part in PurePosixPath(filename.replace("\\", "/")).parts:
        depth += -1 if part == ".." else int(part not in ("/", "."))
        if depth < 0:
            break
    if not filename or "\0" in filename or windows.drive or windows.root or depth < 0:
        raise CheckpointError(
            f"{index}: shard {filename!r} is not a file name inside {index.parent}: an index "
            "may only name files in its own directory"
        )
    return index.parent / filename


class ShardedCheckpoint(Checkpoint):
    """Tensors spread over several files, found through an index file.

    Every shard is opened (for safetensors that reads only its header) and
    checked to hold the tensors the index assigns to it.

    Parameters
    ----------
    path : path-like
        The ``*.index.json`` file; shard names in it are relative to its
        directory.

    Raises
    ------
    CheckpointError
        If the index is malformed, a shard is missing or unreadable, or a
        shard lacks a tensor the index assigns to it.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        weight_map = _read_weight_map(self.path)
        self._shards: dict[str, Checkpoint] = {}
        try:
            paths = {
                name: shard_path(self.path, name) for name in dict.fromkeys(weight_map.values())
            }
            for filename, path in paths.items():
                if not path.is_file():
                    raise CheckpointError(f"{self.path}: shard {filename!r} is missing")
                self._shards[filename] = open_file(path)
            self._owner = {name: self._shards[filename] for name, filename in weight_map.items()}
            for name, shard in self._owner.items():
                if name not in shard:
                    raise CheckpointError(
                        f"{self.path}: tensor {name!r} is not in shard {shard.path.name!r}"
                    )
        except BaseException:
            self.close()
            raise
        self._infos = {name: shard.info(name) for name, shard in self._owner.items()}

    @property
    def files(self) -> tuple[Path, ...]:
        """The index file and every shard."""
        return (self.path, *(shard.path for shard in self._shards.values()))

    def __getitem__(self, name: str) -> np.ndarray:
        self.info(name)
        return self._owner[name][name]

    def chunks(
        self, name: str, dtype: np.dtype | None = None, chunk_bytes: int = DEFAULT_CHUNK_BYTES
    ) -> Iterator[np.ndarray]:
        """Yield the flattened tensor ``name`` in pieces; see :meth:`Checkpoint.chunks`."""
        self.info(name)
        return self._owner[name].chunks(name, dtype, chunk_bytes)

    def close(self) -> None:
        """Close every shard."""
        for shard in self._shards.values():
            shard.close()
