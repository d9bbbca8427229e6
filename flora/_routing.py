"""Per-sample adapter routing: ``model(..., adapter_names=[...])``, PEFT's mixed batches.

A model that holds adapters gets two hooks on its root module (installed by
:func:`install_routing` when the first adapter is attached, removed by
:func:`release_routing` with the last): a forward pre-hook that takes the
``adapter_names`` keyword out of the call, checks it and hands a
:class:`~flora.layers._route.Route` to every FLoRA layer and saved module,
and a forward hook, run even when the forward raises, that takes it back.
The routes are kept per thread on the modules themselves: no global state,
and two threads can run the same model, routed or not.

A Hugging Face model's ``generate`` refuses keywords its forward does not
name, so models that have one also get a ``generate`` that takes
``adapter_names`` out and routes every forward of that generation with it.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from flora.layers import AdaptedWeight, FLoRALayer, ModulesToSave
from flora.layers._route import BASE, Route

__all__ = ["install_routing", "release_routing"]

_KEYWORD = "adapter_names"
_ROUTED = "_flora_routed"
_GENERATING = "_flora_generating"


class _RoutedGenerate:
    """Stands in for a Hugging Face model's ``generate``: takes ``adapter_names`` out of it.

    The names hold for every forward of the generation (the pre-hook reads
    them for this thread); a forward called with its own ``adapter_names``
    uses those.
    """

    def __init__(self, model: nn.Module):
        self.model = model

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        names = kwargs.pop(_KEYWORD, None)
        if names is None:
            return type(self.model).generate(self.model, *args, **kwargs)
        generating = self.model.__dict__[_GENERATING]
        thread = threading.get_ident()
        generating[thread] = names
        try:
            return type(self.model).generate(self.model, *args, **kwargs)
        finally:
            del generating[thread]


def _batch_size(args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> int:
    """The leading dimension of the first tensor argument (``input_ids`` first among keywords)."""
    keywords = [kwargs[k] for k in ("input_ids", "inputs_embeds") if k in kwargs]
    for value in [*args, *keywords, *kwargs.values()]:
        if isinstance(value, torch.Tensor) and value.ndim > 0:
            return value.shape[0]
    raise ValueError(
        "adapter_names routes samples of a batch, but the call has no tensor argument "
        "whose first dimension is the batch"
    )


def _check_names(model: nn.Module, names: object, batch: int) -> tuple[str, ...]:
    if isinstance(names, (str, bytes)) or not isinstance(names, Sequence):
        raise TypeError(
            f"adapter_names must be a list with one adapter name per sample, got {names!r}"
        )
    if not all(isinstance(n, str) for n in names):
        raise TypeError(f"adapter_names must hold strings, got {list(names)!r}")
    known: dict[str, None] = {}
    for module in model.modules():
        if isinstance(module, (AdaptedWeight, ModulesToSave)):
            known.update(
                dict.fromkeys(
                    module.adapters if isinstance(module, AdaptedWeight) else module.copies
                )
            )
    known = list(known)
    unknown = sorted({n for n in names if n != BASE and n not in known})
    if unknown:
        raise ValueError(
            f"adapter_names holds unknown adapters {unknown}; the model has {known} "
            f"(and {BASE!r} for the base model)"
        )
    if len(names) != batch:
        raise ValueError(
            f"adapter_names has {len(names)} entries for a batch of {batch}: give one "
            "adapter name per sample"
        )
    return tuple(names)


def _targets(model: nn.Module) -> dict[str, FLoRALayer | ModulesToSave]:
    """The modules a route goes to, after checking the model can route at all."""
    targets: dict[str, FLoRALayer | ModulesToSave] = {}
    for name, host in model.named_modules():
        if isinstance(host, ModulesToSave):
            targets[name] = host
            continue
        if not isinstance(host, AdaptedWeight):
            continue
        if not isinstance(host, FLoRALayer):
            owner = name.rpartition("parametrizations.")[0].rstrip(".")
            parameter = f"{owner}.{host.parameter_name}" if owner else host.parameter_name
            raise ValueError(
                f"parameter {parameter!r} is adapted through target_parameters, whose weight "
                "is shared by the whole batch: per-sample routing (adapter_names) works with "
                "FLoRA layers and modules_to_save only"
            )
        if host.merged:
            raise RuntimeError(
                f"layer {name!r} has merged adapters {list(host.merged_adapters)}; per-sample "
                "routing (adapter_names) needs unmerged adapters: call flora.unmerge(model) "
                "first"
            )
        targets[name] = host
    if any(module.disabled for module in targets.values()):
        raise RuntimeError(
            "the model's adapters are disabled; per-sample routing (adapter_names) runs "
            "outside disable_adapter() only (route to '__base__' instead)"
        )
    return targets


def _check_not_checkpointing(model: nn.Module) -> None:
    """Refuse a routed training forward under Hugging Face gradient checkpointing.

    The backward pass recomputes checkpointed activations after the forward
    has taken its routes back, so they would run the active adapters and
    give every sample wrong gradients.
    """
    if not (torch.is_grad_enabled() and model.training):
        return
    if any(getattr(module, "gradient_checkpointing", False) is True for module in model.modules()):
        raise ValueError(
            "per-sample routing (adapter_names) cannot train with gradient checkpointing: the "
            "backward recomputes activations without the routes; call "
            "model.gradient_checkpointing_disable(), or route in eval mode or under "
            "torch.no_grad()"
        )


def _route(
    model: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> tuple[tuple[Any, ...], dict[str, Any]] | None:
    """Forward pre-hook: consume ``adapter_names`` and give the modules their route."""
    generating = model.__dict__[_GENERATING]
    if _KEYWORD not in kwargs and not generating:
        return None
    kwargs = dict(kwargs)
    names = kwargs.pop(_KEYWORD, None)
    if names is None and generating:
        names = generating.get(threading.get_ident())
    if names is None:
        return args, kwargs
    names = _check_names(model, names, _batch_size(args, kwargs))
    _check_not_checkpointing(model)
    targets = _targets(model)
    thread = threading.get_ident()
    routed = model.__dict__[_ROUTED]
    if thread in routed:
        raise RuntimeError(
            "the model is already running a forward routed by adapter_names in this thread; "
            "a routed forward cannot call the model again"
        )
    route = Route.from_names(names)
    for name, module in targets.items():
        module._routes[thread] = (route, name)
    routed[thread] = list(targets.values())
    return args, kwargs


def _unroute(model: nn.Module, args: tuple[Any, ...], output: Any) -> None:
    """Forward hook (run even when the forward raised): take this thread's route back."""
    routed = model.__dict__.get(_ROUTED)
    if not routed:
        return
    thread = threading.get_ident()
    for module in routed.pop(thread, ()):
        module._routes.pop(thread, None)


def _installed(model: nn.Module) -> bool:
    return any(hook is _route for hook in model._forward_pre_hooks.values())


def install_routing(model: nn.Module) -> None:
    """Let ``model(..., adapter_names=[...])`` route per sample (once per model)."""
    if _installed(model):
        return
    model.__dict__[_ROUTED] = {}
    model.__dict__[_GENERATING] = {}
    model.register_forward_pre_hook(_route, with_kwargs=True)
    model.register_forward_hook(_unroute, always_call=True)
    if callable(getattr(type(model), "generate", None)):
        model.generate = _RoutedGenerate(model)


def release_routing(model: nn.Module) -> None:
    """Take :func:`install_routing`'s hooks off a model that has no adapter left."""
    held = any(isinstance(m, (AdaptedWeight, ModulesToSave)) for m in model.modules())
    if held or not _installed(model):
        return
    for hooks, extra, hook in (
        (model._forward_pre_hooks, model._forward_pre_hooks_with_kwargs, _route),
        (model._forward_hooks, model._forward_hooks_always_called, _unroute),
    ):
        for key in [k for k, h in hooks.items() if h is hook]:
            del hooks[key]
            extra.pop(key, None)
    for attribute in (_ROUTED, _GENERATING):
        model.__dict__.pop(attribute, None)
    if isinstance(model.__dict__.get("generate"), _RoutedGenerate):
        del model.__dict__["generate"]
