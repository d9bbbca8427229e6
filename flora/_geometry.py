"""What a layer's update depends on beyond the weight's shape, as a JSON record.

A convolution applies ``ΔW`` with its ``groups``, ``stride``, ``padding``,
``dilation`` and ``padding_mode``; an embedding leaves its ``padding_idx``
row without update and renormalizes looked-up rows to ``max_norm``. A saved
layer record keeps these under ``"geometry"`` (see :mod:`flora.io`), so a
directory alone fixes the update a layer applies: loading checks them
against the model, and a PEFT LoRA export reads its layout from them.
Linear layers and parameters have no geometry.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping, Sequence
from typing import Any

from torch import nn

from flora.kinds import kind_of_module
from tuckerlib.io._kinds import geometry_of

__all__ = [
    "CONV_KEYS",
    "EMBEDDING_KEYS",
    "check_geometry",
    "geometry_mismatch",
    "lora_difference",
    "module_geometry",
]

CONV_KEYS = ("groups", "stride", "padding", "dilation", "padding_mode")
EMBEDDING_KEYS = ("padding_idx", "max_norm")
_PADDING_MODES = ("zeros", "reflect", "replicate", "circular")


def module_geometry(module: nn.Module) -> dict[str, Any] | None:
    """The geometry record of a convolution or embedding module; None for other modules.

    Examples
    --------
    >>> import torch
    >>> from flora._geometry import module_geometry
    >>> module_geometry(torch.nn.Embedding(10, 4, padding_idx=0))
    {'padding_idx': 0, 'max_norm': None}
    """
    kind = kind_of_module(module)
    geometry = None if kind is None else kind.rule.geometry
    if geometry == "embedding":
        max_norm = None if module.max_norm is None else float(module.max_norm)
        return {"padding_idx": module.padding_idx, "max_norm": max_norm}
    if geometry == "conv":
        padding = module.padding if isinstance(module.padding, str) else list(module.padding)
        return {
            "groups": module.groups,
            "stride": list(module.stride),
            "padding": padding,
            "dilation": list(module.dilation),
            "padding_mode": module.padding_mode,
        }
    return None


def _ints(value: object, count: int, low: int) -> bool:
    return (
        isinstance(value, list)
        and len(value) == count
        and all(type(v) is int and v >= low for v in value)
    )


def _conv_problem(shape: Sequence[int], record: Mapping[str, Any]) -> str | None:
    spatial = len(shape) - 2
    groups = record["groups"]
    if type(groups) is not int or groups < 1 or shape[0] % groups:
        return f"groups must be a positive int dividing the {shape[0]} output channels"
    if not (_ints(record["stride"], spatial, 1) and _ints(record["dilation"], spatial, 1)):
        return f"stride and dilation must be lists of {spatial} positive ints"
    padding = record["padding"]
    if padding not in ("same", "valid") and not _ints(padding, spatial, 0):
        return f"padding must be 'same', 'valid' or a list of {spatial} ints >= 0"
    if record["padding_mode"] not in _PADDING_MODES:
        return f"padding_mode must be one of {list(_PADDING_MODES)}"
    return None


def _embedding_problem(shape: Sequence[int], record: Mapping[str, Any]) -> str | None:
    index, max_norm = record["padding_idx"], record["max_norm"]
    if index is not None and (type(index) is not int or not 0 <= index < shape[0]):
        return f"padding_idx must be null or an int in [0, {shape[0]})"
    if max_norm is not None and (
        isinstance(max_norm, bool)
        or not isinstance(max_norm, numbers.Real)
        or not math.isfinite(max_norm)
        or max_norm <= 0
    ):
        return "max_norm must be null or a positive number"
    return None


def check_geometry(kind: str, shape: Sequence[int], record: object) -> dict[str, Any]:
    """``record`` if it is a valid geometry for a layer of ``kind`` and ``shape``.

    Raises
    ------
    ValueError
        If the kind has no geometry, or the record lacks a key, has an
        unknown one or holds an invalid value (named in the message).
    """
    if geometry_of(kind) == "conv":
        keys, check = CONV_KEYS, _conv_problem
    elif geometry_of(kind) == "embedding":
        keys, check = EMBEDDING_KEYS, _embedding_problem
    else:
        raise ValueError(f"a {kind} layer has no geometry; only Conv and Embedding layers do")
    if not isinstance(record, Mapping) or set(record) != set(keys):
        found = sorted(record) if isinstance(record, Mapping) else type(record).__name__
        raise ValueError(f"the geometry of a {kind} must have keys {list(keys)}, got {found}")
    problem = check(shape, record)
    if problem is not None:
        raise ValueError(f"geometry: {problem}, got {dict(record)}")
    return dict(record)


def geometry_mismatch(recorded: Mapping[str, Any], module: nn.Module) -> str | None:
    """Why ``module`` is not the layer ``recorded`` describes, or None if it is."""
    found = module_geometry(module) or {}
    differ = [key for key in recorded if recorded[key] != found.get(key)]
    if not differ:
        return None
    saved = ", ".join(f"{key}={recorded[key]!r}" for key in differ)
    model = ", ".join(f"{key}={found.get(key)!r}" for key in differ)
    return f"the adapter was saved for a layer with {saved}; the model's has {model}"


def lora_difference(kind: str, shape: Sequence[int], geometry: Mapping[str, Any]) -> str | None:
    """Why PEFT's LoRA layer applies an update differently than FLoRA's layer does, if it does.

    PEFT runs a convolution's ``lora_A`` with the base's stride and padding
    but dilation 1 and zero padding, and renormalizes an embedding's
    ``lora_embedding_A`` to ``max_norm``; FLoRA applies ``ΔW`` with the base
    layer's own geometry. (An embedding's ``padding_idx`` row is handled by
    the tensors, not here.)
    """
    if kind == "Embedding":
        if geometry["max_norm"] is not None:
            return (
                f"max_norm {geometry['max_norm']}: PEFT renormalizes lora_embedding_A's rows "
                "in the lookup, FLoRA's update is not renormalized"
            )
        return None
    kernel = shape[2:]
    dilation = geometry["dilation"]
    if any(d != 1 for d in dilation) and any(k > 1 for k in kernel):
        return (
            f"dilation {tuple(dilation)}: PEFT runs lora_A with dilation 1, so no LoRA pair "
            "reproduces a dilated update"
        )
    padding = geometry["padding"]
    padded = padding == "same" or (padding != "valid" and any(p > 0 for p in padding))
    if geometry["padding_mode"] != "zeros" and padded:
        return (
            f"padding_mode {geometry['padding_mode']!r}: PEFT pads lora_A's input with zeros, "
            "which differs at the borders"
        )
    return None
