"""Read PyTorch state dicts (``.pt``/``.bin``) without ever unpickling code.

``torch.load(weights_only=True)`` only rebuilds tensors, containers and
primitive values; a pickle that asks for anything else (``os.system``, a
custom class) is refused before it runs. PyTorch is imported only when such
a file is opened.
"""

from __future__ import annotations

import os
import pickle
from collections.abc import Iterator, Mapping
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
)

__all__ = ["TorchCheckpoint"]

_CODES = {
    "float64": "F64",
    "float32": "F32",
    "float16": "F16",
    "bfloat16": "BF16",
    "int64": "I64",
    "int32": "I32",
    "int16": "I16",
    "int8": "I8",
    "uint64": "U64",
    "uint32": "U32",
    "uint16": "U16",
    "uint8": "U8",
    "bool": "BOOL",
}

# Training checkpoints often wrap the state dict next to optimizer state.
_WRAPPER_KEYS = ("state_dict", "model_state_dict", "model", "module")


def _import_torch(path: Path) -> Any:
    try:
        import torch
    except ImportError:
        raise CheckpointError(
            f"{path}: reading a .pt/.bin checkpoint needs PyTorch (pip install torch); "
            "or convert it to .safetensors"
        ) from None
    return torch


def _refusal_reason(exc: BaseException) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    # The line naming what was refused ("Unsupported global: ...", "Trying to
    # load unsupported GLOBAL ...") moves between PyTorch versions.
    detail = [line for line in lines if "unsupported" in line.lower() or "Unpickler error" in line]
    return (detail or lines or [type(exc).__name__])[0]


def _load(torch: Any, path: Path) -> Any:
    try:
        try:
            return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as exc:
            if "mmap" not in str(exc):
                raise
            # Files in the legacy (pre-1.6, non-zip) format cannot be mapped.
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise CheckpointError(
            f"{path}: refused to load: the pickle holds more than tensors "
            f"(torch.load(weights_only=True): {_refusal_reason(exc)})"
        ) from None
    except Exception as exc:
        # torch.load on arbitrary bytes fails with many exception types
        # (IndexError, KeyError, zip errors...); all mean "not a checkpoint".
        raise CheckpointError(
            f"{path}: not a readable PyTorch checkpoint ({_refusal_reason(exc)})"
        ) from None


def _tensors_of(torch: Any, obj: Any, path: Path) -> dict[str, Any]:
    if not isinstance(obj, Mapping):
        return {}
    tensors: dict[str, Any] = {}
    keys: dict[str, Any] = {}
    for key, value in obj.items():
        if not isinstance(value, torch.Tensor):
            continue
        name = str(key)
        if name in keys:
            raise CheckpointError(
                f"{path}: keys {keys[name]!r} and {key!r} of the state dict both read as "
                f"tensor name {name!r}"
            )
        tensors[name], keys[name] = value, key
    if tensors:
        return tensors
    for key in _WRAPPER_KEYS:
        nested = _tensors_of(torch, obj.get(key), path)
        if nested:
            return nested
    return {}


def _unreadable(torch: Any, tensor: Any) -> str | None:
    """Why ``tensor`` holds no dense values to read, or ``None`` if it does."""
    if tensor.is_nested:
        return "is a nested tensor; only dense tensors can be read"
    if tensor.layout != torch.strided:
        return f"is a sparse tensor ({tensor.layout}); only dense tensors can be read"
    if tensor.device.type == "meta":
        return "is a meta tensor: it has a shape but holds no values"
    return None


def _code(dtype: Any) -> str:
    name = str(dtype).removeprefix("torch.")
    return _CODES.get(name, name)


class TorchCheckpoint(Checkpoint):
    """A PyTorch state dict loaded with ``torch.load(weights_only=True, mmap=True)``.

    The tensors of a top-level dict are used; if it holds none, those under
    ``"state_dict"``, ``"model_state_dict"``, ``"model"`` or ``"module"``.
    Files in PyTorch's zip format are memory-mapped by PyTorch (their pages
    are not released after reading, unlike safetensors).

    Parameters
    ----------
    path : path-like
        The ``.pt``/``.bin`` file.

    Raises
    ------
    CheckpointError
        If PyTorch is missing, the file is not a PyTorch checkpoint or cannot
        be read, its pickle asks for anything but tensors and plain
        containers, or it holds no tensors, or a tensor that holds no dense
        values (a meta, sparse or nested tensor).
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        torch = _import_torch(self.path)
        self._tensors = _tensors_of(torch, _load(torch, self.path), self.path)
        if not self._tensors:
            raise CheckpointError(f"{self.path}: no tensors found in this PyTorch checkpoint")
        for name, tensor in self._tensors.items():
            reason = _unreadable(torch, tensor)
            if reason is not None:
                raise CheckpointError(f"{self.path}: tensor {name!r} {reason}")
        self._infos = {
            name: TensorInfo(tuple(int(d) for d in t.shape), _code(t.dtype))
            for name, t in self._tensors.items()
        }

    def _tensor(self, name: str) -> Any:
        if name not in self._tensors:
            raise CheckpointError(f"{self.path}: checkpoint is closed")
        return self._tensors[name].detach()

    def __getitem__(self, name: str) -> np.ndarray:
        if self.info(name).dtype == "BF16" or self.info(name).dtype not in STORAGE_DTYPES:
            return self.read(name)
        return self._tensor(name).numpy()

    def chunks(
        self, name: str, dtype: np.dtype | None = None, chunk_bytes: int = DEFAULT_CHUNK_BYTES
    ) -> Iterator[np.ndarray]:
        """Yield the flattened tensor ``name`` in pieces; see :meth:`Checkpoint.chunks`."""
        info = self.info(name)
        target = self._target_dtype(name, dtype)
        chunk_bytes = check_int(chunk_bytes, "chunk_bytes", 1)
        flat = self._tensor(name).reshape(-1)
        step = max(1, chunk_bytes // flat.element_size())
        for start in range(0, info.numel, step):
            piece = flat[start : start + step]
            if info.dtype == "BF16":
                piece = piece.float()
            yield piece.numpy().astype(target, copy=True)

    def close(self) -> None:
        """Drop the references to the loaded tensors."""
        self._tensors = {}
