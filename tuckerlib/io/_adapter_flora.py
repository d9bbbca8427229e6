r"""Read a flora adapter directory (format versions 1 and 2) as Tucker updates.

The layout (documented in :mod:`flora.io`): ``adapter_config.json`` lists
each layer's ``kind``, ``shape``, ``ranks``, ``scale`` and ``init``; the
weight file holds ``NAME.core`` and ``NAME.factors.n`` (and, for
``init="hosvd"``, the adapter at initialization under ``NAME.initial_core``
and ``NAME.initial_factors.n``). Version 2 adds ``modules_to_save``: whole
modules saved under keys of their own, which are no low-rank update, an
optional per-layer ``geometry`` (Conv and Embedding layers): an embedding's
``padding_idx`` row gets no update, so it is zero in the update read here,
and an optional ``"bias": true`` (Linear and ConvNd layers) for a bias
update :math:`\Delta b` stored as ``NAME.bias`` of shape ``(shape[0],)``, read as
the layer's ``bias``.
"""

from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Any

from tuckerlib._ranks import tucker_params
from tuckerlib.io._adapter import CONFIG_NAME, Adapter, AdapterError, AdapterLayer, open_weights
from tuckerlib.io._base import Checkpoint
from tuckerlib.io.flora_format import (
    LayerRecord,
    bias_key,
    check_document,
    check_tensors,
    core_key,
    factor_key,
    update_factors,
)

__all__ = ["open_flora"]


def _tucker(record: LayerRecord, weights: Checkpoint, *, initial: bool = False) -> tuple:
    name, modes = record.name, range(len(record.shape))
    factors = [weights.read(factor_key(name, n, initial=initial)) for n in modes]
    return weights.read(core_key(name, initial=initial)), factors


def _read_layer(record: LayerRecord, weights: Checkpoint) -> AdapterLayer:
    initial = _tucker(record, weights, initial=True) if record.init == "hosvd" else None
    core, factors = update_factors(record, *_tucker(record, weights), initial)
    return AdapterLayer(
        name=record.name,
        kind=record.kind,
        shape=record.shape,
        core=core,
        factors=tuple(factors),
        scale=record.scale,
        stored_ranks=record.stored_ranks,
        stored_params=tucker_params(record.shape, record.stored_ranks),
        dropout=record.dropout,
        geometry=record.geometry,
        bias=weights.read(bias_key(record.name)) if record.bias else None,
    )


def open_flora(directory: Path, document: dict[str, Any]) -> Adapter:
    """Open a flora adapter directory whose parsed config is ``document``.

    The document and the weight file's index are checked by
    :mod:`tuckerlib.io.flora_format`, as :func:`flora.read_adapter` checks
    them; tensor values are read when a layer is looked up.
    """
    where = directory / CONFIG_NAME
    try:
        checked = check_document(document)
    except (TypeError, ValueError) as exc:
        raise AdapterError(f"{where}: {exc}") from None
    weights = open_weights(directory)
    try:
        expected = {name: record.tensor_shapes() for name, record in checked.layers.items()}
        found = {}
        for key in weights:
            info = weights.info(key)
            found[key] = (info.shape, info.dtype, info.is_floating)
        check_tensors(expected, checked.modules_to_save, found)
    except ValueError as exc:
        weights.close()
        raise AdapterError(f"{weights.files[0]}: {exc} (config {where})") from None
    except BaseException:
        weights.close()
        raise
    skipped = [
        (module, "modules_to_save: a full trained copy of the module, not a low-rank update")
        for module in checked.modules_to_save
    ]
    readers = {name: partial(_read_layer, record) for name, record in checked.layers.items()}
    return Adapter(directory, "flora", document, weights, readers, skipped)
