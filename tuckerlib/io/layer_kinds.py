"""The torch-free facts of each flora layer kind: one table both packages read.

A flora adapter records each layer's ``kind`` (``"Linear"``, ``"Conv2d"``,
``"Conv1D"``, ...). What a reader needs to know about a kind without torch
lives here, one :class:`KindRule` per kind: how tuckerlib's analysis
classifies its update, its default ranks, whether it can carry a bias
update, which geometry record it takes, and how the update's shape follows
from the stored weight's (transformers' ``Conv1D`` stores its weight
``(in, out)``; its update is modelled in the layer's ``(out, in)`` map).
:mod:`flora.kinds` adds the torch side (module types, layer class, weight
access) and registers user kinds here too, so saved adapters of any
registered kind read back.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass

__all__ = [
    "BIAS_KINDS",
    "DEFAULT_RANKS",
    "KINDS",
    "TENSOR_CLASSES",
    "KindRule",
    "by_parameter",
    "geometry_of",
    "kind_rule",
    "known_tensor_class",
    "register_kind_rule",
    "unregister_kind_rule",
]

#: How tuckerlib's analysis classifies an update (``tuckerlib.analysis.TENSOR_KINDS``).
TENSOR_CLASSES = ("linear", "conv", "embedding", "other")
_GEOMETRIES = (None, "conv", "embedding")
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


@dataclass(frozen=True)
class KindRule:
    r"""What a reader without torch knows of one layer kind.

    Attributes
    ----------
    name : str
        The kind as saved adapters record it (an identifier).
    tensor_class : str
        One of :data:`tuckerlib.io.layer_kinds.TENSOR_CLASSES`: how the update is classified.
    default_ranks : int or tuple of int
        The ranks used when a config does not name this kind.
    bias : bool
        Whether an adapter of this kind can carry a bias update :math:`\Delta b`.
    geometry : {None, "conv", "embedding"}
        The geometry record a layer of this kind saves, if any.
    transposed : bool
        The weight is stored ``(in, out)`` and the update is modelled as the
        ``(out, in)`` map: :math:`\Delta W`'s shape is the stored shape reversed.
    on_parameters : bool
        The kind adapts named parameters of its module (its forward reads
        them itself): records are named by parameter, ``"attn.in_proj_weight"``,
        not by module.

    Examples
    --------
    >>> from tuckerlib.io.layer_kinds import kind_rule
    >>> kind_rule("Conv1D").delta_shape((768, 2304))
    (2304, 768)
    """

    name: str
    tensor_class: str
    default_ranks: int | tuple[int, ...]
    bias: bool = False
    geometry: str | None = None
    transposed: bool = False
    on_parameters: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not _NAME.fullmatch(self.name):
            raise ValueError(f"kind name must be an identifier, got {self.name!r}")
        if self.tensor_class not in TENSOR_CLASSES:
            raise ValueError(
                f"kind {self.name!r}: tensor_class must be one of {TENSOR_CLASSES}, "
                f"got {self.tensor_class!r}"
            )
        if self.geometry not in _GEOMETRIES:
            raise ValueError(
                f"kind {self.name!r}: geometry must be one of {_GEOMETRIES}, got {self.geometry!r}"
            )

    def delta_shape(self, weight_shape: Sequence[int]) -> tuple[int, ...]:
        """The update's shape for a stored weight of ``weight_shape``."""
        shape = tuple(weight_shape)
        return shape[::-1] if self.transposed else shape


_RULES: dict[str, KindRule] = {}


def register_kind_rule(rule: KindRule) -> None:
    """Add ``rule`` to the table.

    Raises
    ------
    ValueError
        If a kind of that name is registered already.
    """
    if rule.name in _RULES:
        raise ValueError(f"layer kind {rule.name!r} is registered already")
    _RULES[rule.name] = rule


def unregister_kind_rule(name: str) -> None:
    """Remove the rule of kind ``name`` (a user kind; see ``flora.unregister_layer_kind``)."""
    del _RULES[name]


def kind_rule(name: str) -> KindRule:
    """The rule of kind ``name``.

    Raises
    ------
    ValueError
        If no kind of that name is registered (naming the known ones).
    """
    rule = _RULES.get(name) if isinstance(name, str) else None
    if rule is None:
        raise ValueError(f"kind must be one of {KINDS}, got {name!r}")
    return rule


def known_tensor_class(name: str) -> str | None:
    """How the analysis classifies kind ``name``'s update; None for ``"other"`` or unknown kinds.

    Callers then classify the tensor from its name and shape
    (``tuckerlib.analysis.tensor_kind``).
    """
    rule = _RULES.get(name)
    return None if rule is None or rule.tensor_class == "other" else rule.tensor_class


def by_parameter(name: str) -> bool:
    """Whether records of kind ``name`` name a parameter (``"Parameter"`` and ``on_parameters``)."""
    rule = _RULES.get(name)
    return name == "Parameter" or (rule is not None and rule.on_parameters)


def geometry_of(name: str) -> str | None:
    """The geometry record kind ``name`` takes (``"conv"``, ``"embedding"``), or None."""
    rule = _RULES.get(name)
    return None if rule is None else rule.geometry


class _Names(Sequence[str]):
    """The registered kinds that satisfy a test, in registration order, read live."""

    def __init__(self, test: Callable[[KindRule], bool]):
        self._test = test

    def _names(self) -> tuple[str, ...]:
        return tuple(name for name, rule in _RULES.items() if self._test(rule))

    def __getitem__(self, index):  # type: ignore[no-untyped-def]
        return self._names()[index]

    def __len__(self) -> int:
        return len(self._names())

    def __contains__(self, value: object) -> bool:
        return value in self._names()

    def __iter__(self) -> Iterator[str]:
        return iter(self._names())

    def __eq__(self, other: object) -> bool:
        return self._names() == (tuple(other) if isinstance(other, Sequence) else other)

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return repr(self._names())


class _DefaultRanks(Mapping[str, "int | tuple[int, ...]"]):
    """Kind name to its default ranks, read live from the table."""

    def __getitem__(self, name: str) -> int | tuple[int, ...]:
        if name not in _RULES:
            raise KeyError(name)
        return _RULES[name].default_ranks

    def __iter__(self) -> Iterator[str]:
        return iter(list(_RULES))

    def __len__(self) -> int:
        return len(_RULES)

    def __repr__(self) -> str:
        return repr(dict(self))


#: Every registered kind, as saved adapters record it (a live view).
KINDS: Sequence[str] = _Names(lambda rule: True)
#: The kinds whose adapter can carry a bias update (a live view).
BIAS_KINDS: Sequence[str] = _Names(lambda rule: rule.bias)
#: Kind name to default ranks (a live, read-only view).
DEFAULT_RANKS: Mapping[str, int | tuple[int, ...]] = _DefaultRanks()

# The built-in kinds. Convolution ranks are the paper's ConvNeXt configuration
# (16 on the channel modes, 2 on each kernel mode); matrices take 8 on both
# modes, PEFT's default LoRA rank; other parameters 8 on every mode.
for _rule in (
    KindRule("Linear", "linear", (8, 8), bias=True),
    KindRule("Conv1d", "conv", (16, 16, 2), bias=True, geometry="conv"),
    KindRule("Conv2d", "conv", (16, 16, 2, 2), bias=True, geometry="conv"),
    KindRule("Conv3d", "conv", (16, 16, 2, 2, 2), bias=True, geometry="conv"),
    KindRule("Embedding", "embedding", (8, 8), geometry="embedding"),
    KindRule("Parameter", "other", 8),
    KindRule("Conv1D", "linear", (8, 8), bias=True, transposed=True),
    KindRule("MultiheadAttention", "linear", (8, 8), on_parameters=True),
):
    register_kind_rule(_rule)
del _rule
