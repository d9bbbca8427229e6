"""Model-level FLoRA: put adapters into a model, merge them, take them out again."""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass

from torch import nn
from torch.nn.utils import parametrize

from flora.config import FLoRAConfig, clip_ranks
from flora.layers import (
    Conv1d,
    Conv2d,
    Conv3d,
    Embedding,
    FLoRALayer,
    Linear,
    TuckerDelta,
    TuckerParametrization,
)

__all__ = [
    "LAYER_TYPES",
    "adapted_layers",
    "inject",
    "merge",
    "trainable_parameters",
    "unload",
    "unmerge",
]

#: The torch module types ``inject`` adapts (exact types) and their FLoRA layer.
LAYER_TYPES: dict[type[nn.Module], type[FLoRALayer]] = {
    nn.Linear: Linear,
    nn.Conv1d: Conv1d,
    nn.Conv2d: Conv2d,
    nn.Conv3d: Conv3d,
    nn.Embedding: Embedding,
}


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _walk(module: nn.Module, prefix: str = "") -> Iterator[tuple[str, nn.Module]]:
    """``named_modules`` without the insides of FLoRA layers and parametrizations."""
    yield prefix, module
    if isinstance(module, FLoRALayer):
        return
    for name, child in module.named_children():
        if name == "parametrizations" and parametrize.is_parametrized(module):
            continue
        yield from _walk(child, _join(prefix, name))


def adapted_layers(model: nn.Module) -> dict[str, TuckerDelta]:
    """Every FLoRA adapter of ``model``, by name.

    Parameters
    ----------
    model : torch.nn.Module
        A model with adapters.

    Returns
    -------
    dict of str to TuckerDelta
        Module adapters under their module's name; parameter adapters
        (:class:`flora.TuckerParametrization`) under ``"module.parameter"``.

    Examples
    --------
    >>> import torch
    >>> import flora
    >>> model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
    >>> _ = flora.inject(model, flora.FLoRAConfig(ranks=2))
    >>> list(flora.adapted_layers(model))
    ['0', '2']
    """
    found: dict[str, TuckerDelta] = {}
    for name, module in _walk(model):
        if isinstance(module, FLoRALayer):
            found[name] = module
        elif parametrize.is_parametrized(module):
            for pname, chain in module.parametrizations.items():
                for item in chain:
                    if isinstance(item, TuckerParametrization):
                        found[_join(name, pname)] = item
    return found


def _matches(name: str, spec: list[str] | str | None) -> bool:
    if spec is None:
        return False
    if isinstance(spec, str):
        return re.fullmatch(spec, name) is not None
    return any(name == target or name.endswith("." + target) for target in spec)


def _check_each_entry_matches(spec: list[str] | str | None, names: list[str], field: str) -> None:
    if spec is None:
        return
    entries = [spec] if isinstance(spec, str) else spec
    for entry in entries:
        if not any(_matches(name, [entry] if isinstance(spec, list) else entry) for name in names):
            raise ValueError(f"{field} entry {entry!r} matches no name in the model")


@dataclass(frozen=True)
class _Target:
    name: str
    module: nn.Module
    parameter: str | None
    ranks: tuple[int, ...]


def _module_targets(model: nn.Module, config: FLoRAConfig) -> list[_Target]:
    modules = [(name, m) for name, m in _walk(model) if name]
    _check_each_entry_matches(config.target_modules, [n for n, _ in modules], "target_modules")
    everything = config.target_modules is None and config.target_parameters is None
    targets = []
    for name, module in modules:
        if _matches(name, config.exclude_modules):
            continue
        if config.target_modules is None:
            if not everything or type(module) not in LAYER_TYPES:
                continue
        elif not _matches(name, config.target_modules):
            continue
        if isinstance(module, TuckerDelta):
            raise ValueError(f"module {name!r} already has a FLoRA adapter")
        if type(module) not in LAYER_TYPES:
            kinds = ", ".join(t.__name__ for t in LAYER_TYPES)
            raise TypeError(
                f"module {name!r} is a {type(module).__name__}, which inject cannot adapt "
                f"(supported: {kinds}; use target_parameters for other weights)"
            )
        kind = LAYER_TYPES[type(module)].kind
        ranks = clip_ranks(config.ranks_for(kind, name), module.weight.shape, f"ranks of {name!r}")
        targets.append(_Target(name, module, None, ranks))
    return targets


def _parameter_targets(model: nn.Module, config: FLoRAConfig) -> list[_Target]:
    if config.target_parameters is None:
        return []
    candidates = []
    for module_name, module in _walk(model):
        names = [n for n, _ in module.named_parameters(recurse=False)]
        if parametrize.is_parametrized(module):
            names += list(module.parametrizations.keys())
        candidates += [(module_name, module, pname) for pname in names]
    full = [_join(m, p) for m, _, p in candidates]
    _check_each_entry_matches(config.target_parameters, full, "target_parameters")
    targets = []
    for name, (module_name, module, pname) in zip(full, candidates, strict=True):
        if not _matches(name, config.target_parameters):
            continue
        if _matches(name, config.exclude_modules) or _matches(module_name, config.exclude_modules):
            continue
        if isinstance(module, FLoRALayer) or parametrize.is_parametrized(module, pname):
            raise ValueError(f"parameter {name!r} already has an adapter or a parametrization")
        shape = getattr(module, pname).shape
        if len(shape) == 0:
            raise ValueError(f"parameter {name!r} is 0-D; FLoRA needs at least one dimension")
        ranks = clip_ranks(config.ranks_for("Parameter", name), shape, f"ranks of {name!r}")
        targets.append(_Target(name, module, pname, ranks))
    return targets


def _freeze_base(model: nn.Module) -> None:
    adapter_params = {
        id(p) for layer in adapted_layers(model).values() for p in (layer.core, *layer.factors)
    }
    for param in model.parameters():
        param.requires_grad_(id(param) in adapter_params)


def _attach(model: nn.Module, target: _Target, config: FLoRAConfig) -> TuckerDelta:
    if target.parameter is not None:
        return TuckerParametrization(
            target.module, target.parameter, target.ranks, scale=config.scale, init=config.init
        )
    layer = LAYER_TYPES[type(target.module)](
        target.module,
        target.ranks,
        scale=config.scale,
        dropout=config.dropout,
        init=config.init,
        forward=config.forward,
    )
    parent_name, _, child = target.name.rpartition(".")
    setattr(model.get_submodule(parent_name), child, layer)
    return layer


def inject(model: nn.Module, config: FLoRAConfig, *, adapter_name: str = "default") -> nn.Module:
    """Add FLoRA adapters to ``model`` in place and freeze everything else.

    Parameters
    ----------
    model : torch.nn.Module
        The model; matching submodules are replaced by FLoRA layers that
        wrap them, matching parameters get a :class:`flora.TuckerParametrization`.
    config : FLoRAConfig
        Targets, ranks, scale, dropout, init and forward mode.
    adapter_name : str, optional
        Recorded on every new adapter (``layer.adapter_name``) and in saved
        adapters.

    Returns
    -------
    torch.nn.Module
        ``model`` itself. Only adapter parameters require gradients
        afterwards.

    Raises
    ------
    ValueError
        If a ``target_modules``/``target_parameters`` entry matches nothing,
        no module matches at all, a target already has an adapter, or ranks
        do not fit a layer. Nothing is changed in that case.
    TypeError
        If ``config`` is not a :class:`flora.FLoRAConfig` or a target module is of
        a kind FLoRA cannot adapt (see ``LAYER_TYPES``).

    See Also
    --------
    unload : Take the adapters out again.
    flora.load_adapter : Inject and load a saved adapter.

    Examples
    --------
    >>> import torch
    >>> import flora
    >>> conv = torch.nn.Conv2d(3, 8, 3)
    >>> model = torch.nn.Sequential(conv, torch.nn.ReLU(), torch.nn.Conv2d(8, 4, 1))
    >>> _ = flora.inject(model, flora.FLoRAConfig(target_modules=["0"]))
    >>> type(model[0]).__name__, model[0].ranks
    ('Conv2d', (8, 3, 2, 2))
    >>> flora.trainable_parameters(model)  # 8*3*2*2 + 8*8 + 3*3 + 3*2 + 3*2
    181
    >>> model[0].base_layer is conv
    True
    """
    if not isinstance(config, FLoRAConfig):
        raise TypeError(f"config must be a FLoRAConfig, got {type(config).__name__}")
    if not isinstance(adapter_name, str) or not adapter_name:
        raise ValueError(f"adapter_name must be a non-empty string, got {adapter_name!r}")
    targets = _module_targets(model, config) + _parameter_targets(model, config)
    if not targets:
        raise ValueError("the config matches no module or parameter of the model")
    wrapped = {id(t.module): t.name for t in targets if t.parameter is None}
    for target in targets:
        if target.parameter is not None and id(target.module) in wrapped:
            raise ValueError(
                f"parameter {target.name!r} belongs to module {wrapped[id(target.module)]!r}, "
                "which is adapted too"
            )
    for target in targets:
        layer = _attach(model, target, config)
        layer.adapter_name = adapter_name
        layer.config = config
    _freeze_base(model)
    return model


def merge(model: nn.Module) -> nn.Module:
    """Add every adapter's ``ΔW`` into its base weight (``W ← W + ΔW``).

    Merged layers run only their base op; outputs equal the unmerged
    model's to rounding. ``ΔW`` is computed in the adapter's precision
    (float32 for half-precision bases) and cast once.

    Parameters
    ----------
    model : torch.nn.Module
        A model with adapters.

    Returns
    -------
    torch.nn.Module
        ``model``.

    Raises
    ------
    RuntimeError
        If any adapter is already merged (nothing is merged then).
    ValueError
        If the model has no adapters.

    Examples
    --------
    >>> import torch
    >>> import flora
    >>> model = flora.inject(torch.nn.Sequential(torch.nn.Linear(4, 4)), flora.FLoRAConfig(ranks=2))
    >>> _ = flora.merge(model)
    >>> model[0].merged
    True
    >>> _ = flora.unmerge(model)
    """
    layers = _require_adapters(model)
    merged = [name for name, layer in layers.items() if layer.merged]
    if merged:
        raise RuntimeError(f"adapters already merged: {merged}; call unmerge() first")
    for layer in layers.values():
        layer.merge()
    return model


def unmerge(model: nn.Module) -> nn.Module:
    """Subtract every adapter's ``ΔW`` from its base weight again.

    Parameters
    ----------
    model : torch.nn.Module
        A merged model.

    Returns
    -------
    torch.nn.Module
        ``model``.

    Raises
    ------
    RuntimeError
        If any adapter is not merged (nothing is changed then).
    ValueError
        If the model has no adapters.
    """
    layers = _require_adapters(model)
    unmerged = [name for name, layer in layers.items() if not layer.merged]
    if unmerged:
        raise RuntimeError(f"adapters not merged: {unmerged}; call merge() first")
    for layer in layers.values():
        layer.unmerge()
    return model


def _require_adapters(model: nn.Module) -> dict[str, TuckerDelta]:
    layers = adapted_layers(model)
    if not layers:
        raise ValueError("the model has no FLoRA adapters; call flora.inject first")
    return layers


def unload(model: nn.Module, *, merge: bool = True) -> nn.Module:
    """Remove every adapter; the model is made of plain torch modules again.

    Parameters
    ----------
    model : torch.nn.Module
        A model with adapters.
    merge : bool, optional
        Keep the adapters' effect in the weights (``W0 + ΔW``). With
        ``False`` the original modules come back with their original
        weights: bitwise for ``init="zero_core"``/``"gaussian"`` adapters
        that were never merged, to rounding after a merge/unmerge cycle or
        for ``"hosvd"`` (whose base held ``W0 - ΔW_init``).

    Returns
    -------
    torch.nn.Module
        ``model``. Base parameters stay frozen (``requires_grad=False``).

    Raises
    ------
    ValueError
        If the model has no adapters.

    Examples
    --------
    >>> import torch
    >>> import flora
    >>> linear = torch.nn.Linear(4, 4)
    >>> model = flora.inject(torch.nn.Sequential(linear), flora.FLoRAConfig(ranks=2))
    >>> flora.unload(model, merge=False)[0] is linear
    True
    """
    for name, layer in _require_adapters(model).items():
        if merge:
            if not layer.merged:
                layer.merge()
        else:
            layer.restore_base()
        if isinstance(layer, TuckerParametrization):
            parametrize.remove_parametrizations(
                layer.base_layer, layer.parameter_name, leave_parametrized=False
            )
        else:
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name), child, layer.base_layer)
    return model


def trainable_parameters(model: nn.Module) -> int:
    """Number of entries of the parameters that require gradients.

    After :func:`inject` these are exactly the adapters' cores and factors,
    ``sum(prod(R) + sum(I_n R_n))`` over the adapted layers.

    Parameters
    ----------
    model : torch.nn.Module
        Any model.

    Returns
    -------
    int
        Each shared parameter counted once.

    Examples
    --------
    >>> import torch
    >>> import flora
    >>> model = torch.nn.Sequential(torch.nn.Linear(10, 6))
    >>> model = flora.inject(model, flora.FLoRAConfig(ranks=2))
    >>> flora.trainable_parameters(model)  # 2*2 + 6*2 + 10*2
    36
    """
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
