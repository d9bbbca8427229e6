"""Read a flora adapter directory (format versions 1 and 2) as Tucker updates.

The layout (documented in :mod:`flora.io`): ``adapter_config.json`` lists
each layer's ``kind``, ``shape``, ``ranks``, ``scale`` and ``init``; the
weight file holds ``NAME.core`` and ``NAME.factors.n`` (and, for
``init="hosvd"``, the adapter at initialization under ``NAME.initial_core``
and ``NAME.initial_factors.n``). Version 2 adds ``modules_to_save``: whole
modules saved under keys of their own, which are no low-rank update, an
optional per-layer ``geometry`` (Conv and Embedding layers): an embedding's
``padding_idx`` row gets no update, so it is zero in the update read here,
and an optional ``"bias": true`` (Linear and ConvNd layers) for a bias
update ``Δb`` stored as ``NAME.bias`` of shape ``(shape[0],)``, read as
the layer's ``bias``.
"""

from __future__ import annotations

from collections.abc import Mapping
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from tuckerlib._ranks import tucker_params
from tuckerlib.io._adapter import (
    CONFIG_NAME,
    Adapter,
    AdapterError,
    AdapterLayer,
    check_shape,
    finite_scale,
    open_weights,
)
from tuckerlib.io._base import Checkpoint
from tuckerlib.io._kinds import BIAS_KINDS, KINDS, kind_rule

__all__ = ["FLORA_KINDS", "FORMAT_VERSIONS", "open_flora"]

FORMAT_VERSIONS = (1, 2)
#: The kinds a flora adapter may record (a live view of :mod:`tuckerlib.io._kinds`).
FLORA_KINDS = KINDS
INIT_MODES = ("zero_core", "hosvd", "gaussian")
_REQUIRED = ("kind", "shape", "ranks", "scale", "init")


def _ints(value: object) -> bool:
    return isinstance(value, list) and bool(value) and all(type(v) is int and v > 0 for v in value)


def _check_record(where: str, name: str, record: object) -> dict[str, Any]:
    if not isinstance(record, Mapping) or not set(_REQUIRED) <= set(record):
        raise AdapterError(f"{where}: layer {name!r} must be an object with keys {list(_REQUIRED)}")
    shape, ranks = record["shape"], record["ranks"]
    if record["kind"] not in FLORA_KINDS:
        raise AdapterError(f"{where}: layer {name!r} has unknown kind {record['kind']!r}")
    if not (_ints(shape) and _ints(ranks) and len(shape) == len(ranks)):
        raise AdapterError(
            f"{where}: layer {name!r}: shape and ranks must be lists of positive ints"
        )
    if any(r > s for r, s in zip(ranks, shape, strict=True)):
        raise AdapterError(f"{where}: layer {name!r}: ranks {ranks} exceed shape {shape}")
    if record["init"] not in INIT_MODES:
        raise AdapterError(f"{where}: layer {name!r} has unknown init {record['init']!r}")
    finite_scale(record["scale"], f"{where}: layer {name!r}: scale")
    dropout = record.get("dropout", 0.0)
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0 <= dropout < 1:
        raise AdapterError(f"{where}: layer {name!r}: dropout must lie in [0, 1), got {dropout!r}")
    if "geometry" in record:
        _check_geometry(where, name, record)
    bias = record.get("bias", False)
    if type(bias) is not bool or (bias and record["kind"] not in BIAS_KINDS):
        raise AdapterError(
            f"{where}: layer {name!r}: bias must be true or false, and true only for "
            f"{list(BIAS_KINDS)} layers, got {bias!r} for kind {record['kind']!r}"
        )
    return dict(record)


def _check_geometry(where: str, name: str, record: Mapping[str, Any]) -> None:
    """What this reader uses of a geometry: that it is an object, and its ``padding_idx``."""
    geometry = record["geometry"]
    if not isinstance(geometry, Mapping) or kind_rule(record["kind"]).geometry is None:
        raise AdapterError(
            f"{where}: layer {name!r}: geometry must be an object, on a Conv or Embedding layer"
        )
    if kind_rule(record["kind"]).geometry == "embedding":
        index = geometry.get("padding_idx")
        if index is not None and (type(index) is not int or not 0 <= index < record["shape"][0]):
            raise AdapterError(
                f"{where}: layer {name!r}: padding_idx must be null or an int in "
                f"[0, {record['shape'][0]}), got {index!r}"
            )


def _padding_row(record: Mapping[str, Any]) -> int | None:
    if kind_rule(record["kind"]).geometry != "embedding":
        return None
    return record.get("geometry", {}).get("padding_idx")


def _tucker_keys(name: str, prefix: str, record: Mapping[str, Any]) -> dict[str, tuple[int, ...]]:
    keys = {f"{name}.{prefix}core": tuple(record["ranks"])}
    for n, (size, rank) in enumerate(zip(record["shape"], record["ranks"], strict=True)):
        keys[f"{name}.{prefix}factors.{n}"] = (size, rank)
    return keys


def _layer_keys(name: str, record: Mapping[str, Any]) -> dict[str, tuple[int, ...]]:
    keys = _tucker_keys(name, "", record)
    if record["init"] == "hosvd":
        keys.update(_tucker_keys(name, "initial_", record))
    if record.get("bias", False):
        keys[f"{name}.bias"] = (record["shape"][0],)
    return keys


def _block_diagonal(first: np.ndarray, second: np.ndarray) -> np.ndarray:
    out = np.zeros(
        tuple(a + b for a, b in zip(first.shape, second.shape, strict=True)), first.dtype
    )
    out[tuple(slice(0, s) for s in first.shape)] = first
    out[tuple(slice(s, None) for s in first.shape)] = second
    return out


def _read_layer(name: str, record: Mapping[str, Any], weights: Checkpoint) -> AdapterLayer:
    ndim = len(record["shape"])
    core = weights.read(f"{name}.core")
    factors = [weights.read(f"{name}.factors.{n}") for n in range(ndim)]
    if record["init"] == "hosvd":
        # The base holds W0 − ΔW_init, so the change to W0 is ΔW − ΔW_init:
        # one Tucker tensor with both cores on the block diagonal.
        initial = [weights.read(f"{name}.initial_factors.{n}") for n in range(ndim)]
        core = _block_diagonal(core, -weights.read(f"{name}.initial_core"))
        factors = [np.concatenate(pair, axis=1) for pair in zip(factors, initial, strict=True)]
    padding_row = _padding_row(record)
    if padding_row is not None:
        factors[0] = factors[0].copy()
        factors[0][padding_row] = 0
    return AdapterLayer(
        name=name,
        kind=record["kind"],
        shape=tuple(record["shape"]),
        core=core,
        factors=tuple(factors),
        scale=float(record["scale"]),
        stored_ranks=tuple(record["ranks"]),
        stored_params=tucker_params(record["shape"], record["ranks"]),
        dropout=float(record.get("dropout", 0.0)),
        geometry=record.get("geometry"),
        bias=weights.read(f"{name}.bias") if record.get("bias", False) else None,
    )


def _modules_to_save(where: str, document: Mapping[str, Any]) -> list[str]:
    modules = document.get("modules_to_save") or []
    if isinstance(modules, str):
        modules = [modules]
    if not isinstance(modules, list) or not all(isinstance(m, str) for m in modules):
        raise AdapterError(f"{where}: modules_to_save must be a list of module names")
    return modules


def open_flora(directory: Path, document: dict[str, Any]) -> Adapter:
    """Open a flora adapter directory whose parsed config is ``document``."""
    where = str(directory / CONFIG_NAME)
    version = document.get("format_version")
    if version not in FORMAT_VERSIONS:
        raise AdapterError(
            f"{where}: unsupported flora format_version {version!r}; this reader knows "
            f"{list(FORMAT_VERSIONS)}"
        )
    layers = document.get("layers")
    if not isinstance(layers, dict) or not layers:
        raise AdapterError(f"{where}: lists no layers")
    records = {name: _check_record(where, name, record) for name, record in layers.items()}
    modules = _modules_to_save(where, document)
    weights = open_weights(directory)
    try:
        expected: dict[str, tuple[int, ...]] = {}
        for name, record in records.items():
            expected.update(_layer_keys(name, record))
        for key, shape in expected.items():
            check_shape(directory, weights, key, shape)
        unexpected = sorted(set(weights) - set(expected))
        if unexpected and not modules:
            raise AdapterError(
                f"{directory}: tensors {unexpected} belong to no layer of the config"
            )
    except BaseException:
        weights.close()
        raise
    skipped = [
        (module, "modules_to_save: a full trained copy of the module, not a low-rank update")
        for module in modules
    ]
    readers = {name: partial(_read_layer, name, record) for name, record in records.items()}
    return Adapter(directory, "flora", document, weights, readers, skipped)
