r"""A PEFT LoRA adapter directory as FLoRA adapters for a given model, exactly.

Each LoRA pair is read as a Tucker tensor (:func:`tuckerlib.io.open_adapter`):
Linear :math:`\text{scaling} \cdot B I_r A` (core the identity, ``U_0 = B``, :math:`U_1 = A^\top`),
Embedding :math:`\text{scaling} \cdot A^\top I_r B^\top`, ConvNd :math:`\text{scaling} \cdot A
\times_0 B` (``lora_A``'s
kernel as the core, identity factors on the other modes);
:meth:`flora.TuckerDelta.from_tucker` brings it to usable ranks without
changing it. The model decides what each pair updates, as PEFT's layer
would: PEFT's LoRA branch of a Linear pair computes :math:`x \mapsto \text{scaling} \cdot B A x`
whatever ``fan_in_fan_out`` says, which is a ``torch.nn.Linear`` update
``B A`` or, for transformers' ``Conv1D`` (a weight stored ``(in, out)``),
the same ``B A`` of its ``(out, in)`` map, FLoRA's ``Conv1D`` kind. PEFT's
MultiheadAttention pairs (``X`` on the packed ``in_proj_weight``,
``X.base_layer.out_proj``) go to the attention's projection weights, kind
``"MultiheadAttention"``. What PEFT's layer applies differently from
FLoRA's (see :func:`flora._geometry.lora_difference`, and an embedding's
``padding_idx`` row, which PEFT updates and FLoRA does not) is refused by
layer name. PEFT's ``lora_bias`` (:math:`\text{scaling} \cdot \texttt{lora_B.bias}`, added to the
output) becomes the bias update :math:`\Delta b` of a Linear, ConvNd or Conv1D layer
with a bias; elsewhere only a zero one, which changes nothing, is accepted
(and left out).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from torch import nn
from torch.nn.utils import parametrize

from flora._apply import walk
from flora._geometry import lora_difference, module_geometry
from flora._lora_errors import LoraConversionError
from flora._tucker import reconstruct
from flora.kinds import kind_of_module
from flora.layers import FLoRALayer, ModulesToSave, TuckerDelta
from flora.spec import BIAS_KINDS
from tuckerlib.io import AdapterLayer, open_adapter

__all__ = ["Imported", "grouped", "lora_adapters", "plain_module_names"]

_PEFT_PREFIX = "base_model.model."
#: The kinds tuckerlib reads a PEFT ConvNd pair as.
_CONV_KINDS = ("Conv1d", "Conv2d", "Conv3d")
_SAVED_REASON = "modules_to_save"


def plain_module_names(model: nn.Module, prefix: str = "") -> Iterator[str]:
    """Module names of ``model`` as they are without FLoRA (what PEFT's name matching sees).

    FLoRA layers count as the module they wrap, saved modules as their
    original; shared modules are listed under every name, as PEFT's
    ``named_modules(remove_duplicate=False)`` does.
    """
    yield prefix
    if isinstance(model, FLoRALayer):
        model = model.base_layer
    elif isinstance(model, ModulesToSave):
        model = model.original_module
    for name, child in model._modules.items():
        if child is None or (name == "parametrizations" and parametrize.is_parametrized(model)):
            continue
        yield from plain_module_names(child, f"{prefix}.{name}" if prefix else name)


def grouped(refused: list[tuple[str, str]]) -> str:
    """``layers 'a', 'b' (reason); layer 'c' (reason)``."""
    by_reason: dict[str, list[str]] = {}
    for name, reason in refused:
        by_reason.setdefault(reason, []).append(repr(name))
    return "; ".join(
        f"{'layers' if len(names) > 1 else 'layer'} {', '.join(names)} ({reason})"
        for reason, names in by_reason.items()
    )


@dataclass(frozen=True)
class Imported:
    """What :func:`flora.attach_adapter` takes: layer adapters and saved modules' states."""

    adapters: dict[str, TuckerDelta]
    saved: dict[str, dict[str, torch.Tensor]]


@dataclass(frozen=True)
class _Target:
    r"""Where one LoRA pair goes, as a FLoRA layer of ``kind`` (and its :math:`\Delta b`)."""

    name: str
    kind: str
    core: torch.Tensor
    factors: list[torch.Tensor]
    bias: torch.Tensor | None = None


def _tucker(layer: AdapterLayer) -> tuple[torch.Tensor, list[torch.Tensor]]:
    core = torch.from_numpy(layer.core).to(torch.float64)
    return core, [torch.from_numpy(f).to(torch.float64) for f in layer.dense_factors()]


def _base(modules: Mapping[str, nn.Module], name: str) -> nn.Module | None:
    module = modules.get(name)
    return module.base_layer if isinstance(module, FLoRALayer) else module


def _kind(module: nn.Module | None) -> str | None:
    """The registered kind of ``module`` (None for no module or no kind)."""
    kind = None if module is None else kind_of_module(module)
    return None if kind is None else kind.saved_kind


def _wrong_module(name: str, module: nn.Module | None, expected: str) -> str:
    if module is None:
        return f"the model has no module {name!r}"
    return f"the model's {name!r} is a {type(module).__name__}, not a {expected}"


def _wrong_shape(layer: AdapterLayer, weight: torch.Tensor) -> str | None:
    if tuple(weight.shape) == layer.shape:
        return None
    return (
        f"the LoRA is for a weight of shape {list(layer.shape)}, the model's has "
        f"{list(weight.shape)}"
    )


def _padding_row(layer: AdapterLayer, index: int) -> str | None:
    core, factors = _tucker(layer)
    row = reconstruct(core, [factors[0][index : index + 1], factors[1]])
    if not row.any():
        return None
    return (
        f"padding_idx {index}: the LoRA updates the padding row, which PEFT applies and FLoRA's "
        "Embedding leaves unchanged"
    )


def _bias_update(layer: AdapterLayer, base: nn.Module, kind: str) -> torch.Tensor | str | None:
    """The pair's bias update as FLoRA holds it on ``base`` (None: none), or why it cannot."""
    if layer.bias is None:
        return None
    bias = torch.from_numpy(layer.bias).to(torch.float64)
    if kind in BIAS_KINDS and getattr(base, "bias", None) is not None:
        return bias
    if not bias.any():
        return None  # PEFT adds zero: nothing to hold
    if kind in BIAS_KINDS:
        return (
            "lora_bias: PEFT adds its trained lora_B bias to the output of this layer, which has "
            "no bias for FLoRA's bias update to change"
        )
    return (
        "lora_bias: PEFT adds its trained lora_B bias to the output of this layer, whose weight "
        "FLoRA adapts as a parameter, with no bias update"
    )


def _with_bias(target: _Target, layer: AdapterLayer, base: nn.Module) -> _Target | str:
    bias = _bias_update(layer, base, target.kind)
    if isinstance(bias, str):
        return bias
    return _Target(target.name, target.kind, target.core, target.factors, bias)


def _embedding(layer: AdapterLayer, modules: Mapping[str, nn.Module]) -> _Target | str:
    base = _base(modules, layer.name)
    if _kind(base) != "Embedding":
        return _wrong_module(layer.name, base, "torch.nn.Embedding")
    problem = _wrong_shape(layer, base.weight)
    problem = problem or lora_difference("Embedding", layer.shape, module_geometry(base))
    if problem is None and base.padding_idx is not None:
        problem = _padding_row(layer, base.padding_idx)
    return problem or _Target(layer.name, "Embedding", *_tucker(layer))


def _conv(layer: AdapterLayer, modules: Mapping[str, nn.Module]) -> _Target | str:
    base = _base(modules, layer.name)
    if _kind(base) != layer.kind:
        return _wrong_module(layer.name, base, f"torch.nn.{layer.kind}")
    problem = _wrong_shape(layer, base.weight)
    problem = problem or lora_difference(layer.kind, layer.shape, module_geometry(base))
    return problem or _with_bias(_Target(layer.name, layer.kind, *_tucker(layer)), layer, base)


def _matrix(
    layer: AdapterLayer, modules: Mapping[str, nn.Module], transposed: bool
) -> _Target | str:
    r"""A Linear pair, :math:`x \mapsto B A x`, on a ``torch.nn.Linear`` or a weight stored so."""
    core, factors = _tucker(layer)
    name, out_in = layer.name, layer.shape
    if transposed:  # read as the (in, out) weight "NAME.weight": back to (out, in)
        name, out_in = name.rpartition(".")[0], out_in[::-1]
        core, factors = core.T, factors[::-1]
    base = _base(modules, name)
    kind = _kind(base)
    attention = _attention_target(name, modules, out_in, core, factors)
    if attention is not None:
        return attention
    if kind in ("Linear", "Conv1D"):
        # The registry reads the base weight as its (out, in) map, whatever the
        # storage: Conv1D's (in, out), a quantized Linear's packed codes.
        if tuple(kind_of_module(base).read_weight(base).shape) == out_in:
            return _with_bias(_Target(name, kind, core, factors), layer, base)
        return (
            f"the LoRA is for a {out_in[0]}x{out_in[1]} (out x in) map, the model's weight has "
            f"shape {list(base.weight.shape)}"
        )
    return _wrong_module(name, base, "torch.nn.Linear or transformers' Conv1D")


def _attention_target(
    name: str,
    modules: Mapping[str, nn.Module],
    out_in: tuple[int, ...],
    core: torch.Tensor,
    factors: list[torch.Tensor],
) -> _Target | str | None:
    """A pair of PEFT's MultiheadAttention layer (``X``: in-projection, ``X.out_proj``), or None."""
    owner, _, child = name.rpartition(".")
    if _kind(modules.get(name)) == "MultiheadAttention":
        attention, weight = modules[name], f"{name}.in_proj_weight"
    elif child == "out_proj" and _kind(modules.get(owner)) == "MultiheadAttention":
        attention, weight = modules[owner], f"{name}.weight"
    else:
        return None
    if not attention._qkv_same_embed_dim:
        return (
            "PEFT's MultiheadAttention pairs are for a packed in_proj_weight; this attention has "
            "separate q/k/v weights (kdim or vdim other than embed_dim)"
        )
    stored = attention.out_proj.weight if weight.endswith(".out_proj.weight") else None
    stored = attention.in_proj_weight if stored is None else stored
    if tuple(stored.shape) != out_in:
        return (
            f"the LoRA is for a {out_in[0]}x{out_in[1]} (out x in) map, the model's weight has "
            f"shape {list(stored.shape)}"
        )
    return _Target(weight, "MultiheadAttention", core, factors)


def _target(
    layer: AdapterLayer, modules: Mapping[str, nn.Module], fan_in_fan_out: bool
) -> _Target | str:
    if layer.kind == "Embedding":
        return _embedding(layer, modules)
    if layer.kind in _CONV_KINDS:
        return _conv(layer, modules)
    if layer.kind == "Linear" or fan_in_fan_out:
        return _matrix(layer, modules, transposed=layer.kind == "Parameter")
    # A target_parameters pair: B A updates the parameter as it is stored.
    return _Target(layer.name, "Parameter", *_tucker(layer))


def _dropout(target: _Target, layer: AdapterLayer, trainable: bool) -> float | str:
    if target.kind != "Parameter" or not layer.dropout:
        # PEFT's Embedding and MultiheadAttention layers apply no dropout.
        return layer.dropout if target.kind not in ("Embedding", "MultiheadAttention") else 0.0
    if trainable:
        return (
            f"lora_dropout={layer.dropout}: FLoRA adapts this weight as a parameter, whose "
            "update has no input dropout to train with; import it with trainable=False"
        )
    return 0.0


#: The largest ``|ΔW|`` an imported layer may reach: float32's, the dtype layers compute in.
_LARGEST = float(torch.finfo(torch.float32).max)


def _value_problem(target: _Target, scale: float) -> str | None:
    """Why ``scale`` and the LoRA tensors give no usable update (NaN, inf, overflow), or None."""
    tensors = [target.core, *target.factors]
    if target.bias is not None:
        tensors.append(target.bias)
    if not all(bool(torch.isfinite(t).all()) for t in tensors):
        return "lora_A, lora_B or the bias holds NaN or infinite values"
    # |ΔW| <= |scale| · ‖core‖ · Π ‖U_n‖ (Frobenius norms, in float64).
    # and the scaled core is computed first: scale · max |core| must fit too.
    norms = [float(t.norm()) for t in (target.core, *target.factors)]
    bound = max(abs(scale) * math.prod(norms), abs(scale) * float(target.core.abs().max()))
    if not math.isfinite(bound) or bound > _LARGEST:
        return (
            f"scaling {scale:.3g} (lora_alpha / r) times lora_B @ lora_A can reach {bound:.3g}, "
            "beyond float32's range"
        )
    return None


def _adapter(
    layer: AdapterLayer,
    modules: Mapping[str, nn.Module],
    fan_in_fan_out: bool,
    trainable: bool,
) -> tuple[str, TuckerDelta | str]:
    target = _target(layer, modules, fan_in_fan_out)
    if isinstance(target, str):
        return layer.name, target
    dropout = _dropout(target, layer, trainable)
    if isinstance(dropout, str):
        return target.name, dropout
    problem = _value_problem(target, layer.scale)
    if problem is not None:
        return target.name, problem
    delta = TuckerDelta.from_tucker(
        target.kind,
        target.core,
        target.factors,
        scale=layer.scale,
        dropout=dropout,
        bias=target.bias,
        trainable=trainable,
    )
    return target.name, delta


def _load_weights(directory: Path) -> dict[str, torch.Tensor]:
    """The adapter file's tensors under PEFT's keys without ``base_model.model.``."""
    path = directory / "adapter_model.safetensors"
    if path.is_file():
        tensors = load_file(str(path))
    else:
        tensors = torch.load(directory / "adapter_model.bin", map_location="cpu", weights_only=True)
    return {key.removeprefix(_PEFT_PREFIX): value for key, value in tensors.items()}


def _saved_owners(entries: list[str], names: list[str]) -> list[str]:
    # PEFT wraps every module whose name ends with an entry (a plain string
    # suffix, not a dotted one); the outermost of them hold the saved state.
    matched = [k for k in names if k and any(k.endswith(e) for e in entries)]
    return [k for k in matched if not any(k.startswith(o + ".") for o in matched)]


def _original(modules: Mapping[str, nn.Module], name: str) -> nn.Module | None:
    module = modules.get(name)
    return module.original_module if isinstance(module, ModulesToSave) else module


def _saved_states(
    directory: Path,
    config: Mapping[str, Any],
    model: nn.Module,
    skipped: list[tuple[str, str]],
) -> tuple[dict[str, dict[str, torch.Tensor]], list[tuple[str, str]]]:
    """The saved modules' states (cast as PEFT's loading casts them), and the tensors refused."""
    entries = config.get("modules_to_save") or []
    entries = [entries] if isinstance(entries, str) else list(entries)
    owners = _saved_owners(entries, list(dict.fromkeys(plain_module_names(model))))
    refused, keys = [], {}
    for key, reason in skipped:
        owner = max((o for o in owners if key.startswith(o + ".")), key=len, default=None)
        if owner is None or not reason.startswith(_SAVED_REASON):
            refused.append((key, reason))
        else:
            keys[key] = owner
    if not keys:
        return {}, refused
    tensors, modules = _load_weights(directory), dict(walk(model))
    states: dict[str, dict[str, torch.Tensor]] = {}
    for key, owner in keys.items():
        states.setdefault(owner, {})[key[len(owner) + 1 :]] = tensors[key]
    for owner, state in states.items():
        original = _original(modules, owner)
        expected = {} if original is None else original.state_dict()
        for key, value in state.items():
            if key in expected and value.is_floating_point() and expected[key].is_floating_point():
                state[key] = value.to(expected[key].dtype)
    return states, refused


def _inside_saved(name: str, saved: Mapping[str, object]) -> str | None:
    owner = next((o for o in saved if name.startswith(o + ".")), None)
    if owner is None:
        return None
    return f"inside module {owner!r}, which the adapter saves whole (modules_to_save)"


def lora_adapters(model: nn.Module, directory: Path, *, trainable: bool) -> Imported:
    """Every layer and saved module of a PEFT LoRA directory, as FLoRA builds them for ``model``.

    Raises
    ------
    tuckerlib.io.AdapterError
        If the directory is no PEFT LoRA adapter or uses an option with no
        exact FLoRA form (naming the option).
    LoraConversionError
        If it holds a flora adapter, or any layer or tensor has no exact
        FLoRA form (all named, with reasons).
    """
    with open_adapter(directory) as adapter:
        if adapter.format != "lora":
            raise LoraConversionError(
                f"{directory} holds a flora adapter, not a PEFT LoRA one; use flora.load_adapter"
            )
        config = adapter.config
        saved, refused = _saved_states(directory, config, model, adapter.skipped)
        modules = dict(walk(model))
        adapters: dict[str, TuckerDelta] = {}
        for name in adapter:
            target, result = _adapter(
                adapter[name], modules, bool(config.get("fan_in_fan_out")), trainable
            )
            problem = result if isinstance(result, str) else _inside_saved(target, saved)
            if problem is not None:
                refused.append((target, problem))
            else:
                adapters[target] = result
    if refused:
        raise LoraConversionError(f"{directory}: no exact FLoRA form for {grouped(refused)}")
    return Imported(adapters, saved)
