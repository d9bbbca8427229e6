r"""Adapter directories (flora or PEFT LoRA) read as Tucker updates, one layer at a time.

Both formats store, for every adapted weight ``W0``, factors whose product
is the update :math:`\Delta W` the adapter adds to it. :func:`open_adapter` reads
either format into the same form, :math:`\Delta W = \text{scale} \cdot \text{core} \times_0 F_0
\dots \times_{N-1} F_{N-1}` over the weight's own axes, without PyTorch and without forming
:math:`\Delta W`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

import numpy as np

from tuckerlib._tucker import tucker_to_tensor
from tuckerlib.io._base import Checkpoint, CheckpointError
from tuckerlib.io._open import open_checkpoint
from tuckerlib.io.flora_format import loads

__all__ = ["CONFIG_NAME", "Adapter", "AdapterError", "AdapterLayer", "read_config"]

CONFIG_NAME = "adapter_config.json"
#: Weight files an adapter directory may hold, in order of preference.
WEIGHT_NAMES = ("adapter_model.safetensors", "adapter_model.bin")


class AdapterError(CheckpointError):
    """An adapter directory that is malformed or whose update has no exact Tucker form."""


@dataclass(frozen=True)
class AdapterLayer:
    r"""The update :math:`\Delta W` one adapter makes to one weight, as a Tucker tensor.

    :math:`\Delta W = \text{scale} \cdot \text{core} \times_0 F_0 \times_1 F_1 \dots \times_{N-1}
    F_{N-1}` where ``F_n`` is
    ``factors[n]``, or the identity of size ``shape[n]`` where that is
    ``None``. Modes are the weight's own axes: Linear ``(out, in)``, ConvNd
    ``(out, in/groups, *kernel)``, Embedding ``(num_embeddings, dim)``.

    Attributes
    ----------
    name : str
        The adapted module's name, or for kind ``"Parameter"`` the
        parameter's full name.
    kind : str
        ``"Linear"``, ``"Conv1d"``, ``"Conv2d"``, ``"Conv3d"``,
        ``"Embedding"`` or ``"Parameter"`` (any other weight, e.g. one stored
        transposed).
    shape : tuple of int
        The weight's shape.
    core : numpy.ndarray
        Shape :math:`(K_0, \dots, K_{N-1})`.
    factors : tuple of numpy.ndarray or None
        ``factors[n]`` has shape ``(shape[n], K_n)``; ``None`` stands for
        the identity (:math:`K_n = \text{shape}[n]`).
    scale : float
        The scalar in front.
    stored_ranks : tuple of int
        The ranks as the adapter stores them: the FLoRA ranks, or ``(r,)``
        for a LoRA pair of rank ``r``.
    stored_params : int
        Entries the adapter stores for this layer's weight update.
    dropout : float
        Dropout on the adapter branch's input during training.
    geometry : dict or None
        What the update a layer applies depends on beyond the weight's
        shape, where a flora directory records it (Conv: ``groups``,
        ``stride``, ``padding``, ``dilation``, ``padding_mode``; Embedding:
        ``padding_idx``, ``max_norm``); None otherwise. An embedding's
        ``padding_idx`` row is already zero in ``factors[0]``: the layer
        gives it no update.
    bias : numpy.ndarray or None
        The bias update :math:`\Delta b` the adapter adds to the layer's bias (to
        every output channel), or None: a flora layer's ``bias`` update as
        stored, a PEFT pair's :math:`\text{scaling} \cdot \texttt{lora_B.bias}` (``lora_bias``).
        Shape ``(shape[0],)``, or ``(shape[1],)`` for a pair read with
        ``fan_in_fan_out`` as a weight stored ``(in, out)``. It is no part
        of :math:`\Delta W` (:meth:`to_tensor`) and its entries are not counted in
        ``stored_params``.
    """

    name: str
    kind: str
    shape: tuple[int, ...]
    core: np.ndarray = field(repr=False)
    factors: tuple[np.ndarray | None, ...] = field(repr=False)
    scale: float
    stored_ranks: tuple[int, ...]
    stored_params: int
    dropout: float = 0.0
    geometry: Mapping[str, Any] | None = None
    bias: np.ndarray | None = field(default=None, repr=False)

    def dense_factors(self, dtype: np.dtype | type | None = None) -> list[np.ndarray]:
        """The factors with every identity written out, in ``dtype`` (default: the core's)."""
        dtype = self.core.dtype if dtype is None else np.dtype(dtype)
        return [
            np.eye(size, dtype=dtype) if f is None else f.astype(dtype, copy=False)
            for size, f in zip(self.shape, self.factors, strict=True)
        ]

    def to_tensor(self, dtype: np.dtype | type | None = None) -> np.ndarray:
        r""":math:`\Delta W` itself, of the weight's shape (for checks; analysis never needs it).

        Parameters
        ----------
        dtype : dtype-like, optional
            The precision to compute and return it in; default: the core's.

        Returns
        -------
        numpy.ndarray
            :math:`\Delta W` in ``dtype``.
        """
        dtype = self.core.dtype if dtype is None else np.dtype(dtype)
        core = self.core.astype(dtype, copy=False) * self.scale
        return tucker_to_tensor(core, self.dense_factors(dtype))


#: Reads one layer's tensors from the open weight file.
LayerReader = Callable[[Checkpoint], AdapterLayer]


class Adapter(Mapping[str, AdapterLayer]):
    """An open adapter directory: a lazy mapping from layer name to :class:`AdapterLayer`.

    Opening reads the config and the weight file's index; each layer's
    tensors are read when it is looked up. Use :func:`open_adapter`.

    Attributes
    ----------
    path : pathlib.Path
        The directory.
    format : str
        ``"flora"`` or ``"lora"`` (a PEFT LoRA adapter).
    config : dict
        The parsed ``adapter_config.json``.
    skipped : list of (str, str)
        ``(name, reason)`` for what the directory holds besides low-rank
        updates (e.g. ``modules_to_save`` copies) or holds in a form with no
        Tucker equivalent; those names are not keys of the mapping.
    """

    def __init__(
        self,
        path: Path,
        fmt: str,
        config: dict[str, Any],
        weights: Checkpoint,
        readers: Mapping[str, LayerReader],
        skipped: list[tuple[str, str]],
    ) -> None:
        self.path = path
        self.format = fmt
        self.config = config
        self.skipped = skipped
        self._weights = weights
        self._readers = dict(readers)

    @property
    def files(self) -> tuple[Path, ...]:
        """Every file this adapter reads: its config and its weights."""
        return (self.path / CONFIG_NAME, *self._weights.files)

    def __getitem__(self, name: str) -> AdapterLayer:
        try:
            reader = self._readers[name]
        except KeyError:
            raise KeyError(f"no adapted layer {name!r} in {self.path}") from None
        return reader(self._weights)

    def __iter__(self) -> Iterator[str]:
        return iter(self._readers)

    def __len__(self) -> int:
        return len(self._readers)

    def __contains__(self, name: object) -> bool:
        return name in self._readers

    def close(self) -> None:
        """Release the weight file; layers already read stay valid."""
        self._weights.close()

    def __enter__(self) -> Adapter:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Adapter({str(self.path)!r}, format={self.format!r}, {len(self)} layers)"


def read_config(directory: Path) -> dict[str, Any]:
    """``adapter_config.json`` of ``directory`` as a dict; AdapterError if absent or not JSON."""
    path = directory / CONFIG_NAME
    if not path.is_file():
        raise AdapterError(f"{directory}: not an adapter directory (no {CONFIG_NAME})")
    try:
        document = loads(path.read_bytes())
    except ValueError as exc:  # bad UTF-8 or JSON, a repeated key, deep nesting
        raise AdapterError(f"{path}: {exc}") from None
    if not isinstance(document, dict):
        raise AdapterError(f"{path}: must hold a JSON object")
    return document


def open_weights(directory: Path) -> Checkpoint:
    """The directory's adapter weight file, opened lazily."""
    for name in WEIGHT_NAMES:
        if (directory / name).is_file():
            return open_checkpoint(directory / name)
    raise AdapterError(f"{directory}: no adapter weights ({' or '.join(WEIGHT_NAMES)})")


def check_shape(path: Path, weights: Checkpoint, key: str, shape: tuple[int, ...]) -> None:
    """AdapterError unless ``key`` is a floating tensor of ``shape`` in ``weights``."""
    if key not in weights:
        raise AdapterError(f"{path}: tensor {key!r} is missing")
    info = weights.info(key)
    if info.shape != shape or not info.is_floating:
        raise AdapterError(
            f"{path}: tensor {key!r} must be floating with shape {list(shape)}, got "
            f"{info.dtype} {list(info.shape)}"
        )


def finite_scale(value: object, what: str) -> float:
    """A finite, non-zero number, or AdapterError naming ``what``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise AdapterError(f"{what} must be a number, got {value!r}")
    if not math.isfinite(value) or value == 0:
        raise AdapterError(f"{what} must be finite and non-zero, got {value!r}")
    return float(value)
