"""Which modules and parameters of a model a config targets, and which it saves whole.

Names match by the rules of :mod:`flora._match`; ``"all-linear"`` is every
Linear but the output layer, as PEFT defines it; no targets at all means
PEFT's default targets for the model's architecture
(:data:`flora.DEFAULT_TARGET_MODULES`). :func:`flora.inject` builds its
sites here.
"""

from __future__ import annotations

from torch import nn
from torch.nn.utils import parametrize

from flora._apply import Site, resolve
from flora._match import check_each_entry_matches, inside, matches, name_matches
from flora.config import ALL_LINEAR, DEFAULT_TARGET_MODULES, FLoRAConfig
from flora.kinds import kind_of_module, registered_kinds
from flora.layers import AdaptedWeight, FLoRALayer, ModulesToSave

__all__ = [
    "check_rank_pattern",
    "module_kind",
    "module_sites",
    "parameter_sites",
    "saved_names",
]


def saved_names(modules: dict[str, nn.Module], config: FLoRAConfig) -> list[str]:
    if config.modules_to_save is None:
        return []
    names = [n for n in modules if n]
    check_each_entry_matches(config.modules_to_save, names, "modules_to_save")
    matched = [n for n in names if matches(n, config.modules_to_save)]
    outermost = [n for n in matched if not any(n.startswith(m + ".") for m in matched)]
    for name in outermost:
        module = modules[name]
        inner = [m for m in module.modules() if isinstance(m, AdaptedWeight)]
        if isinstance(module, AdaptedWeight) or inner or parametrize.is_parametrized(module):
            raise ValueError(
                f"modules_to_save entry {name!r} holds FLoRA adapters or parametrizations; "
                "a module is either adapted or saved whole"
            )
    return outermost


def module_kind(module: nn.Module) -> str | None:
    if isinstance(module, FLoRALayer):
        return module.kind
    kind = kind_of_module(module)
    return None if kind is None else kind.saved_kind


def _output_layer(model: nn.Module) -> nn.Module | None:
    """A Hugging Face model's output layer: output embeddings, else a classification head."""
    output_embeddings = getattr(model, "get_output_embeddings", None)
    if not callable(output_embeddings):
        return None
    head = output_embeddings()
    if head is None:
        # PEFT's SEQ_CLS_HEAD_NAMES.
        heads = [getattr(model, name, None) for name in ("score", "classifier")]
        head = next((h for h in heads if isinstance(h, nn.Module)), None)
    return head


def _all_linear_kind(module: nn.Module) -> bool:
    base = module.base_layer if isinstance(module, FLoRALayer) else module
    kind = kind_of_module(base)
    return kind is not None and kind.all_linear


def _all_linear(model: nn.Module, modules: dict[str, nn.Module], saved: list[str]) -> list[str]:
    """Every Linear (and Conv1D) of ``model`` outside ``saved`` but its output layer (PEFT's)."""
    head = _output_layer(model)
    return [
        name
        for name, module in modules.items()
        if name and module is not head and _all_linear_kind(module) and not inside(name, saved)
    ]


def _default_targets(model: nn.Module) -> list[str] | str:
    """PEFT's default targets for the model's architecture (``target_modules=None``)."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type in DEFAULT_TARGET_MODULES:
        return DEFAULT_TARGET_MODULES[model_type]
    what = f"model type {model_type!r}" if model_type else f"a {type(model).__name__}"
    raise ValueError(
        f"target_modules is not given and flora has no default targets for {what} "
        "(flora.DEFAULT_TARGET_MODULES lists those of PEFT); name them, e.g. "
        'target_modules="all-linear" or target_modules=["query", "value"]'
    )


def module_sites(
    model: nn.Module, modules: dict[str, nn.Module], config: FLoRAConfig, saved: list[str]
) -> list[Site]:
    names = [n for n in modules if n]
    spec = config.target_modules
    if isinstance(spec, str) and spec.lower() == ALL_LINEAR:
        linear = set(_all_linear(model, modules, saved))
        targets = [n for n in names if n in linear]
    elif spec is None:
        if config.target_parameters is not None:
            return []
        default = _default_targets(model)
        targets = [n for n in names if matches(n, default)]
    else:
        check_each_entry_matches(spec, names, "target_modules")
        targets = [n for n in names if matches(n, spec)]
    sites = []
    for name in targets:
        module = modules[name]
        if matches(name, config.exclude_modules):
            continue
        if inside(name, saved):
            raise ValueError(f"module {name!r} is a target and in modules_to_save; pick one")
        kind = module_kind(module)
        if kind is None:
            supported = ", ".join(dict.fromkeys(k.saved_kind for k in registered_kinds()))
            raise TypeError(
                f"module {name!r} is a {type(module).__name__}, which inject cannot adapt "
                f"(supported: {supported}; use target_parameters for other weights)"
            )
        parameters = None if isinstance(module, FLoRALayer) else kind_of_module(module).parameters
        if parameters is None:
            sites.append(resolve(modules, name, kind))
        else:  # a module whose forward reads its weights: adapt them in place
            sites += [resolve(modules, f"{name}.{p}", kind) for p in parameters(module)]
    return sites


def parameter_sites(
    modules: dict[str, nn.Module], config: FLoRAConfig, saved: list[str]
) -> list[Site]:
    if config.target_parameters is None:
        return []
    full = []
    for module_name, module in modules.items():
        if isinstance(module, (FLoRALayer, ModulesToSave)):
            continue
        names = [n for n, _ in module.named_parameters(recurse=False)]
        if parametrize.is_parametrized(module):
            names += list(module.parametrizations.keys())
        full += [(module_name, f"{module_name}.{p}" if module_name else p) for p in names]
    check_each_entry_matches(config.target_parameters, [n for _, n in full], "target_parameters")
    sites = []
    for module_name, name in full:
        if not matches(name, config.target_parameters):
            continue
        if matches(name, config.exclude_modules) or matches(module_name, config.exclude_modules):
            continue
        if inside(module_name, saved):
            raise ValueError(f"parameter {name!r} is a target and in modules_to_save; pick one")
        sites.append(resolve(modules, name, "Parameter"))
    return sites


def check_rank_pattern(config: FLoRAConfig, names: list[str]) -> None:
    for key in config.rank_pattern:
        if not any(name_matches(name, key) for name in names):
            raise ValueError(
                f"rank_pattern key {key!r} matches no adapted layer "
                f"(they are {names[:5]}{' ...' if len(names) > 5 else ''})"
            )
