r"""What a layer's update depends on beyond the weight's shape, as a JSON record.

A convolution applies :math:`\Delta W` with its ``groups``, ``stride``, ``padding``,
``dilation`` and ``padding_mode``; an embedding leaves its ``padding_idx``
row without update and renormalizes looked-up rows to ``max_norm``. A saved
layer record keeps these under ``"geometry"`` (see :mod:`flora.io`), so a
directory alone fixes the update a layer applies: loading checks them
against the model, and a PEFT LoRA export reads its layout from them.
Linear layers and parameters have no geometry.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from torch import nn

from flora.kinds import kind_of_module
from tuckerlib.io.flora_format import CONV_KEYS, EMBEDDING_KEYS, check_geometry

__all__ = [
    "CONV_KEYS",
    "EMBEDDING_KEYS",
    "check_geometry",
    "geometry_mismatch",
    "lora_difference",
    "module_geometry",
]


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
    r"""Why PEFT's LoRA layer applies an update differently than FLoRA's layer does, if it does.

    PEFT runs a convolution's ``lora_A`` with the base's stride and padding
    but dilation 1 and zero padding, and renormalizes an embedding's
    ``lora_embedding_A`` to ``max_norm``; FLoRA applies :math:`\Delta W` with the base
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
