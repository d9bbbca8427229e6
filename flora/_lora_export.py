r"""A flora adapter (of a model, or in a directory) as PEFT LoRA tensors and config.

Each layer's update becomes a LoRA pair by :mod:`flora._lora_math`; what
PEFT's layer would apply differently (:func:`flora._geometry.lora_difference`)
is refused by name. The layout depends on the layer's geometry: from the
model's own modules, from the directory's records, or from a ``base_model``
for directories that do not record it. Bias updates :math:`\Delta b` become PEFT's
``lora_bias``: :math:`\texttt{lora_B.bias} = \Delta b` (the exported scaling is 1), zero for
the layers without one, since ``lora_bias`` is one setting for the adapter.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from flora._apply import find_adapted, find_saved
from flora._geometry import check_geometry, lora_difference, module_geometry
from flora._lora_errors import LoraConversionError
from flora._lora_import import plain_module_names
from flora._lora_math import LoraTensors, lora_split, to_lora
from flora._tucker import to_usable_ranks
from flora.io import _resolve_name, adapter_state_dict, read_adapter
from flora.kinds import lora_form, record_of
from flora.layers import FLoRALayer
from tuckerlib.io import AdapterLayer, open_adapter
from tuckerlib.io._adapter_lora import DOUBLED_OUT_PROJ
from tuckerlib.io.flora_format import bias_key, core_key, difference, factor_key, saved_key
from tuckerlib.io.layer_kinds import kind_rule

__all__ = [
    "ExportLayer",
    "Source",
    "lora_bias",
    "model_source",
    "peft_config",
    "peft_tensors",
    "read_source",
]

_PEFT_PREFIX = "base_model.model."


@dataclass(frozen=True)
class ExportLayer:
    r"""A layer's update :math:`s \cdot G \times_n U_n` and :math:`\Delta b` (float64) for PEFT."""

    name: str
    kind: str
    shape: tuple[int, ...]
    core: torch.Tensor
    factors: list[torch.Tensor]
    scale: float
    dropout: float
    geometry: Mapping[str, Any] | None
    bias: torch.Tensor | None = None


@dataclass(frozen=True)
class Source:
    """An adapter to export: its layers, its saved modules' states, and the names to check."""

    layers: list[ExportLayer]
    saved: dict[str, dict[str, torch.Tensor]]
    #: Module names of the base model, for PEFT's name matching; None if unknown.
    names: list[str] | None


def _from_adapter_layer(layer: AdapterLayer) -> ExportLayer:
    core = torch.from_numpy(layer.core).to(torch.float64)
    factors = [torch.from_numpy(f).to(torch.float64) for f in layer.dense_factors()]
    bias = None if layer.bias is None else torch.from_numpy(layer.bias).to(torch.float64)
    return ExportLayer(
        layer.name,
        layer.kind,
        layer.shape,
        core,
        factors,
        layer.scale,
        layer.dropout,
        layer.geometry,
        bias,
    )


def read_source(path: Path, adapter_name: str | None, base_model: nn.Module | None) -> Source:
    """A flora adapter directory as a :class:`Source` (LoraConversionError if it is none)."""
    with open_adapter(path) as adapter:
        if adapter.format != "flora":
            raise LoraConversionError(f"{path} holds a PEFT LoRA adapter, not a flora one")
        stored = adapter.config.get("adapter_name", "default")
        if adapter_name is not None and adapter_name != stored:
            raise LoraConversionError(f"{path} holds adapter {stored!r}, not {adapter_name!r}")
        layers = [_from_adapter_layer(adapter[name]) for name in adapter]
        has_saved = bool(adapter.skipped)
    saved = {}
    if has_saved:
        flora_adapter = read_adapter(path)
        saved = {m: flora_adapter.saved_state(m) for m in flora_adapter.modules_to_save}
    names = None if base_model is None else [n for n, _ in _named_modules(base_model)]
    return Source(layers, saved, names)


def _named_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return list(model.named_modules(remove_duplicate=False))


def _to64(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.detach().to("cpu", torch.float64)


def _model_layer(name: str, host: object, adapter: Any, state: Mapping[str, Any]) -> ExportLayer:
    spec = adapter.spec
    count = len(spec.shape)
    core = _to64(state[core_key(name)])
    factors = [_to64(state[factor_key(name, n)]) for n in range(count)]
    if spec.init == "hosvd":
        # The base holds W0 − ΔW_init: the change to W0 is ΔW − ΔW_init.
        initial_core = _to64(state[core_key(name, initial=True)])
        initial = [_to64(state[factor_key(name, n, initial=True)]) for n in range(count)]
        core, factors = to_usable_ranks(*difference(core, factors, initial_core, initial))
    geometry = module_geometry(host.base_layer) if isinstance(host, FLoRALayer) else None
    bias = _to64(state[bias_key(name)]) if spec.bias else None
    return ExportLayer(
        name, spec.kind, spec.shape, core, factors, spec.scale, spec.dropout, geometry, bias
    )


def model_source(model: nn.Module, adapter_name: str | None) -> Source:
    """One adapter of an adapted model as a :class:`Source`; geometry from its layers."""
    name = _resolve_name(model, adapter_name)
    state = adapter_state_dict(model, adapter_name=name)
    meta = sorted(key for key, value in state.items() if value.is_meta)
    if meta:
        raise LoraConversionError(
            f"the model: adapter tensors {meta} are meta tensors (a shape without values); "
            "load the weights (to_empty and load_state_dict) before exporting"
        )
    layers = [
        _model_layer(layer_name, host, host.adapters[name], state)
        for layer_name, host in find_adapted(model).items()
        if name in host.adapters
    ]
    saved = {}
    for module in find_saved(model):
        prefix = saved_key(module, "")
        found = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
        if found:
            saved[module] = found
    return Source(layers, saved, list(dict.fromkeys(plain_module_names(model))))


@dataclass(frozen=True)
class _Layout:
    """What PEFT's layer needs beyond the weight's shape."""

    groups: int = 1
    padding_idx: int | None = None


def _base_module_geometry(layer: ExportLayer, base_model: nn.Module) -> dict[str, Any] | str | None:
    """The base module's geometry (None: a kind without one), or why it does not fit."""
    kind = layer.kind
    module_name = layer.name.rpartition(".")[0] if kind == "Parameter" else layer.name
    try:
        module = base_model.get_submodule(module_name)
    except AttributeError:
        return f"base_model has no module {module_name!r}"
    if kind == "Parameter":
        weight = getattr(module, layer.name.rpartition(".")[2], None)
    else:
        found = record_of(module, kind)
        if found is None:
            return f"base_model's {module_name!r} is a {type(module).__name__}, not a {kind}"
        weight = found.read_weight(module)
    if not isinstance(weight, torch.Tensor) or tuple(weight.shape) != layer.shape:
        found = tuple(weight.shape) if isinstance(weight, torch.Tensor) else None
        return f"the adapter is for shape {list(layer.shape)}, base_model's weight has {found}"
    return module_geometry(module) if kind != "Parameter" else None


def _geometry(layer: ExportLayer, base_model: nn.Module | None) -> Mapping[str, Any] | str | None:
    """The geometry PEFT's layout follows, or why there is none to follow."""
    recorded = layer.geometry
    if recorded is not None:
        try:
            recorded = check_geometry(layer.kind, layer.shape, recorded)
        except ValueError as exc:
            return str(exc)
    if base_model is None:
        return recorded
    found = _base_module_geometry(layer, base_model)
    if isinstance(found, str) or recorded is None or found == recorded:
        return found
    return f"the directory records {dict(recorded)}, base_model's layer has {found}"


def _layout(layer: ExportLayer, base_model: nn.Module | None) -> _Layout | str:
    """How PEFT must lay the layer out, or why no LoRA pair reproduces it."""
    if layer.kind == "Parameter" and len(layer.shape) != 2:
        return (
            f"a {len(layer.shape)}-D parameter: PEFT's target_parameters hold 2-D weights and "
            "3-D expert stacks whose axis order and per-expert ranks no FLoRA tensor fixes"
        )
    form = lora_form(layer.kind)
    if form is None:
        return f"a {layer.kind} layer: PEFT's LoRA has no form for this kind"
    geometry = _geometry(layer, base_model)
    if isinstance(geometry, str):
        return geometry
    if form == "attention" and _attention_module(layer) is None:
        return (
            "a separate q/k/v projection: PEFT's LoRA adapts a MultiheadAttention through its "
            "packed in_proj_weight only (kdim = vdim = embed_dim)"
        )
    if form in ("linear", "attention"):
        return _Layout()
    if geometry is None:
        detail = "padding_idx" if layer.kind == "Embedding" else "groups, dilation and padding_mode"
        return (
            f"the adapter directory does not record the base layer's {detail}, on which "
            "PEFT's form depends; pass base_model to flora.export_lora (its weights are not read)"
        )
    difference = lora_difference(layer.kind, layer.shape, geometry)
    if difference is not None:
        return difference
    return _Layout(geometry.get("groups", 1), geometry.get("padding_idx"))


def _lora_tensors(layer: ExportLayer, layout: _Layout) -> LoraTensors:
    # float64 arithmetic, float32 storage: the exported pair is ΔW to float32 rounding.
    left, right = lora_split(layer.core, layer.factors, layer.scale)
    forms = {"linear": "Linear", "attention": "Linear", "embedding": "Embedding"}
    kind = forms.get(lora_form(layer.kind), layer.kind)
    tensors = to_lora(kind, left, right, groups=layout.groups, padding_idx=layout.padding_idx)
    return LoraTensors(tensors.lora_a.float(), tensors.lora_b.float(), tensors.rank)


def _peft_keys(
    layer: ExportLayer, tensors: LoraTensors, with_bias: bool
) -> dict[str, torch.Tensor]:
    prefix = f"{_PEFT_PREFIX}{_lora_module(layer)}"
    if lora_form(layer.kind) == "embedding":
        return {
            f"{prefix}.lora_embedding_A": tensors.lora_a,
            f"{prefix}.lora_embedding_B": tensors.lora_b,
        }
    keys = {f"{prefix}.lora_A.weight": tensors.lora_a, f"{prefix}.lora_B.weight": tensors.lora_b}
    if with_bias:
        # PEFT adds scaling · lora_B.bias with scaling 1 here; zero where there is no Δb.
        bias = torch.zeros(layer.shape[0]) if layer.bias is None else layer.bias.float()
        keys[f"{prefix}.lora_B.bias"] = bias.contiguous()
    return keys


def _attention_module(layer: ExportLayer) -> str | None:
    """The attention module of a MultiheadAttention layer's packed in-projection, else None."""
    if layer.kind == "MultiheadAttention" and layer.name.endswith(".in_proj_weight"):
        return layer.name.removesuffix(".in_proj_weight")
    if layer.kind == "MultiheadAttention" and layer.name.endswith(".out_proj.weight"):
        return layer.name.removesuffix(".out_proj.weight")
    return None


def _lora_module(layer: ExportLayer) -> str:
    """The module under whose name PEFT keeps the layer's pair."""
    if layer.kind == "Parameter":
        return layer.name.rpartition(".")[0]
    if layer.kind == "MultiheadAttention":  # PEFT's layer X holds out_proj in its base_layer
        attention = _attention_module(layer)
        return (
            attention
            if layer.name.endswith(".in_proj_weight")
            else f"{attention}.base_layer.out_proj"
        )
    return layer.name


def _target_module(layer: ExportLayer) -> str:
    """The ``target_modules`` entry that makes PEFT adapt the layer (an attention's own name)."""
    return _attention_module(layer) or layer.name


def _pad(tensors: LoraTensors, rank: int) -> LoraTensors:
    """The pair at a higher ``rank``, by zero rows of A and columns of B: the same update."""
    extra = rank - tensors.rank
    lora_a = torch.cat([tensors.lora_a, tensors.lora_a.new_zeros(extra, tensors.lora_a.shape[1])])
    lora_b = torch.cat(
        [tensors.lora_b, tensors.lora_b.new_zeros(tensors.lora_b.shape[0], extra)], 1
    )
    return LoraTensors(lora_a.contiguous(), lora_b.contiguous(), rank)


def _attention_pairs(
    found: dict[str, tuple[ExportLayer, LoraTensors]], with_bias: bool
) -> tuple[dict[str, torch.Tensor], dict[str, int]]:
    """PEFT's MultiheadAttention pairs: in- and out-projection at one rank, zero where absent.

    PEFT's layer always holds both pairs, at the rank of the attention
    module; a zero pair (or zero rows) changes nothing.
    """
    keys: dict[str, torch.Tensor] = {}
    ranks: dict[str, int] = {}
    modules: dict[str, list[tuple[ExportLayer, LoraTensors]]] = {}
    for layer, tensors in found.values():
        modules.setdefault(_attention_module(layer), []).append((layer, tensors))
    for module, pairs in modules.items():
        rank = max(tensors.rank for _, tensors in pairs)
        present = {layer.name for layer, _ in pairs}
        for suffix, rows in (("in_proj_weight", 3), ("out_proj.weight", 1)):
            if f"{module}.{suffix}" in present:
                continue
            width = pairs[0][0].shape[1]
            shape = (rows * width, width)
            empty = ExportLayer(
                f"{module}.{suffix}",
                "MultiheadAttention",
                shape,
                torch.zeros(0, 0),
                [],
                1.0,
                0.0,
                None,
            )
            pairs.append((empty, LoraTensors(torch.zeros(0, width), torch.zeros(shape[0], 0), 0)))
        for layer, tensors in pairs:
            padded = _pad(tensors, rank)
            if layer.name.endswith(".out_proj.weight"):
                # The PEFT release written for adds this pair twice (DOUBLED_OUT_PROJ).
                padded = LoraTensors(padded.lora_a, padded.lora_b / 2, rank)
            keys.update(_peft_keys(layer, padded, with_bias))
        ranks[module] = rank
    return keys, ranks


def lora_bias(source: Source) -> bool:
    """Whether the export needs PEFT's ``lora_bias``: some layer has a bias update."""
    return any(layer.bias is not None for layer in source.layers)


def _bias_refusal(layer: ExportLayer, source: Source) -> str | None:
    """Why PEFT cannot hold ``layer`` beside the adapter's bias updates, if it cannot."""
    if not lora_bias(source) or layer.kind not in ("Embedding", "Parameter"):
        return None
    with_bias = [other.name for other in source.layers if other.bias is not None]
    what = "Embedding layers" if layer.kind == "Embedding" else "target_parameters"
    return (
        f"the bias updates of {with_bias[:3]}{' ...' if len(with_bias) > 3 else ''} need PEFT's "
        f"lora_bias=True, one setting for every layer, which PEFT refuses for {what}"
    )


def _parameter_clashes(layers: Sequence[ExportLayer]) -> list[tuple[str, str]]:
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


def _saved_refusal(module: str, source: Source, targets: Sequence[str]) -> str | None:
    """Why PEFT would not load saved module ``module`` exactly, if it would not.

    Without the base model's module names (a directory exported alone) the
    adapter's own layers are what can be checked: PEFT would wrap an adapted
    layer inside the saved module twice. A module elsewhere whose name ends
    with the entry would get a wrapper of its own, a copy of itself that
    changes no output; the check for it needs the names (``base_model``).
    """
    if source.names is None:
        inside = [t for t in targets if t.startswith(module + ".")]
        if inside:
            return (
                f"modules_to_save: the adapter's LoRA targets {inside[:3]} lie inside it, "
                "which PEFT would wrap in both"
            )
        return None
    if module not in source.names:
        return f"modules_to_save: the model has no module {module!r}"
    others = [k for k in source.names if k != module and k.endswith(module)]
    if others:
        return (
            f"modules_to_save: PEFT wraps every module whose name ends with {module!r}, so it "
            f"would wrap {others[:3]} too"
        )
    inside = [
        k
        for k in source.names
        if k.startswith(module + ".") and any(k == t or k.endswith("." + t) for t in targets)
    ]
    if inside:
        return (
            f"modules_to_save: PEFT's LoRA targets also match {inside[:3]} inside it, which it "
            "would wrap in both"
        )
    return None


def peft_tensors(
    source: Source, base_model: nn.Module | None
) -> tuple[dict[str, torch.Tensor], dict[str, int], list[tuple[str, str]]]:
    """PEFT's tensors, each layer's LoRA rank, and what has no exact LoRA form (with why)."""
    refused = _parameter_clashes(source.layers)
    keys: dict[str, torch.Tensor] = {}
    ranks: dict[str, int] = {}
    attention: dict[str, tuple[ExportLayer, LoraTensors]] = {}
    for layer in source.layers:
        layout = _layout(layer, base_model)
        if isinstance(layout, str):
            refused.append((layer.name, layout))
            continue
        reason = _bias_refusal(layer, source)
        if reason is not None:
            refused.append((layer.name, reason))
            continue
        tensors = _lora_tensors(layer, layout)
        if lora_form(layer.kind) == "attention":
            attention[layer.name] = (layer, tensors)
            continue
        keys.update(_peft_keys(layer, tensors, lora_bias(source)))
        ranks[layer.name] = tensors.rank
    attention_keys, attention_ranks = _attention_pairs(attention, lora_bias(source))
    keys.update(attention_keys)
    ranks.update(attention_ranks)
    targets = [_target_module(layer) for layer in source.layers if layer.kind != "Parameter"]
    for module, state in source.saved.items():
        reason = _saved_refusal(module, source, targets)
        if reason is not None:
            refused.append((module, reason))
            continue
        for key, value in state.items():
            keys[f"{_PEFT_PREFIX}{module}.{key}"] = value.detach().to("cpu").contiguous()
    return keys, ranks, refused


def _exact_pattern(name: str) -> str:
    # PEFT matches a pattern key against any dotted suffix of a name, as
    # re.match(rf"(.*\.)?({key})$", name); anchoring the key at the start
    # makes it match this one name only.
    return "^" + name.replace(".", r"\.")


def _dropout(layers: Sequence[ExportLayer]) -> float:
    # PEFT's Embedding and MultiheadAttention layers apply no dropout, parameters have none.
    values = {
        layer.dropout
        for layer in layers
        if layer.kind != "Parameter" and lora_form(layer.kind) in ("linear", "conv")
    }
    if len(values) > 1:
        raise LoraConversionError(
            f"the layers use different dropouts {sorted(values)}; PEFT's lora_dropout is one value"
        )
    dropout = values.pop() if values else 0.0
    if dropout and any(layer.kind == "Parameter" for layer in layers):
        raise LoraConversionError(
            f"PEFT's target_parameters do not work with lora_dropout={dropout}; the adapter has "
            "parameters and dropout on its layers"
        )
    return dropout


def peft_config(source: Source, ranks: Mapping[str, int]) -> dict[str, Any]:
    """PEFT's ``adapter_config.json`` for the exported layers, scaling 1 everywhere."""
    counts = Counter(ranks.values())
    rank = max(counts, key=lambda r: (counts[r], -r))
    # lora_alpha = r everywhere makes PEFT's scaling 1: the tensors carry s.
    different = {_exact_pattern(name): r for name, r in ranks.items() if r != rank}
    layers = source.layers
    modules = list(
        dict.fromkeys(_target_module(layer) for layer in layers if layer.kind != "Parameter")
    )
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
        # PEFT's one flag, which it corrects per layer: True for Conv1D, False for Linear.
        "fan_in_fan_out": any(kind_rule(layer.kind).transposed for layer in layers),
        "bias": "none",
        "lora_bias": lora_bias(source),
        "use_dora": False,
        "init_lora_weights": True,
        "modules_to_save": list(source.saved) or None,
        **_attention_version(layers),
    }


def _attention_version(layers: Sequence[ExportLayer]) -> dict[str, str]:
    """The PEFT release the MultiheadAttention pairs are written for (its out_proj rule)."""
    if not any(lora_form(layer.kind) == "attention" for layer in layers):
        return {}
    return {"peft_version": ".".join(str(n) for n in DOUBLED_OUT_PROJ)}
