"""A PEFT LoRA adapter directory as flora layer records and tensors, exactly.

Each LoRA pair is read as a Tucker tensor (:func:`tuckerlib.io.open_adapter`):
Linear ``scaling · B I_r Aᵀᵀ`` (core the identity, ``U_0 = B``, ``U_1 = Aᵀ``),
Embedding ``scaling · Aᵀ I_r Bᵀ``, ConvNd ``scaling · A ×_0 B`` (``lora_A``'s
kernel as the core, identity factors on the other modes), then brought to
usable ranks by :func:`flora._lora_math.compact`, which changes nothing but
the shapes. The record's ``scale`` is PEFT's scaling.
"""

from __future__ import annotations

from dataclasses import dataclass
from os import PathLike
from pathlib import Path
from typing import Any

import torch

from flora._lora_math import compact
from flora.config import FLoRAConfig
from tuckerlib.io import AdapterLayer, open_adapter

__all__ = ["FloraLayers", "lora_to_flora"]


@dataclass(frozen=True)
class FloraLayers:
    """What :func:`flora.io.write_adapter` takes: a config, layer records and tensors."""

    config: FLoRAConfig
    layers: dict[str, dict[str, Any]]
    tensors: dict[str, torch.Tensor]


def _convert(layer: AdapterLayer) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    core = torch.from_numpy(layer.core).to(torch.float64)
    factors = [torch.from_numpy(f).to(torch.float64) for f in layer.dense_factors()]
    core, factors = compact(core, factors)
    record = {
        "kind": layer.kind,
        "shape": list(layer.shape),
        "ranks": list(core.shape),
        "scale": layer.scale,
        "init": "zero_core",
        "forward": "auto",
        "dropout": layer.dropout,
    }
    tensors = {f"{layer.name}.core": core.float().contiguous()}
    for n, factor in enumerate(factors):
        tensors[f"{layer.name}.factors.{n}"] = factor.float().contiguous()
    return record, tensors


def lora_to_flora(directory: str | PathLike[str]) -> FloraLayers:
    """Convert a PEFT LoRA adapter directory into flora's records and tensors.

    The result has, layer by layer, the update PEFT applies (to rounding);
    ``flora.io.write_adapter(path, result.config, result.layers,
    result.tensors)`` writes it as a flora adapter.

    Raises
    ------
    ValueError
        If the directory is no PEFT LoRA adapter, uses an option with no
        exact FLoRA form (``use_dora``, ``lora_bias``, ...; named in the
        message), or holds layers or tensors with none (each named with the
        reason: ``modules_to_save`` copies, grouped convs mixing groups, 3-D
        ``target_parameters``).

    Notes
    -----
    Exact for the update PEFT computes from the tensors alone. Two base
    layer properties the directory does not record also decide the outputs
    and must be checked against the model: PEFT runs ``lora_A`` with
    dilation 1 and zero padding (FLoRA uses the base conv's), and PEFT
    updates an embedding's ``padding_idx`` row (FLoRA does not).
    """
    path = Path(directory)
    with open_adapter(path) as adapter:
        if adapter.format != "lora":
            raise ValueError(f"{path} holds a flora adapter, not a PEFT LoRA one")
        if adapter.skipped:
            listed = "; ".join(f"{name!r}: {reason}" for name, reason in adapter.skipped)
            raise ValueError(f"{path}: no exact FLoRA form for {listed}")
        layers, tensors = {}, {}
        for name in adapter:
            layers[name], converted = _convert(adapter[name])
            tensors.update(converted)
    modules = [name for name, record in layers.items() if record["kind"] != "Parameter"]
    parameters = [name for name, record in layers.items() if record["kind"] == "Parameter"]
    dropouts = {record["dropout"] for record in layers.values()}
    config = FLoRAConfig(
        target_modules=modules or None,
        target_parameters=parameters or None,
        dropout=max(dropouts, default=0.0),
    )
    return FloraLayers(config, layers, tensors)
