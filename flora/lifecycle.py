"""Named adapters: list, switch, disable, delete and combine them (PEFT's workflow).

A model can hold several adapters, each under a name, on the same layers or
on different ones (:func:`flora.inject` with ``adapter_name=``,
:func:`flora.load_adapter`). The active ones run; the others add nothing
and get no gradient.
"""

from __future__ import annotations

import copy
import math
import numbers
import warnings
from collections.abc import Iterable, Iterator, Mapping, Sequence, Set
from contextlib import contextmanager

import torch
from torch import nn

from flora._apply import (
    Addition,
    SavedCopy,
    apply,
    check_enabled,
    check_sites,
    drop_host,
    find_adapted,
    find_saved,
    replace_module,
    resolve,
    walk,
)
from flora._apply import adapter_names as _adapter_names
from flora._apply import current_active as _current_active
from flora._args import check_model, check_names
from flora._hf import release_save_pretrained
from flora._routing import release_routing
from flora._tucker import block_sum
from flora.config import FLoRAConfig
from flora.layers import AdaptedWeight, TuckerDelta
from flora.layers.base import check_adapter_name
from flora.spec import LayerSpec

__all__ = [
    "active_adapters",
    "adapter_names",
    "add_weighted_adapter",
    "delete_adapter",
    "disable_adapter",
    "set_adapter",
]


def adapter_names(model: nn.Module) -> list[str]:
    """Names of the adapters in ``model``, in the order they were added.

    Examples
    --------
    >>> import torch
    >>> import flora
    >>> model = torch.nn.Sequential(torch.nn.Linear(4, 4))
    >>> _ = flora.inject(model, flora.FLoRAConfig(ranks=2, target_modules=["0"]))
    >>> config = flora.FLoRAConfig(ranks=1, target_modules=["0"])
    >>> _ = flora.inject(model, config, adapter_name="small")
    >>> flora.adapter_names(model), flora.active_adapters(model)
    (['default', 'small'], ['default'])
    """
    return _adapter_names(check_model(model))


def active_adapters(model: nn.Module) -> list[str]:
    """Names of the active adapters of ``model`` (``[]`` without adapters).

    See Also
    --------
    set_adapter : Change them.

    Examples
    --------
    >>> import torch
    >>> import flora
    >>> config = flora.FLoRAConfig(ranks=2, target_modules="all-linear")
    >>> model = flora.inject(torch.nn.Sequential(torch.nn.Linear(4, 4)), config)
    >>> flora.active_adapters(model)
    ['default']
    """
    return list(_current_active(check_model(model)))


def set_adapter(model: nn.Module, names: str | Sequence[str]) -> nn.Module:
    """Make ``names`` the active adapters: they run, and they alone get gradients.

    Parameters
    ----------
    model : torch.nn.Module
        A model with adapters.
    names : str or list of str
        One or several adapter names; several active adapters add their
        updates. A layer lacking some of them runs the others.

    Returns
    -------
    torch.nn.Module
        ``model``. Active adapters that are trainable require gradients,
        all others do not (adapters loaded with ``trainable=False`` stay
        frozen).

    Raises
    ------
    ValueError
        If a name is unknown or repeated, the list is empty, or two of the
        names have a copy of the same saved module (one copy runs at a
        time).
    TypeError
        If ``model`` is not a module or ``names`` not a name or list of names.
    RuntimeError
        If an adapter is merged (unmerge first), or inside
        :func:`disable_adapter`. Nothing changes then.

    Examples
    --------
    >>> import torch
    >>> import flora
    >>> model = torch.nn.Sequential(torch.nn.Linear(4, 4))
    >>> config = flora.FLoRAConfig(ranks=2, target_modules=["0"])
    >>> _ = flora.inject(model, config, adapter_name="a")
    >>> _ = flora.inject(model, config, adapter_name="b")
    >>> _ = flora.set_adapter(model, "b")
    >>> model[0].adapters["a"].core.requires_grad, model[0].adapters["b"].core.requires_grad
    (False, True)
    """
    check_model(model)
    names = check_names(names, "names", _adapter_names(model))
    check_enabled(model)
    layers = find_adapted(model)
    merged = sorted({n for layer in layers.values() for n in layer.merged_adapters})
    if merged:
        raise RuntimeError(f"adapters {merged} are merged; unmerge() before switching adapters")
    saved = find_saved(model)
    for name, wrapper in saved.items():
        try:
            wrapper.active_name(names)
        except ValueError as exc:
            raise ValueError(f"saved module {name!r}: {exc}") from None
    for layer in layers.values():
        layer._set_active(names)
    for wrapper in saved.values():
        wrapper.set_adapter(names)
    return model


@contextmanager
def disable_adapter(model: nn.Module) -> Iterator[nn.Module]:
    """Run the base model: inside the ``with`` block no adapter acts.

    Adapted layers run their base module only and saved modules their
    original. Merged adapters are unmerged on entry and merged back on exit.
    The outputs are the base model's: bit for bit where no adapter was
    merged and none is ``init="hosvd"`` (whose base holds the residual, to
    which the layer adds the initial update back), else to rounding.

    Parameters
    ----------
    model : torch.nn.Module
        A model with adapters.

    Yields
    ------
    torch.nn.Module
        ``model``.

    Raises
    ------
    ValueError
        If the model has no adapters.

    Examples
    --------
    >>> import torch
    >>> import flora
    >>> base = torch.nn.Linear(4, 4)
    >>> config = flora.FLoRAConfig(ranks=2, target_modules=["0"])
    >>> model = flora.inject(torch.nn.Sequential(base), config)
    >>> with torch.no_grad():  # as if trained: ΔW != 0
    ...     _ = model[0].factors[0].fill_(1.0)
    >>> x = torch.randn(2, 4)
    >>> with flora.disable_adapter(model):
    ...     torch.equal(model(x), base(x))
    True
    >>> torch.equal(model(x), base(x))
    False
    """
    layers = find_adapted(check_model(model))
    if not layers:
        raise ValueError("the model has no FLoRA adapters; call flora.inject first")
    hosts = [*layers.values(), *find_saved(model).values()]
    previous = [host.disabled for host in hosts]
    merged = {name: list(layer.merged_adapters) for name, layer in layers.items()}
    for name, names in merged.items():
        if names:
            layers[name].unmerge()
    for host in hosts:
        host.disabled = True
    try:
        yield model
    finally:
        for host, state in zip(hosts, previous, strict=True):
            host.disabled = state
        for name, names in merged.items():
            if names:
                layers[name].merge(names, safe=False)


def delete_adapter(model: nn.Module, adapter_name: str) -> nn.Module:
    """Remove adapter ``adapter_name`` from every layer and saved module.

    A merged adapter is unmerged first, and an ``init="hosvd"`` adapter gives
    its initial update back to the base weight. A layer left without
    adapters becomes its plain module again (a parameter loses its
    parametrization). If the adapter was active, the remaining active ones
    stay active; if none remains, the first remaining adapter becomes
    active (with a warning), as in PEFT.

    Parameters
    ----------
    model : torch.nn.Module
        A model with adapters.
    adapter_name : str
        The adapter to delete.

    Returns
    -------
    torch.nn.Module
        ``model``.

    Raises
    ------
    ValueError
        If the model has no adapter of that name (nothing changes then).
    TypeError
        If ``adapter_name`` is not a string.
    RuntimeError
        Inside :func:`disable_adapter`.

    Examples
    --------
    >>> import torch
    >>> import flora
    >>> linear = torch.nn.Linear(4, 4)
    >>> config = flora.FLoRAConfig(ranks=2, target_modules=["0"])
    >>> model = flora.inject(torch.nn.Sequential(linear), config)
    >>> flora.delete_adapter(model, "default")[0] is linear
    True
    """
    check_model(model)
    if not isinstance(adapter_name, str):
        raise TypeError(f"adapter_name must be a str, got {adapter_name!r}")
    check_names(adapter_name, "adapter_name", _adapter_names(model))
    check_enabled(model)
    active = [n for n in _current_active(model) if n != adapter_name]
    remaining = [n for n in _adapter_names(model) if n != adapter_name]
    if not active and remaining:
        warnings.warn(
            f"adapter {adapter_name!r} was the active one; {remaining[0]!r} is active now",
            UserWarning,
            stacklevel=2,
        )
        active = remaining[:1]
    modules = dict(walk(model))
    for name, layer in find_adapted(model).items():
        if adapter_name in layer.adapters:
            layer.remove_adapter(adapter_name)
        layer._set_active(tuple(active))
        if not layer.adapters:
            drop_host(modules, name, layer)
    for name, wrapper in find_saved(model).items():
        if adapter_name in wrapper.copies:
            wrapper.remove_copy(adapter_name)
        wrapper.set_adapter(active)
        if not wrapper.copies:
            replace_module(modules, name, wrapper.original_module)
    release_save_pretrained(model)
    release_routing(model)
    return model


def _check_weights(weights: Iterable[float], count: int) -> list[float]:
    # Ordered iterables only: a set or a dict would pair weights with names by chance.
    if isinstance(weights, (str, bytes, Mapping, Set)) or not isinstance(weights, Iterable):
        raise TypeError(f"weights must be a sequence of real numbers, got {weights!r}")
    weights = list(weights)
    if len(weights) != count:
        raise ValueError(f"weights has {len(weights)} entries for {count} adapters")
    checked = []
    for w in weights:
        if isinstance(w, bool) or not isinstance(w, numbers.Real):
            raise TypeError(f"weights must be real numbers, got {weights!r}")
        if not math.isfinite(w):
            raise ValueError(f"weights must be finite, got {weights!r}")
        checked.append(float(w))
    return checked


def _combined(
    name: str, layer: AdaptedWeight, names: Sequence[str], weights: Sequence[float]
) -> TuckerDelta | None:
    r""":math:`\sum w_i \Delta W_i` over the named adapters this layer has, as one exact adapter."""
    present = [
        (layer.adapters[n], w) for n, w in zip(names, weights, strict=True) if n in layer.adapters
    ]
    if not present:
        return None
    with torch.no_grad():
        core, factors = block_sum(
            [
                (w * a.spec.scale * a.core.detach(), [f.detach() for f in a.factors])
                for a, w in present
            ]
        )
        initial = None
        if any(a.spec.init == "hosvd" for a, _ in present):
            terms = []
            for adapter, w in present:
                start = adapter.initial
                if start is None:
                    start = (torch.zeros_like(adapter.core), [f.detach() for f in adapter.factors])
                terms.append((w * adapter.spec.scale * start[0], list(start[1])))
            initial = block_sum(terms)
        biases = [w * a.bias.detach() for a, w in present if a.bias is not None]
        bias = sum(biases[1:], biases[0]) if biases else None
    first = present[0][0].spec
    spec = LayerSpec(
        first.kind,
        first.shape,
        tuple(core.shape),
        init="hosvd" if initial is not None else "zero_core",
        forward=first.forward,
        dropout=first.dropout,
        bias=bias is not None,
    )
    combined = TuckerDelta(spec, core, factors, initial=initial, bias=bias)
    with torch.no_grad():
        parts = [combined.delta_weight(), combined.initial_delta(), bias]
        if not all(bool(torch.isfinite(t).all()) for t in parts if t is not None):
            raise ValueError(
                f"layer {name!r}: weights {list(weights)} make the combined update overflow to "
                f"NaN or infinite values in {core.dtype}; nothing was added"
            )
    return combined


def add_weighted_adapter(
    model: nn.Module,
    adapter_names: Sequence[str],
    weights: Sequence[float],
    new_name: str,
) -> nn.Module:
    r"""Add adapter ``new_name``: :math:`\Delta W = \sum_i w_i \Delta W_i` exactly, on every layer.

    Bias updates combine the same way: :math:`\Delta b = \sum_i w_i \Delta b_i`.

    Each layer's combination is one Tucker tensor: a block-diagonal core
    (block ``i`` is :math:`w_i s_i G_i`) and the factors side by side, with scale
    1. Where a rank sum exceeds what the tensor can use (a mode's size, or
    the product of the other ranks), that mode is recompressed exactly: the
    reduced QR of ``U_n`` times the core's mode-``n`` unfolding gives the new
    factor and core. Layers hold the combination of the named adapters they
    have. For ``init="hosvd"`` adapters the initial updates are combined
    the same way, so the new adapter changes the model by :math:`\sum_i w_i` times
    what each adapter changed.

    Parameters
    ----------
    model : torch.nn.Module
        A model with the named adapters.
    adapter_names : sequence of str
        Adapters to combine.
    weights : sequence of float
        One finite weight per adapter (a list, tuple or 1-D array).
    new_name : str
        Name of the new adapter (added inactive and trainable; saved
        modules are copied from the first named adapter that has one).

    Returns
    -------
    torch.nn.Module
        ``model``.

    Raises
    ------
    ValueError
        If a name is unknown or repeated, ``new_name`` is taken, the
        weights are not one finite number per adapter, or they make a
        layer's combined update overflow (``[1e39, 1e39]`` in float32; the
        message names the layer). Nothing changes then.
    TypeError
        If ``weights`` is not a sequence of real numbers, or a name is not
        a string.
    RuntimeError
        Inside :func:`disable_adapter`.

    Examples
    --------
    >>> import torch
    >>> import flora
    >>> model = torch.nn.Sequential(torch.nn.Linear(6, 5))
    >>> for name in ("a", "b"):
    ...     config = flora.FLoRAConfig(ranks=2, init="gaussian", target_modules=["0"])
    ...     _ = flora.inject(model, config, adapter_name=name)
    ...     with torch.no_grad():
    ...         _ = model[0].adapters[name].core.normal_()
    >>> _ = flora.add_weighted_adapter(model, ["a", "b"], [0.5, 2.0], "mix")
    >>> layer = model[0]
    >>> layer.adapters["mix"].spec.ranks
    (4, 4)
    >>> expected = 0.5 * layer.delta_weight("a") + 2.0 * layer.delta_weight("b")
    >>> torch.allclose(layer.delta_weight("mix"), expected, atol=1e-5)
    True
    """
    check_model(model)
    check_adapter_name(new_name, "new_name")
    names = check_names(adapter_names, "adapter_names", _adapter_names(model))
    weights = _check_weights(weights, len(names))
    check_enabled(model)
    modules = dict(walk(model))
    additions = []
    for name, layer in find_adapted(model).items():
        adapter = _combined(name, layer, names, weights)
        if adapter is not None:
            additions.append(Addition(resolve(modules, name, layer.kind), adapter))
    config = FLoRAConfig.for_layers({a.site.name: a.adapter.spec for a in additions})
    for addition in additions:
        addition.adapter.config = config
    check_sites(model, [a.site for a in additions], new_name)
    copies = []
    for name, wrapper in find_saved(model).items():
        source = next((n for n in names if n in wrapper.copies), None)
        if source is not None:
            copies.append(SavedCopy(name, wrapper, copy.deepcopy(wrapper.copies[source])))
    apply(model, new_name, additions, copies)
    return model
