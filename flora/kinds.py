"""The layer-kind registry: one record per kind of module that ``inject`` adapts.

A :class:`LayerKind` says everything flora needs about a kind: the module
types it matches (subclasses too; the most specific registered type wins),
how to read the base weight as the update's ``(out, in, ...)`` map and
write a merged one back, the FLoRA layer class that runs the forward branch,
and how PEFT's LoRA represents it. The torch-free facts (default ranks,
whether a bias update exists, the geometry record, the update's shape from
the stored weight's) live in a torch-free table of tuckerlib, which reads
saved adapters of every kind without torch; :attr:`flora.LayerKind.rule` returns
them. :func:`flora.register_layer_kind` adds a user's own kind to both.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn

from tuckerlib.io.layer_kinds import (
    KINDS,
    KindRule,
    kind_rule,
    register_kind_rule,
    unregister_kind_rule,
)

if TYPE_CHECKING:
    from flora.layers.base import AdaptedWeight, FLoRALayer
    from flora.spec import RankTemplate

__all__ = [
    "LORA_FORMS",
    "OPAQUE_TYPES",
    "LayerKind",
    "add_kind",
    "copy_into_weight",
    "kind_of_module",
    "layer_kind",
    "lora_form",
    "plain_weight",
    "record_of",
    "register_layer_kind",
    "registered_kinds",
    "type_name",
    "unregister_layer_kind",
]

#: PEFT LoRA's forms of an update: ``B A`` on an (out, in) map, a ConvNd pair, an
#: embedding pair, the pairs of PEFT's MultiheadAttention layer.
LORA_FORMS = ("linear", "conv", "embedding", "attention")


def plain_weight(module: nn.Module) -> torch.Tensor:
    """``module.weight``: the base weight as most modules store it."""
    return module.weight


def copy_into_weight(module: nn.Module, value: torch.Tensor) -> None:
    """Write ``value`` (already in the weight's dtype and layout) into ``module.weight``."""
    module.weight.copy_(value)


def type_name(module_type: type | str) -> str:
    """A module type as ``package.module.Class`` (how string entries of ``module_types`` read)."""
    if isinstance(module_type, str):
        return module_type
    return f"{module_type.__module__}.{module_type.__qualname__}"


@dataclass(frozen=True)
class LayerKind:
    """One registered layer kind: what flora needs to adapt modules of these types.

    Attributes
    ----------
    name : str
        The kind, as configs (``FLoRAConfig(ranks={name: ...})``) and saved
        adapters name it; the layer class's ``kind``.
    module_types : tuple of (type or str)
        The module types it matches, subclasses included; a string
        ``"package.module.Class"`` matches that class without importing its
        package.
    layer : type of flora.AdaptedWeight
        The FLoRA layer that wraps a matched module and runs the branch (a
        :class:`flora.FLoRALayer`), or, with ``parameters``, the
        parametrization of each adapted parameter.
    read_weight : callable
        ``read_weight(module)`` gives the base weight as the update's map,
        ``(out, in, ...)`` (a view where the storage differs, so that it can
        be written through); by default ``module.weight``.
    write_weight : callable
        ``write_weight(module, value)`` stores a merged weight given in that
        layout and in the weight's dtype; by default copies into
        ``module.weight``. A quantized base dequantizes in ``read_weight``
        and requantizes here.
    lora : {"linear", "conv", "embedding", "attention"} or None
        How PEFT's LoRA represents this kind's update (None: no LoRA form,
        :func:`flora.export_lora` refuses the layer). ``"attention"``: one
        linear pair on the packed ``in_proj_weight`` under the attention
        module's name and one under its ``out_proj``, of one rank, as PEFT's
        ``MultiheadAttention`` layer holds them.
    all_linear : bool
        Whether ``target_modules="all-linear"`` includes modules of this kind.
    saves_as : str or None
        The kind saved adapters record, when it is not ``name``: a record
        for another storage of an existing kind (a quantized Linear base
        whose adapters are ``"Linear"`` adapters) says so here. Its layer's
        ``kind`` is then ``saves_as``.
    parameters : callable or None
        For a kind whose module's forward reads its weights itself
        (``torch.nn.MultiheadAttention``): ``parameters(module)`` names the
        parameters to adapt (dotted paths below the module), each through a
        parametrization of class ``layer``. None: the module is wrapped.

    Examples
    --------
    >>> import torch
    >>> import flora
    >>> kind = flora.kinds.kind_of_module(torch.nn.Linear(4, 2))
    >>> kind.name, kind.layer.__name__, kind.rule.default_ranks
    ('Linear', 'Linear', (8, 8))
    """

    name: str
    module_types: tuple[type | str, ...]
    layer: type[AdaptedWeight]
    read_weight: Callable[[nn.Module], torch.Tensor] = plain_weight
    write_weight: Callable[[nn.Module, torch.Tensor], None] = copy_into_weight
    lora: str | None = None
    all_linear: bool = False
    saves_as: str | None = None
    parameters: Callable[[nn.Module], tuple[str, ...]] | None = None

    @property
    def saved_kind(self) -> str:
        """The kind saved adapters and configs record (``saves_as``, else ``name``)."""
        return self.saves_as or self.name

    @property
    def rule(self) -> KindRule:
        """The kind's torch-free facts (default ranks, bias, geometry, ΔW shape)."""
        return kind_rule(self.saved_kind)

    def matches(self, module: nn.Module) -> bool:
        """Whether ``module`` is an instance of one of ``module_types``."""
        names = {type_name(t) for t in self.module_types}
        return any(type_name(cls) in names for cls in type(module).__mro__)

    def describe(self) -> str:
        """The matched types, for messages: ``torch.nn.Linear``, ``transformers...Conv1D``."""
        return " or ".join(_short_name(t) for t in self.module_types)


def _short_name(module_type: type | str) -> str:
    name = type_name(module_type)
    if name.startswith("torch.nn.modules."):
        return f"torch.nn.{name.rpartition('.')[2]}"
    return name


_KINDS: dict[str, LayerKind] = {}
#: Type name to the kind matching it.
_BY_TYPE: dict[str, str] = {}


#: The kinds flora registers itself (never removed).
_BUILT_IN: set[str] = set()


def add_kind(kind: LayerKind) -> LayerKind:
    """Register built-in ``kind``, whose torch-free rule is in the table already."""
    _check_new(kind)
    _BUILT_IN.add(kind.name)
    return _store(kind)


def _check_new(kind: LayerKind) -> None:
    if kind.name in _KINDS:
        raise ValueError(f"layer kind {kind.name!r} is registered already")
    taken = {
        type_name(t): _BY_TYPE[type_name(t)] for t in kind.module_types if type_name(t) in _BY_TYPE
    }
    if taken:
        raise ValueError(
            f"layer kind {kind.name!r}: module types {sorted(taken)} belong to kinds "
            f"{sorted(set(taken.values()))} already"
        )
    if getattr(kind.layer, "kind", None) != kind.saved_kind:
        raise ValueError(
            f"layer kind {kind.name!r}: its layer class {kind.layer.__name__} must have "
            f"kind = {kind.saved_kind!r}"
        )
    if kind.lora not in (None, *LORA_FORMS):
        raise ValueError(f"layer kind {kind.name!r}: lora must be one of {LORA_FORMS} or None")
    kind_rule(kind.saved_kind)


def _store(kind: LayerKind) -> LayerKind:
    _KINDS[kind.name] = kind
    _BY_TYPE.update(dict.fromkeys((type_name(t) for t in kind.module_types), kind.name))
    return kind


def register_layer_kind(
    layer: type[FLoRALayer],
    *,
    module_types: Sequence[type | str] | None = None,
    default_ranks: RankTemplate = 8,
    bias: bool = False,
    read_weight: Callable[[nn.Module], torch.Tensor] | None = None,
    write_weight: Callable[[nn.Module, torch.Tensor], None] | None = None,
    name: str | None = None,
) -> LayerKind:
    r"""Let ``inject`` adapt modules of a type of your own with ``layer``.

    ``layer`` is a :class:`flora.FLoRALayer` subclass that names the kind
    (its ``kind``) and runs the adapter branch (see :class:`flora.FLoRALayer`);
    a module that computes a linear map :math:`x W^\top (+ b)` of its ``(out, in)``
    ``weight`` takes everything from :class:`flora.Linear`. After
    registration, :func:`flora.inject`,
    :func:`flora.merge`, :func:`flora.unload`, :func:`flora.save_adapter` and
    :func:`flora.load_adapter` handle the kind like the built-in ones.

    Parameters
    ----------
    layer : type
        The FLoRA layer class; ``layer.kind`` is the kind's name (an
        identifier no other kind has).
    module_types : sequence of type or str, optional
        The module types it adapts, subclasses included (the most specific
        registered type wins); ``"package.module.Class"`` strings match
        without importing the package. By default ``(layer.base_type,)``.
    default_ranks : int or sequence of int, optional
        Ranks used when a config does not name this kind.
    bias : bool, optional
        Whether adapters of this kind may carry a bias update (``bias=True``
        in :class:`flora.FLoRAConfig`), added to the layer's output.
    read_weight, write_weight : callable, optional
        How to read the base weight as the update's ``(out, in, ...)`` map
        and write a merged one back; by default ``module.weight``.
    name : str, optional
        A name for the record other than ``layer.kind``: another storage of
        the existing kind ``layer.kind`` (a quantized or rescaled base,
        read and written through ``read_weight``/``write_weight``), whose
        adapters save and load as that kind. ``default_ranks`` and ``bias``
        are then the existing kind's.

    Returns
    -------
    LayerKind
        The registered record.

    Raises
    ------
    ValueError
        If a kind of that name exists, a module type belongs to another kind
        already (both naming the kind), or ``layer.kind`` is no identifier.
    TypeError
        If ``layer`` is no :class:`flora.FLoRALayer` subclass.

    Examples
    --------
    >>> import torch
    >>> import flora
    >>> class Projection(torch.nn.Module):  # a user's own linear map, no nn.Linear
    ...     def __init__(self, n_in, n_out):
    ...         super().__init__()
    ...         self.weight = torch.nn.Parameter(torch.randn(n_out, n_in))
    ...         self.bias = None
    ...     def forward(self, x):
    ...         return x @ self.weight.T
    >>> class FLoRAProjection(flora.Linear):  # it computes as a Linear does
    ...     kind = "Projection"
    ...     base_type = Projection
    >>> kind = flora.register_layer_kind(FLoRAProjection, default_ranks=(2, 2))
    >>> model = torch.nn.Sequential(Projection(4, 3))
    >>> model = flora.inject(model, flora.FLoRAConfig(target_modules=["0"], init="gaussian"))
    >>> type(model[0]).__name__, model[0].ranks
    ('FLoRAProjection', (2, 2))
    >>> flora.register_layer_kind(FLoRAProjection)
    Traceback (most recent call last):
    ...
    ValueError: layer kind 'Projection' is registered already
    >>> flora.unregister_layer_kind("Projection")
    """
    from flora.layers.base import FLoRALayer

    if not (isinstance(layer, type) and issubclass(layer, FLoRALayer)):
        raise TypeError(f"layer must be a flora.FLoRALayer subclass, got {layer!r}")
    storage = name is not None and name != layer.kind
    name = layer.kind if name is None else name
    if name in KINDS or name in _KINDS:
        raise ValueError(f"layer kind {name!r} is registered already")
    types = tuple(module_types) if module_types is not None else (layer.base_type,)
    kind = LayerKind(
        name,
        types,
        layer,
        read_weight=read_weight or plain_weight,
        write_weight=write_weight or copy_into_weight,
        lora=_KINDS[layer.kind].lora if storage and layer.kind in _KINDS else None,
        saves_as=layer.kind if storage else None,
    )
    if storage:  # the existing kind's rule
        _check_new(kind)
        return _store(kind)
    ranks = default_ranks if isinstance(default_ranks, int) else tuple(default_ranks)
    register_kind_rule(KindRule(name, "other", ranks, bias=bool(bias)))
    try:
        _check_new(kind)
    except ValueError:
        unregister_kind_rule(name)
        raise
    return _store(kind)


def unregister_layer_kind(name: str) -> None:
    """Remove the user kind ``name`` (registered with :func:`flora.register_layer_kind`).

    Models already adapted keep their layers; new ``inject`` calls no longer
    match the kind's module types, and its adapters no longer load.

    Raises
    ------
    ValueError
        If ``name`` is no registered kind, or a built-in one.

    Examples
    --------
    >>> import flora
    >>> flora.unregister_layer_kind("Linear")
    Traceback (most recent call last):
    ...
    ValueError: layer kind 'Linear' is built in, not registered with register_layer_kind
    """
    kind = layer_kind(name)
    if name in _BUILT_IN:
        raise ValueError(
            f"layer kind {name!r} is built in, not registered with register_layer_kind"
        )
    del _KINDS[name]
    for type_key in [t for t, owner in _BY_TYPE.items() if owner == kind.name]:
        del _BY_TYPE[type_key]
    if kind.saves_as is None:
        unregister_kind_rule(name)


def layer_kind(name: str) -> LayerKind:
    """The registered module kind ``name``.

    Raises
    ------
    ValueError
        If no module kind of that name is registered.
    """
    kind = _KINDS.get(name)
    if kind is None:
        raise ValueError(f"no layer kind {name!r}; module kinds are {list(_KINDS)}")
    return kind


#: Subclasses of adaptable types that no kind adapts: ``MultiheadAttention``'s
#: ``out_proj`` is a Linear whose ``forward`` the attention never calls (it
#: reads the weight directly), so a Linear adapter there would change nothing.
OPAQUE_TYPES = ("torch.nn.modules.linear.NonDynamicallyQuantizableLinear",)


def kind_of_module(module: nn.Module) -> LayerKind | None:
    """The kind of ``module``: its most specific registered type in the MRO (None if none)."""
    for cls in type(module).__mro__:
        if type_name(cls) in OPAQUE_TYPES:
            return None
        name = _BY_TYPE.get(type_name(cls))
        if name is not None:
            return _KINDS[name]
    return None


def record_of(module: nn.Module, kind: str) -> LayerKind | None:
    """The record matching ``module`` if it saves as ``kind`` (None: another kind or none)."""
    found = kind_of_module(module)
    return found if found is not None and found.saved_kind == kind else None


def lora_form(name: str) -> str | None:
    """PEFT LoRA's form of kind ``name``'s update (``"linear"`` for 2-D parameters; None: none)."""
    if name == "Parameter":
        return "linear"
    kind = _KINDS.get(name)
    return None if kind is None else kind.lora


def registered_kinds() -> tuple[LayerKind, ...]:
    """Every registered module kind, in the order of the kind table (``flora.spec.KINDS``)."""
    order = {name: n for n, name in enumerate(KINDS)}
    return tuple(sorted(_KINDS.values(), key=lambda kind: order.get(kind.saved_kind, len(order))))
