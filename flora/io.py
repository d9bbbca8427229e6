"""Adapter-only files: ``adapter_model.safetensors`` + ``adapter_config.json``.

An adapter directory holds two files (format version 1):

``adapter_config.json``
    A JSON object::

        {"format": "flora", "format_version": 1, "adapter_name": "default",
         "config": {...FLoRAConfig fields (FLoRAConfig.to_dict())...},
         "layers": {NAME: {"kind": KIND, "shape": [I_0, ...], "ranks": [R_0, ...],
                           "scale": s, "init": INIT, "forward": MODE, "dropout": p}}}

    ``NAME`` is the adapted module's name in the model (``"blocks.0.fc1"``)
    or, for kind ``"Parameter"``, the parameter's full name
    (``"blocks.0.experts.weight"``). ``KIND`` is one of ``"Linear"``,
    ``"Conv1d"``, ``"Conv2d"``, ``"Conv3d"``, ``"Embedding"`` (the module
    must be exactly that torch type) or ``"Parameter"`` (any parameter,
    adapted with :class:`flora.TuckerParametrization`). ``shape`` is the
    weight's shape and ``ranks`` the ranks clipped to it. ``forward`` and
    ``dropout`` may be left out (``"auto"``, ``0.0``). The per-layer entries
    are authoritative; ``config`` records how the adapter was made.

``adapter_model.safetensors``
    For each layer ``NAME``: ``NAME.core`` of shape ``ranks`` and
    ``NAME.factors.n`` of shape ``(shape[n], ranks[n])``; with
    ``init == "hosvd"`` also ``NAME.initial_core`` and
    ``NAME.initial_factors.n`` (the adapter at initialization, which the
    base gave up: loading subtracts it from the fresh base weight). Nothing
    else. Files are read with ``safetensors`` only, never unpickled.

:func:`write_adapter` writes such a directory from plain tensors, e.g. for
adapters computed outside a model.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from os import PathLike
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from torch.nn.utils import parametrize

from flora.config import FORWARD_MODES, INIT_MODES, KINDS, FLoRAConfig
from flora.layers import FLoRALayer, TuckerDelta, TuckerParametrization
from flora.model import LAYER_TYPES, _freeze_base, adapted_layers

__all__ = [
    "CONFIG_NAME",
    "FORMAT_VERSION",
    "WEIGHTS_NAME",
    "adapter_state_dict",
    "load_adapter",
    "save_adapter",
    "write_adapter",
]

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
FORMAT_VERSION = 1

_MODULE_TYPES = {layer.kind: torch_type for torch_type, layer in LAYER_TYPES.items()}


def _layer_keys(name: str, record: Mapping[str, Any]) -> dict[str, tuple[int, ...]]:
    """Every tensor key a layer record needs, with its shape."""
    shape, ranks = record["shape"], record["ranks"]
    prefixes = ["", "initial_"] if record["init"] == "hosvd" else [""]
    keys = {}
    for prefix in prefixes:
        keys[f"{name}.{prefix}core"] = tuple(ranks)
        for n, (size, rank) in enumerate(zip(shape, ranks, strict=True)):
            keys[f"{name}.{prefix}factors.{n}"] = (size, rank)
    return keys


def _full(tensor: torch.Tensor) -> torch.Tensor:
    # FSDP2 shards parameters as DTensors; a state dict must hold whole tensors.
    if hasattr(tensor, "full_tensor"):
        tensor = tensor.full_tensor()
    return tensor.detach()


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapters' tensors only, under the keys of the adapter file format.

    Parameters
    ----------
    model : torch.nn.Module
        A model with adapters. Parameters sharded by FSDP2 are gathered
        (a collective call: run it on every rank).

    Returns
    -------
    dict of str to torch.Tensor
        Detached tensors, see the module docstring for the keys.

    Examples
    --------
    >>> import torch
    >>> import flora
    >>> model = flora.inject(torch.nn.Sequential(torch.nn.Linear(4, 3)), flora.FLoRAConfig(ranks=2))
    >>> {k: tuple(v.shape) for k, v in flora.adapter_state_dict(model).items()}
    {'0.core': (2, 2), '0.factors.0': (3, 2), '0.factors.1': (4, 2)}
    """
    state = {}
    for name, layer in adapted_layers(model).items():
        state[f"{name}.core"] = _full(layer.core)
        for n, factor in enumerate(layer.factors):
            state[f"{name}.factors.{n}"] = _full(factor)
        if layer.init == "hosvd":
            state[f"{name}.initial_core"] = _full(layer.initial_core)
            for n in range(len(layer.shape)):
                state[f"{name}.initial_factors.{n}"] = _full(getattr(layer, f"initial_factor_{n}"))
    return state


def _record(layer: TuckerDelta) -> dict[str, Any]:
    record = {
        "kind": layer.kind,
        "shape": list(layer.shape),
        "ranks": list(layer.ranks),
        "scale": layer.scale,
        "init": layer.init,
    }
    if isinstance(layer, FLoRALayer):
        dropout = layer.dropout.p if isinstance(layer.dropout, nn.Dropout) else 0.0
        record.update(forward=layer.forward_mode, dropout=dropout)
    return record


def _check_record(name: str, record: object) -> dict[str, Any]:
    """Validate one layer entry of ``adapter_config.json``; fill defaults."""
    if not isinstance(record, Mapping):
        raise ValueError(f"layer {name!r}: entry must be a JSON object")
    required = {"kind", "shape", "ranks", "scale", "init"}
    allowed = required | {"forward", "dropout"}
    if not required <= set(record) <= allowed:
        raise ValueError(
            f"layer {name!r}: entry must have keys {sorted(required)} (optional forward, "
            f"dropout), got {sorted(record)}"
        )
    record = {"forward": "auto", "dropout": 0.0, **record}
    shape, ranks = record["shape"], record["ranks"]
    if record["kind"] not in KINDS:
        raise ValueError(f"layer {name!r}: kind must be one of {KINDS}, got {record['kind']!r}")
    ints = (shape, ranks)
    if not all(isinstance(v, list) and all(type(i) is int and i > 0 for i in v) for v in ints):
        raise ValueError(f"layer {name!r}: shape and ranks must be lists of positive ints")
    if (
        len(shape) != len(ranks)
        or not shape
        or any(r > s for r, s in zip(ranks, shape, strict=False))
    ):
        raise ValueError(f"layer {name!r}: ranks {ranks} do not fit shape {shape}")
    scale = record["scale"]
    if type(scale) not in (int, float) or not math.isfinite(scale) or scale == 0:
        raise ValueError(f"layer {name!r}: scale must be finite and non-zero, got {scale!r}")
    if record["init"] not in INIT_MODES or record["forward"] not in FORWARD_MODES:
        raise ValueError(
            f"layer {name!r}: unknown init or forward ({record['init']!r}, {record['forward']!r})"
        )
    if type(record["dropout"]) not in (int, float) or not 0 <= record["dropout"] < 1:
        raise ValueError(f"layer {name!r}: dropout must lie in [0, 1)")
    return record


def _check_tensors(
    layers: Mapping[str, Mapping[str, Any]], tensors: Mapping[str, torch.Tensor]
) -> None:
    expected: dict[str, tuple[int, ...]] = {}
    for name, record in layers.items():
        expected.update(_layer_keys(name, record))
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise ValueError(
            f"adapter tensors do not match the config: missing {missing}, unexpected {unexpected}"
        )
    for key, shape in expected.items():
        tensor = tensors[key]
        if tuple(tensor.shape) != shape or not tensor.is_floating_point():
            raise ValueError(
                f"tensor {key!r} must be a floating tensor of shape {shape}, got "
                f"{tensor.dtype} {tuple(tensor.shape)}"
            )


def write_adapter(
    directory: str | PathLike[str],
    config: FLoRAConfig,
    layers: Mapping[str, Mapping[str, Any]],
    tensors: Mapping[str, torch.Tensor],
    *,
    adapter_name: str = "default",
) -> Path:
    """Write an adapter directory from a config, layer records and tensors.

    Parameters
    ----------
    directory : str or path-like
        Created if missing; the two files are overwritten.
    config : FLoRAConfig
        Recorded as ``"config"``.
    layers : dict
        Layer name to record (``kind``, ``shape``, ``ranks``, ``scale``,
        ``init``, optional ``forward`` and ``dropout``), see the module
        docstring.
    tensors : dict of str to torch.Tensor
        Exactly the keys the records need, with their shapes.
    adapter_name : str, optional
        Recorded as ``"adapter_name"``.

    Returns
    -------
    pathlib.Path
        The directory.

    Raises
    ------
    ValueError
        If a record is invalid or the tensors' keys or shapes do not match
        the records (nothing is written then).
    TypeError
        If ``config`` is not a :class:`flora.FLoRAConfig`.

    Examples
    --------
    >>> import tempfile
    >>> import torch
    >>> from flora import FLoRAConfig
    >>> from flora.io import write_adapter
    >>> record = {"kind": "Linear", "shape": [3, 4], "ranks": [1, 1], "scale": 1.0,
    ...           "init": "zero_core"}
    >>> tensors = {"fc.core": torch.ones(1, 1), "fc.factors.0": torch.ones(3, 1),
    ...            "fc.factors.1": torch.ones(4, 1)}
    >>> with tempfile.TemporaryDirectory() as tmp:
    ...     path = write_adapter(tmp, FLoRAConfig(), {"fc": record}, tensors)
    ...     sorted(p.name for p in path.iterdir())
    ['adapter_config.json', 'adapter_model.safetensors']
    """
    if not isinstance(config, FLoRAConfig):
        raise TypeError(f"config must be a FLoRAConfig, got {type(config).__name__}")
    checked = {name: _check_record(name, record) for name, record in layers.items()}
    _check_tensors(checked, tensors)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    document = {
        "format": "flora",
        "format_version": FORMAT_VERSION,
        "adapter_name": adapter_name,
        "config": config.to_dict(),
        "layers": checked,
    }
    (directory / CONFIG_NAME).write_text(json.dumps(document, indent=2) + "\n")
    # safetensors refuses tensors that share storage; a clone owns its memory.
    files = {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}
    save_file(files, str(directory / WEIGHTS_NAME), metadata={"format": "pt"})
    return directory


def save_adapter(
    model: nn.Module,
    directory: str | PathLike[str],
    *,
    state_dict: Mapping[str, torch.Tensor] | None = None,
) -> Path:
    """Save the adapters of ``model`` (not the base weights) to ``directory``.

    Parameters
    ----------
    model : torch.nn.Module
        A model with adapters.
    directory : str or path-like
        Created if missing; receives ``adapter_model.safetensors`` and
        ``adapter_config.json`` (format in :mod:`flora.io`).
    state_dict : dict of str to torch.Tensor, optional
        The adapter tensors to write, as returned by
        :func:`adapter_state_dict` (default: computed here). Under FSDP2
        gathering the shards is a collective call that every rank must make,
        so gather on every rank and save from one::

            sd = flora.adapter_state_dict(model)  # every rank
            if torch.distributed.get_rank() == 0:
                flora.save_adapter(model, directory, state_dict=sd)

        Its keys and shapes must match the model's adapted layers.

    Returns
    -------
    pathlib.Path
        The directory.

    Raises
    ------
    ValueError
        If the model has no adapters, or ``state_dict`` does not match its
        adapted layers (missing or unexpected keys, wrong shapes, tensors
        still sharded); nothing is written then.
    TypeError
        If ``state_dict`` is not a mapping.

    See Also
    --------
    load_adapter : The inverse.
    adapter_state_dict : The tensors saved.

    Examples
    --------
    >>> import tempfile
    >>> import torch
    >>> import flora
    >>> torch.manual_seed(0) and None
    >>> model = torch.nn.Sequential(torch.nn.Linear(4, 3))
    >>> fresh = torch.nn.Sequential(torch.nn.Linear(4, 3))
    >>> fresh.load_state_dict(model.state_dict())
    <All keys matched successfully>
    >>> model = flora.inject(model, flora.FLoRAConfig(ranks=2))
    >>> with tempfile.TemporaryDirectory() as tmp:
    ...     _ = flora.save_adapter(model, tmp)
    ...     fresh = flora.load_adapter(fresh, tmp)
    >>> x = torch.randn(2, 4)
    >>> torch.equal(fresh(x), model(x))
    True
    """
    layers = adapted_layers(model)
    if not layers:
        raise ValueError("the model has no FLoRA adapters; call flora.inject first")
    if state_dict is None:
        state_dict = adapter_state_dict(model)
    elif not isinstance(state_dict, Mapping):
        raise TypeError(
            f"state_dict must be a dict of tensors from flora.adapter_state_dict, "
            f"got {type(state_dict).__name__}"
        )
    else:
        sharded = sorted(key for key, value in state_dict.items() if hasattr(value, "full_tensor"))
        if sharded:
            raise ValueError(
                f"state_dict holds sharded DTensors {sharded}; pass the gathered tensors "
                "that flora.adapter_state_dict(model) returns"
            )
    first = next(iter(layers.values()))
    config = getattr(first, "config", None) or FLoRAConfig(scale=first.scale, init=first.init)
    return write_adapter(
        directory,
        config,
        {name: _record(layer) for name, layer in layers.items()},
        state_dict,
        adapter_name=getattr(first, "adapter_name", "default"),
    )


@dataclass(frozen=True)
class _Planned:
    name: str
    record: dict[str, Any]
    module: nn.Module
    parameter: str | None


def _read(directory: Path) -> tuple[dict[str, Any], FLoRAConfig, dict[str, torch.Tensor]]:
    document = json.loads((directory / CONFIG_NAME).read_text())
    if not isinstance(document, dict) or document.get("format") != "flora":
        raise ValueError(f"{directory / CONFIG_NAME} is not a flora adapter config")
    if document.get("format_version") != FORMAT_VERSION:
        raise ValueError(
            f"unsupported adapter format_version {document.get('format_version')!r}; "
            f"this flora reads version {FORMAT_VERSION}"
        )
    if not isinstance(document.get("layers"), dict) or not document["layers"]:
        raise ValueError(f"{directory / CONFIG_NAME} lists no layers")
    config = FLoRAConfig.from_dict(document.get("config", {}))
    tensors = load_file(str(directory / WEIGHTS_NAME))
    return document, config, tensors


def _plan(model: nn.Module, layers: Mapping[str, dict[str, Any]]) -> list[_Planned]:
    """Check every layer against the model; raise before anything changes."""
    plan = []
    for name, record in layers.items():
        module_name, parameter = name, None
        if record["kind"] == "Parameter":
            module_name, _, parameter = name.rpartition(".")
        try:
            module = model.get_submodule(module_name)
        except AttributeError:
            raise ValueError(f"layer {name!r}: the model has no module {module_name!r}") from None
        if isinstance(module, FLoRALayer) or (
            parameter is not None and parametrize.is_parametrized(module, parameter)
        ):
            raise ValueError(f"layer {name!r} is already adapted or parametrized")
        if parameter is None:
            expected_type = _MODULE_TYPES[record["kind"]]
            if type(module) is not expected_type:
                raise ValueError(
                    f"layer {name!r}: the config says {record['kind']} but the model has a "
                    f"{type(module).__name__}"
                )
            weight = module.weight
        else:
            weight = getattr(module, parameter, None)
            if not isinstance(weight, nn.Parameter):
                raise ValueError(f"layer {name!r}: the model has no parameter {name!r}")
        if list(weight.shape) != record["shape"]:
            raise ValueError(
                f"layer {name!r}: the adapter is for shape {record['shape']}, the model's "
                f"weight has shape {list(weight.shape)}"
            )
        plan.append(_Planned(name, record, module, parameter))
    wrapped = {id(p.module) for p in plan if p.parameter is None}
    clashes = [p.name for p in plan if p.parameter is not None and id(p.module) in wrapped]
    if clashes:
        raise ValueError(f"parameters {clashes} belong to modules adapted as layers too")
    return plan


def _attach_loaded(model: nn.Module, item: _Planned) -> TuckerDelta:
    record = item.record
    options = {"scale": record["scale"], "init": "zero_core"}
    if item.parameter is not None:
        return TuckerParametrization(item.module, item.parameter, record["ranks"], **options)
    layer = LAYER_TYPES[type(item.module)](
        item.module,
        record["ranks"],
        forward=record["forward"],
        dropout=record["dropout"],
        **options,
    )
    parent, _, child = item.name.rpartition(".")
    setattr(model.get_submodule(parent), child, layer)
    return layer


def _fill(layer: TuckerDelta, name: str, tensors: Mapping[str, torch.Tensor], init: str) -> None:
    def get(key: str) -> torch.Tensor:
        return tensors[f"{name}.{key}"].to(layer.core.device, layer.core.dtype)

    with torch.no_grad():
        layer.core.copy_(get("core"))
        for n, factor in enumerate(layer.factors):
            factor.copy_(get(f"factors.{n}"))
    if init == "hosvd":
        layer.init = "hosvd"
        layer._store_initial(
            get("initial_core"), [get(f"initial_factors.{n}") for n in range(len(layer.shape))]
        )
        layer._take_initial_from_base()


def load_adapter(model: nn.Module, directory: str | PathLike[str]) -> nn.Module:
    """Inject the adapters saved in ``directory`` into ``model`` and load their tensors.

    Every layer name, kind and shape and every tensor key and shape is
    checked before the model is touched: a failed load raises and leaves the
    model exactly as it was.

    Parameters
    ----------
    model : torch.nn.Module
        The base model the adapter was trained on (without adapters).
    directory : str or path-like
        A directory written by :func:`save_adapter` or :func:`write_adapter`.

    Returns
    -------
    torch.nn.Module
        ``model``, with adapters, base frozen.

    Raises
    ------
    FileNotFoundError
        If a file is missing.
    ValueError
        If the config is invalid, names a module or parameter the model
        lacks or has with another kind or shape, or the tensors do not
        match the config.

    See Also
    --------
    save_adapter : Writes the directory.
    """
    directory = Path(directory)
    document, config, tensors = _read(directory)
    layers = {name: _check_record(name, record) for name, record in document["layers"].items()}
    _check_tensors(layers, tensors)
    plan = _plan(model, layers)
    for item in plan:
        layer = _attach_loaded(model, item)
        _fill(layer, item.name, tensors, item.record["init"])
        layer.adapter_name = document.get("adapter_name", "default")
        layer.config = config
    _freeze_base(model)
    return model
