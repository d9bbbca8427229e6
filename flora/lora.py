"""FLoRA in the LoRA ecosystem: export a flora adapter as an exact PEFT LoRA adapter.

Every FLoRA update is a LoRA update of rank ``R_0`` (the rank of mode 0,
after clipping to what a Tucker tensor can use), for Linear, Conv1d/2d/3d
(grouped included) and Embedding layers and for 2-D parameters; see
:doc:`/lora_adapters` for the formulas. :func:`export_lora` writes that
LoRA as a directory that ``peft.PeftModel.from_pretrained`` loads.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from os import PathLike, fspath
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from flora._atomic import replace_directory
from flora._lora_math import LoraTensors, lora_split, to_lora
from tuckerlib.io import AdapterLayer, open_adapter

__all__ = ["export_lora"]

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
_PEFT_PREFIX = "base_model.model."
_MODULE_TYPES = {
    "Linear": nn.Linear,
    "Conv1d": nn.Conv1d,
    "Conv2d": nn.Conv2d,
    "Conv3d": nn.Conv3d,
    "Embedding": nn.Embedding,
}
#: What a re-export may overwrite in an existing output directory.
_REPLACEABLE = frozenset({CONFIG_NAME, WEIGHTS_NAME, "adapter_model.bin", "README.md"})


@dataclass(frozen=True)
class _Geometry:
    """What PEFT's layer needs beyond the weight's shape."""

    groups: int = 1
    padding_idx: int | None = None


def _conv_refusal(module: nn.Module) -> str | None:
    kernel = module.kernel_size
    if any(d != 1 for d in module.dilation) and any(k > 1 for k in kernel):
        return (
            f"dilation {tuple(module.dilation)}: PEFT runs lora_A with dilation 1, so no LoRA "
            "pair reproduces a dilated update"
        )
    padded = module.padding == "same" or (
        module.padding != "valid" and any(p > 0 for p in module.padding)
    )
    if module.padding_mode != "zeros" and padded:
        return (
            f"padding_mode {module.padding_mode!r}: PEFT pads lora_A's input with zeros, which "
            "differs at the borders"
        )
    return None


def _module_geometry(layer: AdapterLayer, base_model: nn.Module) -> _Geometry | str:
    kind = layer.kind
    module_name = layer.name.rpartition(".")[0] if kind == "Parameter" else layer.name
    try:
        module = base_model.get_submodule(module_name)
    except AttributeError:
        return f"base_model has no module {module_name!r}"
    if kind == "Parameter":
        weight = getattr(module, layer.name.rpartition(".")[2], None)
    else:
        if not isinstance(module, _MODULE_TYPES[kind]):
            return f"base_model's {module_name!r} is a {type(module).__name__}, not a {kind}"
        weight = module.weight
    if not isinstance(weight, torch.Tensor) or tuple(weight.shape) != layer.shape:
        found = tuple(weight.shape) if isinstance(weight, torch.Tensor) else None
        return f"the adapter is for shape {list(layer.shape)}, base_model's weight has {found}"
    if kind == "Embedding":
        if module.max_norm is not None:
            return "max_norm: PEFT renormalizes lora_embedding_A in the lookup"
        return _Geometry(padding_idx=module.padding_idx)
    if kind.startswith("Conv"):
        return _conv_refusal(module) or _Geometry(groups=module.groups)
    return _Geometry()


def _geometry(layer: AdapterLayer, base_model: nn.Module | None) -> _Geometry | str:
    """How PEFT must lay the layer out, or why no LoRA pair reproduces it."""
    if layer.kind == "Parameter" and len(layer.shape) != 2:
        return (
            f"a {len(layer.shape)}-D parameter: PEFT's target_parameters hold 2-D weights and "
            "3-D expert stacks whose axis order and per-expert ranks no FLoRA tensor fixes"
        )
    if base_model is not None:
        return _module_geometry(layer, base_model)
    if layer.kind.startswith("Conv") or layer.kind == "Embedding":
        detail = "padding_idx" if layer.kind == "Embedding" else "groups, dilation and padding_mode"
        return (
            f"the adapter directory does not record the base layer's {detail}, on which "
            "PEFT's form depends; pass base_model to flora.export_lora (its weights are not read)"
        )
    return _Geometry()


def _lora_tensors(layer: AdapterLayer, geometry: _Geometry) -> LoraTensors:
    # float64 arithmetic, float32 storage: the exported pair is ΔW to float32 rounding.
    core = torch.from_numpy(layer.core).to(torch.float64)
    factors = [torch.from_numpy(f).to(torch.float64) for f in layer.dense_factors()]
    left, right = lora_split(core, factors, layer.scale)
    tensors = to_lora(
        layer.kind, left, right, groups=geometry.groups, padding_idx=geometry.padding_idx
    )
    return LoraTensors(tensors.lora_a.float(), tensors.lora_b.float(), tensors.rank)


def _peft_keys(layer: AdapterLayer, tensors: LoraTensors) -> dict[str, torch.Tensor]:
    module = layer.name.rpartition(".")[0] if layer.kind == "Parameter" else layer.name
    prefix = f"{_PEFT_PREFIX}{module}"
    if layer.kind == "Embedding":
        return {
            f"{prefix}.lora_embedding_A": tensors.lora_a,
            f"{prefix}.lora_embedding_B": tensors.lora_b,
        }
    return {f"{prefix}.lora_A.weight": tensors.lora_a, f"{prefix}.lora_B.weight": tensors.lora_b}


def _exact_pattern(name: str) -> str:
    # PEFT matches a pattern key against any dotted suffix of a name, as
    # re.match(rf"(.*\.)?({key})$", name); anchoring the key at the start
    # makes it match this one name only.
    return "^" + name.replace(".", r"\.")


def _dropout(layers: list[AdapterLayer]) -> float:
    values = {layer.dropout for layer in layers if layer.kind not in ("Embedding", "Parameter")}
    if len(values) > 1:
        raise ValueError(
            f"the layers use different dropouts {sorted(values)}; PEFT's lora_dropout is one value"
        )
    dropout = values.pop() if values else 0.0
    if dropout and any(layer.kind == "Parameter" for layer in layers):
        raise ValueError(
            f"PEFT's target_parameters do not work with lora_dropout={dropout}; the adapter has "
            "parameters and dropout on its layers"
        )
    return dropout


def _peft_config(layers: list[AdapterLayer], ranks: Mapping[str, int]) -> dict[str, Any]:
    counts = Counter(ranks.values())
    rank = max(counts, key=lambda r: (counts[r], -r))
    # lora_alpha = r everywhere makes PEFT's scaling 1: the tensors carry s.
    different = {_exact_pattern(name): r for name, r in ranks.items() if r != rank}
    modules = [layer.name for layer in layers if layer.kind != "Parameter"]
    parameters = [layer.name for layer in layers if layer.kind == "Parameter"]
    return {
        "peft_type": "LORA",
        "task_type": None,
        "base_model_name_or_path": None,
        "revision": None,
        "inference_mode": True,
        "r": rank,
        "lora_alpha": rank,
        "rank_pattern": different,
        "alpha_pattern": dict(different),
        "use_rslora": False,
        "lora_dropout": _dropout(layers),
        "target_modules": modules,
        "target_parameters": parameters or None,
        "exclude_modules": None,
        "layers_to_transform": None,
        "layers_pattern": None,
        "fan_in_fan_out": False,
        "bias": "none",
        "lora_bias": False,
        "use_dora": False,
        "init_lora_weights": True,
        "modules_to_save": None,
    }


def _parameter_clashes(layers: list[AdapterLayer]) -> list[tuple[str, str]]:
    modules = Counter(
        layer.name.rpartition(".")[0] for layer in layers if layer.kind == "Parameter"
    )
    return [
        (
            layer.name,
            "several parameters of one module: PEFT nests its wrappers in an order of its own",
        )
        for layer in layers
        if layer.kind == "Parameter" and modules[layer.name.rpartition(".")[0]] > 1
    ]


def _grouped(refused: list[tuple[str, str]]) -> str:
    """``layers 'a', 'b' (reason); layer 'c' (reason)``."""
    by_reason: dict[str, list[str]] = {}
    for name, reason in refused:
        by_reason.setdefault(reason, []).append(repr(name))
    return "; ".join(
        f"{'layers' if len(names) > 1 else 'layer'} {', '.join(names)} ({reason})"
        for reason, names in by_reason.items()
    )


def _source_directory(source: object) -> Path:
    if isinstance(source, (str, PathLike)):
        return Path(fspath(source))
    raise TypeError(
        f"source must be a flora adapter directory (str or path), got {type(source).__name__}; "
        "for an adapted model, write it with flora.save_adapter first"
    )


def _read_layers(path: Path, adapter_name: str | None) -> list[AdapterLayer]:
    with open_adapter(path) as adapter:
        if adapter.format != "flora":
            raise ValueError(f"{path} holds a PEFT LoRA adapter, not a flora one")
        stored = adapter.config.get("adapter_name", "default")
        if adapter_name is not None and adapter_name != stored:
            raise ValueError(f"{path} holds adapter {stored!r}, not {adapter_name!r}")
        if adapter.skipped:
            names = ", ".join(f"{name!r} ({reason})" for name, reason in adapter.skipped)
            raise ValueError(f"{path}: not exported: {names}")
        return [adapter[name] for name in adapter]


def export_lora(
    source: str | PathLike[str],
    directory: str | PathLike[str],
    *,
    adapter_name: str | None = None,
    base_model: nn.Module | None = None,
) -> Path:
    """Write a flora adapter as a PEFT LoRA adapter with the same update, exactly.

    Each layer's update ``ΔW = s · G ×_0 U_0 … ×_{N-1} U_{N-1}`` becomes a
    LoRA pair of rank ``R_0`` (after clipping the ranks to what a Tucker
    tensor can use) with ``lora_alpha = r``, so
    ``peft.PeftModel.from_pretrained(base, directory)`` gives the outputs of
    the FLoRA-adapted model to float32 rounding. The formulas are in
    :doc:`/lora_adapters`.

    Parameters
    ----------
    source : str or path-like
        A flora adapter directory (:func:`flora.save_adapter`). For an
        adapted model, save it with :func:`flora.save_adapter` first.
    directory : str or path-like
        The PEFT adapter directory to write (``adapter_config.json`` and
        ``adapter_model.safetensors``), created with its parents. An
        existing one may hold only adapter files, which are replaced.
    adapter_name : str, optional
        The name of the adapter in ``source``; if given, it must match.
    base_model : torch.nn.Module, optional
        The base model (before adaptation), for the layer properties the
        directory does not record and PEFT's layout depends on: a
        convolution's ``groups``, ``dilation`` and ``padding_mode``, an
        embedding's ``padding_idx`` and ``max_norm``. Its weights are not
        read (a model on the ``meta`` device will do). Required when the
        adapter has Conv or Embedding layers; checked against every layer's
        kind and shape when given.

    Returns
    -------
    pathlib.Path
        ``directory``.

    Raises
    ------
    TypeError
        If ``source`` is not a path.
    ValueError
        If the source is no flora adapter, ``adapter_name`` does not match,
        or any layer has no exact LoRA form (the message lists each layer
        and why): a dilated convolution, a non-zero ``padding_mode`` with
        padding, an embedding with ``max_norm``, a parameter that is not
        2-D or shares its module with another, a Conv or Embedding layer
        without ``base_model``, or ``modules_to_save``. Nothing is written
        then.
    tuckerlib.io.AdapterError
        If the source directory is missing or malformed.

    See Also
    --------
    flora.save_adapter : Writes the source directory.
    tuckerlib.io.open_adapter : Reads either kind of directory as Tucker updates.

    Notes
    -----
    An adapter made with ``init="hosvd"`` changes the pretrained weight by
    ``ΔW − ΔW_init`` (its base holds ``W0 − ΔW_init``); that difference is
    exported, as one Tucker tensor with both cores on its block diagonal,
    so its LoRA rank is up to ``2 R_0`` and the PEFT adapter applies to the
    original ``W0``. A grouped convolution exports exactly at rank
    ``groups · min(R_0, out/groups)``, with ``lora_A`` zero across groups.

    Examples
    --------
    >>> import tempfile
    >>> import torch
    >>> import flora
    >>> torch.manual_seed(0) and None
    >>> model = torch.nn.Sequential(torch.nn.Linear(8, 6))
    >>> model = flora.inject(model, flora.FLoRAConfig(ranks=3, init="gaussian"))
    >>> with torch.no_grad():
    ...     _ = model[0].core.normal_()
    >>> with tempfile.TemporaryDirectory() as tmp:
    ...     _ = flora.save_adapter(model, f"{tmp}/flora")
    ...     out = flora.export_lora(f"{tmp}/flora", f"{tmp}/lora")
    ...     sorted(p.name for p in out.iterdir())
    ['adapter_config.json', 'adapter_model.safetensors']
    """
    source_path = _source_directory(source)
    target = Path(directory)
    if target.exists() and target.resolve() == source_path.resolve():
        raise ValueError(f"directory {target} is the source; write the LoRA adapter elsewhere")
    layers = _read_layers(source_path, adapter_name)
    refused = _parameter_clashes(layers)
    keys: dict[str, torch.Tensor] = {}
    ranks: dict[str, int] = {}
    for layer in layers:
        geometry = _geometry(layer, base_model)
        if isinstance(geometry, str):
            refused.append((layer.name, geometry))
            continue
        tensors = _lora_tensors(layer, geometry)
        keys.update(_peft_keys(layer, tensors))
        ranks[layer.name] = tensors.rank
    if refused:
        raise ValueError(f"{source_path}: no exact LoRA form for {_grouped(refused)}")
    config = _peft_config(layers, ranks)

    def fill(staging: Path) -> None:
        (staging / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
        save_file(keys, str(staging / WEIGHTS_NAME), metadata={"format": "pt"})

    return replace_directory(target, fill, allowed=_REPLACEABLE)
