"""Finding adapted weights in a model and changing the model in two phases.

Every operation that changes a model first builds a plan (which weights get
which new :class:`flora.TuckerDelta`, which modules get a saved copy),
validating and computing everything that can fail, and only then applies it
with steps that cannot fail halfway (module swaps, in-place updates of
weights already checked). :func:`flora.inject`, :func:`flora.load_adapter`
and :func:`flora.add_weighted_adapter` share :func:`resolve`,
:func:`check_sites` and :func:`apply`.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.utils import parametrize

from flora._hf import guard_save_pretrained
from flora._routing import install_routing
from flora.kinds import kind_of_module, layer_kind, record_of
from flora.layers import (
    AdaptedWeight,
    FLoRALayer,
    ModulesToSave,
    TuckerDelta,
    TuckerParametrization,
)
from flora.layers.bnb import refuse_initial_update
from tuckerlib.io.flora_format import check_layer_name
from tuckerlib.io.layer_kinds import by_parameter

__all__ = [
    "Addition",
    "SavedCopy",
    "Site",
    "adapter_names",
    "apply",
    "check_enabled",
    "check_layer_name",
    "check_sites",
    "current_active",
    "drop_host",
    "find_adapted",
    "find_saved",
    "refresh_requires_grad",
    "replace_module",
    "resolve",
    "saved_copy",
    "walk",
]


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def walk(module: nn.Module, prefix: str = "") -> Iterator[tuple[str, nn.Module]]:
    """``named_modules`` that does not enter FLoRA layers, saved modules or parametrizations."""
    yield prefix, module
    if isinstance(module, (FLoRALayer, ModulesToSave)):
        return
    for name, child in module.named_children():
        if name == "parametrizations" and parametrize.is_parametrized(module):
            continue
        yield from walk(child, _join(prefix, name))


def _parametrization(module: nn.Module, parameter: str) -> TuckerParametrization | None:
    if not parametrize.is_parametrized(module, parameter):
        return None
    for item in module.parametrizations[parameter]:
        if isinstance(item, TuckerParametrization):
            return item
    return None


def find_adapted(model: nn.Module) -> dict[str, AdaptedWeight]:
    """Every adapted weight of ``model``: layers by module name, parameters by full name."""
    found: dict[str, AdaptedWeight] = {}
    for name, module in walk(model):
        if isinstance(module, FLoRALayer):
            found[name] = module
        elif parametrize.is_parametrized(module):
            for parameter in module.parametrizations:
                item = _parametrization(module, parameter)
                if item is not None:
                    found[_join(name, parameter)] = item
    return found


def find_saved(model: nn.Module) -> dict[str, ModulesToSave]:
    """Every :class:`flora.layers.saved.ModulesToSave` wrapper of ``model``, by name."""
    return {name: m for name, m in walk(model) if isinstance(m, ModulesToSave)}


def adapter_names(model: nn.Module) -> list[str]:
    """Adapter names in ``model``, in the order they first appear."""
    names: dict[str, None] = {}
    for host in find_adapted(model).values():
        names.update(dict.fromkeys(host.adapters))
    for wrapper in find_saved(model).values():
        names.update(dict.fromkeys(wrapper.copies))
    return list(names)


def current_active(model: nn.Module) -> tuple[str, ...]:
    """The active adapters (every adapted weight holds the same list); () without adapters."""
    for host in find_adapted(model).values():
        return host.active_adapters
    return ()


def check_enabled(model: nn.Module) -> None:
    """Refuse to change a model inside :func:`flora.disable_adapter`."""
    hosts = [*find_adapted(model).values(), *find_saved(model).values()]
    if any(h.disabled for h in hosts):
        raise RuntimeError("the model's adapters are disabled; leave disable_adapter() first")


@dataclass(frozen=True)
class Site:
    """A weight that gets an adapter: where it is and what already wraps it."""

    name: str
    kind: str
    module: nn.Module
    parameter: str | None
    host: AdaptedWeight | None
    #: The base weight as the update's map (a view of the stored one where they differ).
    weight: torch.Tensor
    #: The parameter that stores it, if not ``weight`` itself (for the tied-weight check).
    stored: torch.Tensor | None = None

    @property
    def parameter_names(self) -> tuple[str, ...]:
        """The names under which ``model.named_parameters`` lists this weight."""
        if self.parameter is None:
            inner = "base_layer.weight" if self.host is not None else "weight"
            return (_join(self.name, inner),)
        owner = self.name.rpartition(".")[0]
        return (self.name, _join(owner, f"parametrizations.{self.parameter}.original"))


def resolve(modules: dict[str, nn.Module], name: str, kind: str) -> Site:
    """The :class:`Site` of layer ``name`` of ``kind`` in a model whose :func:`walk` is ``modules``.

    Raises
    ------
    ValueError
        If the model has no such module or parameter, or it is of another
        kind, or it is parametrized by something else.
    """
    check_layer_name(name)
    if not by_parameter(kind):
        module = modules.get(name)
        if module is None:
            raise ValueError(f"layer {name!r}: the model has no module {name!r}")
        if isinstance(module, FLoRALayer):
            if module.kind != kind:
                raise ValueError(f"layer {name!r} is a FLoRA {module.kind}, not a {kind}")
            stored = getattr(module.base_layer, "weight", None)
            return Site(name, kind, module, None, module, module.base_weight(), stored)
        found = record_of(module, kind)
        if found is None:
            raise ValueError(
                f"layer {name!r}: expected a {layer_kind(kind).describe()}, the model has a "
                f"{type(module).__name__}"
            )
        stored = getattr(module, "weight", None)
        try:
            weight = found.read_weight(module)
        except ValueError as exc:  # a base the kind cannot read (yet), e.g. not quantized
            raise ValueError(f"layer {name!r}: {exc}") from None
        return Site(name, kind, module, None, None, weight, stored)
    owner_name, _, parameter = name.rpartition(".")
    owner = modules.get(owner_name)
    if owner is None or isinstance(owner, (FLoRALayer, ModulesToSave)):
        raise ValueError(f"layer {name!r}: the model has no parameter {name!r} to adapt")
    if parametrize.is_parametrized(owner, parameter):
        host = _parametrization(owner, parameter)
        if host is None:
            raise ValueError(
                f"parameter {name!r} already has a parametrization that is not FLoRA's"
            )
        _check_kind_parameter(modules, name, kind)
        return Site(name, kind, owner, parameter, host, host.base_weight())
    weight = getattr(owner, parameter, None)
    if not isinstance(weight, nn.Parameter):
        raise ValueError(f"layer {name!r}: the model has no parameter {name!r}")
    _check_kind_parameter(modules, name, kind)
    if weight.ndim == 0 or not weight.is_floating_point():
        raise ValueError(
            f"parameter {name!r} ({weight.dtype}, shape {tuple(weight.shape)}) cannot be "
            "adapted: FLoRA needs a floating-point tensor with at least one axis"
        )
    return Site(name, kind, owner, parameter, None, weight)


def _check_kind_parameter(modules: dict[str, nn.Module], name: str, kind: str) -> None:
    """Refuse parameter ``name`` for a kind that adapts named parameters of its modules only."""
    if kind == "Parameter":
        return
    record = layer_kind(kind)
    parts = name.split(".")
    for cut in range(len(parts) - 1, -1, -1):
        module = modules.get(".".join(parts[:cut]))
        if (
            module is not None
            and record.matches(module)
            and ".".join(parts[cut:]) in record.parameters(module)
        ):
            return
    raise ValueError(
        f"layer {name!r} is no weight that kind {kind} adapts: not a parameter its "
        f"{record.describe()} modules name (e.g. 'attn.in_proj_weight')"
    )


def check_sites(model: nn.Module, sites: Sequence[Site], adapter_name: str) -> None:
    """Refuse sites that clash: a taken name, tied weights, a parameter inside an adapted module.

    Raises
    ------
    ValueError
        Naming the layers involved.
    """
    if adapter_name in adapter_names(model):
        raise ValueError(
            f"the model already has an adapter {adapter_name!r}; pick another adapter_name "
            "or delete_adapter it first"
        )
    modules = {id(s.module): s.name for s in sites if s.parameter is None}
    for site in sites:
        if site.parameter is not None and id(site.module) in modules:
            raise ValueError(
                f"parameter {site.name!r} belongs to module {modules[id(site.module)]!r}, "
                "which is adapted too"
            )
    owners: dict[int, list[str]] = {}
    for pname, param in model.named_parameters(remove_duplicate=False):
        owners.setdefault(id(param), []).append(pname)
    for site in sites:
        stored = site.weight if site.stored is None else site.stored
        others = [n for n in owners.get(id(stored), []) if n not in site.parameter_names]
        if others:
            raise ValueError(
                f"the weight of {site.name!r} is shared with {others[0]!r} (tied weights): "
                "an adapter merged into it or initialized from it would change both; "
                "adapt neither or untie them"
            )


@dataclass(frozen=True)
class Addition:
    """A new adapter for a site."""

    site: Site
    adapter: TuckerDelta


@dataclass(frozen=True)
class SavedCopy:
    """A new copy of a whole module (``modules_to_save``) for the adapter."""

    name: str
    module: nn.Module
    copy: nn.Module


def saved_copy(
    modules: dict[str, nn.Module], name: str, state: Mapping[str, torch.Tensor]
) -> SavedCopy:
    """A copy of saved module ``name`` holding ``state``, checked against the model's module."""
    check_layer_name(name, "saved module")
    module = modules.get(name)
    if module is None or isinstance(module, AdaptedWeight):
        raise ValueError(f"saved module {name!r}: the model has no plain module {name!r}")
    original = module.original_module if isinstance(module, ModulesToSave) else module
    if any(isinstance(m, AdaptedWeight) for m in original.modules()):
        raise ValueError(f"saved module {name!r} holds FLoRA adapters in this model")
    expected = original.state_dict()
    mismatched = sorted(
        key
        for key in set(expected) | set(state)
        if key not in expected
        or key not in state
        or expected[key].shape != state[key].shape
        or expected[key].dtype != state[key].dtype
    )
    if mismatched:
        raise ValueError(
            f"saved module {name!r}: tensors {mismatched} do not match the model's module "
            "(missing, unexpected, or another shape or dtype)"
        )
    duplicate = copy.deepcopy(original)
    duplicate.load_state_dict(state, strict=True)
    return SavedCopy(name, module, duplicate)


def replace_module(modules: dict[str, nn.Module], name: str, new: nn.Module) -> None:
    """Put ``new`` where module ``name`` is, given the model's :func:`walk` as ``modules``."""
    parent, _, child = name.rpartition(".")
    setattr(modules[parent], child, new)


def drop_host(modules: dict[str, nn.Module], name: str, layer: AdaptedWeight) -> None:
    """Give ``layer``'s place back to its base module (or unparametrize its parameter)."""
    if isinstance(layer, FLoRALayer):
        replace_module(modules, name, layer.base_layer)
    else:
        parametrize.remove_parametrizations(
            layer.base_layer, layer.parameter_name, leave_parametrized=False
        )


def apply(
    model: nn.Module,
    adapter_name: str,
    additions: Sequence[Addition],
    copies: Sequence[SavedCopy] = (),
    *,
    trainable: bool = True,
) -> None:
    """Attach a planned adapter: wrap what is not wrapped yet, add, freeze the rest.

    The first adapter of a model becomes active; later ones are added
    inactive (as PEFT's ``add_adapter`` does).
    """
    for addition in additions:  # refused before anything changes
        site, init = addition.site, addition.adapter.spec.init
        refuse_initial_update(f"layer {site.name!r}", site.module, init)
    active = current_active(model) or (adapter_name,)
    modules = dict(walk(model))
    for addition in additions:
        site, host = addition.site, addition.site.host
        if host is None:
            if site.parameter is None:
                host = kind_of_module(site.module).layer(site.module, adapter_name=None)
                replace_module(modules, site.name, host)
            else:
                layer = (
                    TuckerParametrization
                    if site.kind == "Parameter"
                    else layer_kind(site.kind).layer
                )
                host = layer(site.module, site.parameter, adapter_name=None)
            host.active_adapters = active
        host.add_adapter(adapter_name, addition.adapter)
    for saved in copies:
        wrapper = saved.module
        if not isinstance(wrapper, ModulesToSave):
            wrapper = ModulesToSave(saved.module)
            wrapper.active_adapters = active
            replace_module(modules, saved.name, wrapper)
        wrapper.add_copy(adapter_name, saved.copy, trainable=trainable)
    refresh_requires_grad(model)
    guard_save_pretrained(model)
    install_routing(model)


def refresh_requires_grad(model: nn.Module) -> None:
    """Only the active, trainable adapters and saved copies require gradients."""
    keep: set[int] = set()
    for host in find_adapted(model).values():
        for name, adapter in host.adapters.items():
            if adapter.trainable and name in host.active_adapters:
                keep.update(id(p) for p in adapter.parameters())
    for wrapper in find_saved(model).values():
        for name, module in wrapper.copies.items():
            if wrapper.trainable[name] and name in wrapper.active_adapters:
                keep.update(id(p) for p in module.parameters())
    for param in model.parameters():
        param.requires_grad_(id(param) in keep)
