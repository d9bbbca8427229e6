"""Model-level FLoRA: put adapters into a model, merge them, take them out again."""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping

import torch
from torch import nn

from flora._apply import (
    Addition,
    SavedCopy,
    Site,
    apply,
    check_enabled,
    check_sites,
    drop_host,
    find_adapted,
    find_saved,
    replace_module,
    resolve,
    saved_copy,
    walk,
)
from flora._args import check_flag, check_model, check_names
from flora._hf import release_save_pretrained
from flora._routing import release_routing
from flora._targets import (
    check_rank_pattern,
    module_sites,
    parameter_sites,
    saved_names,
)
from flora.config import FLoRAConfig
from flora.layers import AdaptedWeight, FLoRALayer, ModulesToSave, TuckerDelta
from flora.layers.base import adapter_dtype, check_adapter_name
from flora.layers.bnb import refuse_dense_state, refuse_unquantizable
from tuckerlib.io.layer_kinds import kind_rule

__all__ = [
    "adapted_layers",
    "attach_adapter",
    "inject",
    "merge",
    "merged_state_dict",
    "trainable_parameters",
    "unload",
    "unmerge",
]


def adapted_layers(model: nn.Module) -> dict[str, AdaptedWeight]:
    """Every adapted weight of ``model``, by name.

    Parameters
    ----------
    model : torch.nn.Module
        A model with adapters.

    Returns
    -------
    dict of str to AdaptedWeight
        FLoRA layers (:class:`flora.FLoRALayer`) under their module's name;
        parameter adapters (:class:`flora.TuckerParametrization`) under
        ``"module.parameter"``. Each holds its named adapters in
        ``adapters`` (name to :class:`flora.TuckerDelta`).

    Examples
    --------
    >>> import torch
    >>> import flora
    >>> model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
    >>> _ = flora.inject(model, flora.FLoRAConfig(ranks=2, target_modules="all-linear"))
    >>> {name: layer.adapter_names for name, layer in flora.adapted_layers(model).items()}
    {'0': ('default',), '2': ('default',)}
    """
    return find_adapted(check_model(model))


def _create(site: Site, config: FLoRAConfig) -> TuckerDelta:
    has_bias = site.parameter is None and getattr(site.module, "bias", None) is not None
    _refuse_bias(site.name, site.kind, config.bias)
    spec = config.spec_for(site.kind, tuple(site.weight.shape), site.name, has_bias=has_bias)
    try:
        adapter = TuckerDelta.create(spec, site.weight)
    except (ValueError, TypeError) as exc:
        raise type(exc)(f"layer {site.name!r}: {exc}") from None
    adapter.config = config
    return adapter


def _refuse_bias(name: str, kind: str, bias: bool) -> None:
    """Refuse ``bias=True`` for a module whose biases an adapter of its kind cannot update.

    A kind that adapts named parameters of a module with biases of its own
    (``MultiheadAttention``) would otherwise leave them silently unchanged.
    """
    if bias and kind != "Parameter" and kind_rule(kind).on_parameters:
        raise ValueError(
            f"layer {name!r}: bias=True asks for bias updates, which a {kind} adapter cannot "
            "carry (PEFT's "
            "LoRA refuses lora_bias there too); use bias=False, or leave this module out "
            "(exclude_modules) or give it an adapter of its own"
        )


def inject(model: nn.Module, config: FLoRAConfig, *, adapter_name: str = "default") -> nn.Module:
    """Add a FLoRA adapter to ``model`` in place and freeze everything else.

    Matching modules are replaced by FLoRA layers that wrap them (modules
    already adapted get a further adapter), matching parameters get a
    :class:`flora.TuckerParametrization`, and each ``modules_to_save``
    module gets a trainable copy for this adapter.

    Parameters
    ----------
    model : torch.nn.Module
        The model.
    config : FLoRAConfig
        Targets, ranks, scale, dropout, init, forward mode, modules to save.
    adapter_name : str, optional
        The adapter's name, new to the model. The first adapter of a model
        is active; further ones are added inactive (and frozen) until
        :func:`flora.set_adapter` names them, as with PEFT's ``add_adapter``.

    Returns
    -------
    torch.nn.Module
        ``model`` itself. Only the active adapters' parameters (and their
        saved modules) require gradients afterwards.

    Raises
    ------
    ValueError
        If a ``target_modules``/``target_parameters``/``modules_to_save``
        entry or a ``rank_pattern`` key matches nothing, no module matches
        at all, the adapter name is taken, two targets share a weight (tied
        weights), ``init="hosvd"`` meets a non-finite weight, or ranks do
        not fit a layer. Nothing is changed in that case.
    TypeError
        If ``model`` is not a module, ``config`` is not a
        :class:`flora.FLoRAConfig`, or a target module is of a kind FLoRA
        cannot adapt (no registered kind: :func:`flora.register_layer_kind`).
    RuntimeError
        Inside :func:`flora.disable_adapter`.

    See Also
    --------
    unload : Take the adapters out again.
    flora.load_adapter : Add a saved adapter.
    flora.set_adapter : Switch between named adapters.

    Notes
    -----
    A Hugging Face model (one with ``save_pretrained``) saves as a PEFT
    model does while it holds adapters: ``model.save_pretrained(directory)``
    writes the active adapter (what :func:`flora.load_adapter` reads) and
    the training state ``transformers.Trainer`` resumes from, not the base
    weights; a full checkpoint takes
    ``state_dict=flora.merged_state_dict(model)``, and a state dict in the
    adapted layout, which ``from_pretrained`` would misread, is refused.
    See :doc:`/training_with_trainer`.

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
    check_model(model)
    if not isinstance(config, FLoRAConfig):
        raise TypeError(f"config must be a FLoRAConfig, got {type(config).__name__}")
    check_adapter_name(adapter_name)
    check_enabled(model)
    modules = dict(walk(model))
    saved = saved_names(modules, config)
    sites = module_sites(model, modules, config, saved) + parameter_sites(modules, config, saved)
    if not sites:
        raise ValueError("the config matches no module or parameter of the model")
    check_rank_pattern(config, [site.name for site in sites])
    check_sites(model, sites, adapter_name)
    additions = [Addition(site, _create(site, config)) for site in sites]
    copies = []
    for name in saved:
        module = modules[name]
        original = module.original_module if isinstance(module, ModulesToSave) else module
        copies.append(SavedCopy(name, module, copy.deepcopy(original)))
    apply(model, adapter_name, additions, copies)
    return model


def attach_adapter(
    model: nn.Module,
    adapter_name: str,
    adapters: Mapping[str, TuckerDelta],
    *,
    modules_to_save: Mapping[str, Mapping[str, torch.Tensor]] | None = None,
    trainable: bool = True,
) -> nn.Module:
    """Add adapter ``adapter_name`` made of ready :class:`flora.TuckerDelta` objects.

    The building block of :func:`flora.load_adapter`, for adapters computed
    elsewhere (converted from another format, say): every layer is found,
    checked and the whole adapter attached, or nothing changes.

    Parameters
    ----------
    model : torch.nn.Module
        The model, with or without other adapters.
    adapter_name : str
        A name new to the model. The first adapter of a model is active;
        further ones are added inactive.
    adapters : dict of str to TuckerDelta
        Layer name (a module, or ``"module.parameter"`` for kind
        ``"Parameter"``) to its adapter (see :meth:`flora.TuckerDelta.from_tucker`),
        whose spec must match the layer's kind and weight shape. The
        adapters are moved to their weight's device and adapter dtype
        (float32 for half-precision weights) and then owned by the model.
    modules_to_save : dict of str to dict, optional
        Module name to the ``state_dict`` of this adapter's copy of it.
    trainable : bool, optional
        Whether the adapter and its saved modules require gradients while
        active.

    Returns
    -------
    torch.nn.Module
        ``model``, base frozen.

    Raises
    ------
    ValueError
        If a layer or module is missing, of another kind or shape, shares
        its weight with another module, is a meta tensor, lacks the bias an
        adapter's bias update needs, the name is taken, or a saved module's
        state does not match (nothing changes then).
    TypeError
        If an argument has the wrong type.
    RuntimeError
        Inside :func:`flora.disable_adapter`.

    Examples
    --------
    >>> import torch
    >>> import flora
    >>> model = torch.nn.Sequential(torch.nn.Linear(5, 4))
    >>> b, a = torch.randn(4, 2), torch.randn(2, 5)
    >>> delta = flora.TuckerDelta.from_tucker("Linear", torch.eye(2), [b, a.T])
    >>> _ = flora.attach_adapter(model, "imported", {"0": delta})
    >>> torch.allclose(model[0].delta_weight(), b @ a, atol=1e-6)
    True
    """
    check_model(model)
    check_adapter_name(adapter_name)
    check_flag(trainable, "trainable")
    if not isinstance(adapters, Mapping) or not all(
        isinstance(a, TuckerDelta) for a in adapters.values()
    ):
        raise TypeError("adapters must be a dict from layer name to flora.TuckerDelta")
    check_enabled(model)
    modules = dict(walk(model))
    sites = []
    for name, adapter in adapters.items():
        site = resolve(modules, name, adapter.spec.kind)
        if tuple(site.weight.shape) != adapter.spec.shape:
            raise ValueError(
                f"layer {name!r}: the adapter is for shape {list(adapter.spec.shape)}, the "
                f"model's weight has shape {list(site.weight.shape)}"
            )
        if site.weight.is_meta:
            raise ValueError(
                f"layer {name!r}: the model's weight is a meta tensor (a shape without "
                "values); load the base weights before the adapter"
            )
        if adapter.spec.bias and getattr(site.module, "bias", None) is None:
            raise ValueError(
                f"layer {name!r}: the adapter carries a bias update, but the model's "
                f"{site.kind} has no bias"
            )
        sites.append(site)
    if not sites:
        raise ValueError("an adapter needs at least one layer")
    check_sites(model, sites, adapter_name)
    states = dict(modules_to_save or {})
    copies = [saved_copy(modules, name, state) for name, state in states.items()]
    additions = []
    for site, adapter in zip(sites, adapters.values(), strict=True):
        adapter.to(device=site.weight.device, dtype=adapter_dtype(site.weight.dtype))
        adapter.trainable = trainable
        additions.append(Addition(site, adapter))
    apply(model, adapter_name, additions, copies, trainable=trainable)
    return model


def _require_adapters(model: nn.Module) -> dict[str, AdaptedWeight]:
    layers = find_adapted(check_model(model))
    if not layers:
        raise ValueError("the model has no FLoRA adapters; call flora.inject first")
    check_enabled(model)
    return layers


def _named(error: Exception, name: str) -> Exception:
    return type(error)(f"layer {name!r}: {error}")


def merge(
    model: nn.Module, *, adapter_names: list[str] | None = None, safe: bool = True
) -> nn.Module:
    r"""Add the active (or named) adapters into the base weights: :math:`W \leftarrow W + \Delta W`.

    Merged layers run only their base op for those adapters; outputs equal
    the unmerged model's to rounding. :math:`\Delta W` is computed in the adapter's
    precision (float32 for half-precision bases) and cast once.

    Parameters
    ----------
    model : torch.nn.Module
        A model with adapters.
    adapter_names : list of str, optional
        The adapters to merge; default: the active ones.
    safe : bool, optional
        Check every merged weight for NaN and infinite values first and
        refuse, with all weights untouched, if one has any. ``False``
        merges whatever the adapters hold.

    Returns
    -------
    torch.nn.Module
        ``model``.

    Raises
    ------
    RuntimeError
        If a named adapter is already merged, or inside
        :func:`flora.disable_adapter` (nothing is merged then).
    ValueError
        If the model has no adapters, a name is unknown or repeated, a
        weight is a meta tensor, or (``safe``) a merged weight would not be
        finite; the message names the layer.
    TypeError
        If ``adapter_names`` is not a list of names or ``safe`` not a bool.

    Examples
    --------
    >>> import torch
    >>> import flora
    >>> config = flora.FLoRAConfig(ranks=2, target_modules="all-linear")
    >>> model = flora.inject(torch.nn.Sequential(torch.nn.Linear(4, 4)), config)
    >>> _ = flora.merge(model)
    >>> model[0].merged
    True
    >>> _ = flora.unmerge(model)
    """
    layers = _require_adapters(model)
    check_flag(safe, "safe")
    if adapter_names is not None:
        known = list(dict.fromkeys(n for layer in layers.values() for n in layer.adapters))
        adapter_names = list(check_names(adapter_names, "adapter_names", known))
    plan = {}
    for name, layer in layers.items():
        names = None if adapter_names is None else [n for n in adapter_names if n in layer.adapters]
        try:
            layer.check_merge(names, safe=safe)
        except (RuntimeError, ValueError) as exc:
            raise _named(exc, name) from None
        plan[name] = names
    for name, layer in layers.items():
        layer.merge(plan[name], safe=False)
    return model


def unmerge(model: nn.Module) -> nn.Module:
    r"""Subtract :math:`\Delta W` of every merged adapter from its base weight again.

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
        If no adapter is merged, or inside :func:`flora.disable_adapter`.
    ValueError
        If the model has no adapters.

    Examples
    --------
    >>> import torch
    >>> import flora
    >>> linear = torch.nn.Linear(4, 4)
    >>> weight = linear.weight.detach().clone()
    >>> config = flora.FLoRAConfig(ranks=2, target_modules=["0"])
    >>> model = flora.inject(torch.nn.Sequential(linear), config)
    >>> _ = flora.unmerge(flora.merge(model))
    >>> torch.equal(linear.weight, weight)  # the core is zero: nothing to round
    True
    """
    layers = _require_adapters(model)
    merged = [layer for layer in layers.values() if layer.merged]
    if not merged:
        raise RuntimeError("no adapter is merged; call merge() first")
    for layer in merged:
        layer.unmerge()
    return model


def unload(model: nn.Module, *, merge: bool = True) -> nn.Module:
    r"""Remove every adapter; the model is made of plain torch modules again.

    Parameters
    ----------
    model : torch.nn.Module
        A model with adapters.
    merge : bool, optional
        Keep what the model computes now: the active adapters' updates go
        into the weights, the other adapters are dropped, and each saved
        module (``modules_to_save``) is replaced by the active adapter's
        copy. With ``False`` the original modules come back with their
        original weights: bitwise for ``init="zero_core"``/``"gaussian"``
        adapters that were never merged, to rounding after a merge/unmerge
        cycle or for ``"hosvd"`` (whose base held :math:`W_0 - \Delta W_\text{init}`).

    Returns
    -------
    torch.nn.Module
        ``model``. Base parameters stay frozen (``requires_grad=False``).

    Raises
    ------
    ValueError
        If the model has no adapters, or (``merge=True``) a merged weight
        would hold NaN or infinite values or a weight is a meta tensor
        (nothing is changed then).
    TypeError
        If ``merge`` is not a bool.
    RuntimeError
        Inside :func:`flora.disable_adapter`.

    Examples
    --------
    >>> import torch
    >>> import flora
    >>> linear = torch.nn.Linear(4, 4)
    >>> config = flora.FLoRAConfig(ranks=2, target_modules=["0"])
    >>> model = flora.inject(torch.nn.Sequential(linear), config)
    >>> flora.unload(model, merge=False)[0] is linear
    True
    """
    layers = _require_adapters(model)
    if check_flag(merge, "merge"):
        for name, layer in layers.items():
            if layer.base_weight().is_meta:
                raise ValueError(
                    f"layer {name!r}: the weight is a meta tensor (a shape without values); "
                    "there is nothing to merge into (unload with merge=False, or load the "
                    "weights first)"
                )
            bias = layer.effective_bias()
            merged = [layer.effective_weight(), *([] if bias is None else [bias])]
            if not all(bool(torch.isfinite(t).all()) for t in merged):
                raise ValueError(f"layer {name!r}: the merged weight would hold NaN or inf")
            refuse_unquantizable(name, layer, merged[0])
    modules = dict(walk(model))
    for name, layer in layers.items():
        if merge:
            layer.merge_effective()
        else:
            layer.restore_base()
        drop_host(modules, name, layer)
    for name, wrapper in find_saved(model).items():
        replace_module(
            modules, name, wrapper.running_module() if merge else wrapper.original_module
        )
    release_save_pretrained(model)
    release_routing(model)
    return model


def merged_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    r"""The state dict of the plain model that computes what ``model`` computes now.

    Keys are those of the model without adapters (``"encoder.query.weight"``,
    not ``"encoder.query.base_layer.weight"``); adapted weights hold
    :math:`W + \sum \Delta W` of the running adapters, saved modules the running copy.
    ``model`` is not changed. This is what a Hugging Face ``save_pretrained``
    needs: ``model.save_pretrained(directory, state_dict=flora.merged_state_dict(model))``
    writes a checkpoint that ``from_pretrained`` loads as a plain model.

    Parameters
    ----------
    model : torch.nn.Module
        A model with or without adapters.

    Returns
    -------
    dict of str to torch.Tensor
        Detached tensors; adapted weights are new tensors, the rest are
        the model's own (as ``state_dict`` returns them).

    Raises
    ------
    ValueError
        If an adapted layer has a quantized (bitsandbytes) base, whose
        module does not load a dense weight: unload it instead.

    Examples
    --------
    >>> import torch
    >>> import flora
    >>> config = flora.FLoRAConfig(ranks=2, target_modules="all-linear")
    >>> model = flora.inject(torch.nn.Sequential(torch.nn.Linear(4, 3)), config)
    >>> with torch.no_grad():
    ...     _ = model[0].core.fill_(1.0)
    >>> plain = torch.nn.Sequential(torch.nn.Linear(4, 3))
    >>> plain.load_state_dict(flora.merged_state_dict(model))
    <All keys matched successfully>
    >>> x = torch.randn(2, 4)
    >>> torch.allclose(plain(x), model(x), atol=1e-6)
    True
    """
    rules: list[tuple[str, Callable[[str, torch.Tensor], tuple[str, torch.Tensor] | None]]] = []
    for name, layer in find_adapted(check_model(model)).items():
        refuse_dense_state(name, layer)
        rules.append(_weight_rule(name, layer))
    for name, wrapper in find_saved(model).items():
        running = wrapper.running_module()
        keep = next((f"copies.{n}." for n, m in wrapper.copies.items() if m is running), None)
        rules.append(_prefix_rule(f"{name}.", keep or "original_module."))
    rules.sort(key=lambda rule: len(rule[0]), reverse=True)
    state = {}
    for key, value in model.state_dict().items():
        rule = next((handle for prefix, handle in rules if key.startswith(prefix)), None)
        renamed = (key, value) if rule is None else rule(key, value)
        if renamed is not None:
            state[renamed[0]] = renamed[1]
    return state


Rule = Callable[[str, torch.Tensor], tuple[str, torch.Tensor] | None]


def _prefix_rule(prefix: str, keep: str) -> tuple[str, Rule]:
    """Keys under ``prefix + keep`` lose ``keep``; the rest of ``prefix`` is dropped."""

    def handle(key: str, value: torch.Tensor) -> tuple[str, torch.Tensor] | None:
        rest = key[len(prefix) :]
        return (prefix + rest[len(keep) :], value) if rest.startswith(keep) else None

    return prefix, handle


def _weight_rule(name: str, layer: AdaptedWeight) -> tuple[str, Rule]:
    """A FLoRA layer's base module keys, or a parametrized tensor, with the merged weight."""
    if isinstance(layer, FLoRALayer):
        prefix, keep = (f"{name}." if name else ""), "base_layer."
        weight_key = f"{prefix}weight"
    else:
        owner = name.rpartition(".")[0]
        prefix = f"{owner}.parametrizations." if owner else "parametrizations."
        prefix, keep, weight_key = f"{prefix}{layer.parameter_name}.", "original", name
    _, rename = _prefix_rule(prefix, keep)

    bias_key = f"{prefix}bias"

    def handle(key: str, value: torch.Tensor) -> tuple[str, torch.Tensor] | None:
        renamed = rename(key, value)
        if renamed is not None and isinstance(layer, FLoRALayer) and renamed[0] == bias_key:
            return bias_key, layer.effective_bias()
        if renamed is None or (isinstance(layer, FLoRALayer) and renamed[0] != weight_key):
            return renamed
        weight = layer.effective_weight()
        if kind_rule(layer.kind).transposed:  # stored (in, out), as the base module saves it
            weight = weight.T.contiguous()
        return weight_key, weight

    return prefix, handle


def trainable_parameters(model: nn.Module) -> int:
    r"""Number of entries of the parameters that require gradients.

    After :func:`inject` these are exactly the active adapters' cores and
    factors (and their saved modules), :math:`\sum \bigl(\prod_n R_n + \sum_n I_n R_n\bigr)` over
    the adapted layers.

    Parameters
    ----------
    model : torch.nn.Module
        Any model.

    Returns
    -------
    int
        Each shared parameter counted once.

    Raises
    ------
    TypeError
        If ``model`` is not a ``torch.nn.Module``.

    See Also
    --------
    flora.summary : A per-layer table ending with PEFT's parameter line.

    Examples
    --------
    >>> import torch
    >>> import flora
    >>> model = torch.nn.Sequential(torch.nn.Linear(10, 6))
    >>> model = flora.inject(model, flora.FLoRAConfig(ranks=2, target_modules="all-linear"))
    >>> flora.trainable_parameters(model)  # 2*2 + 6*2 + 10*2
    36
    """
    return sum(p.numel() for p in check_model(model).parameters() if p.requires_grad)
