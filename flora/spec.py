"""`LayerSpec`: what one FLoRA adapter of one weight is, validated in one place.

A spec names the layer kind, the weight's shape, the Tucker ranks and the
options (scale, init, forward mode, dropout). :class:`flora.FLoRAConfig`
builds one per adapted layer, the layers are built from it, saved adapters
record it (:meth:`LayerSpec.to_record`) and loading reads it back
(:meth:`LayerSpec.from_record`). Every check and every error message about
these settings lives in this module.

Ranks are clipped to what a Tucker tensor can use: ``R_n <= I_n`` and
``R_n <= prod_{m != n} R_m`` for every mode (:func:`flora.spec.usable_ranks`). A mode
rank above the product of the others adds parameters but no expressible
update, because the mode-``n`` unfolding of the core has at most that many
independent columns.
"""

from __future__ import annotations

import math
import numbers
import operator
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Any

from tuckerlib.io._kinds import BIAS_KINDS as _BIAS_KINDS
from tuckerlib.io._kinds import KINDS as _KINDS

__all__ = [
    "BIAS_KINDS",
    "FORWARD_MODES",
    "INIT_MODES",
    "KINDS",
    "LayerSpec",
    "check_bias",
    "check_dropout",
    "check_forward",
    "check_init",
    "check_kind",
    "check_scale",
    "check_template",
    "clip_ranks",
    "is_bool",
    "usable_ranks",
]

#: Layer kinds, as written in configs and saved adapters: every registered
#: kind (a live, read-only view of the kind registry, :doc:`/layer_kinds`).
KINDS = _KINDS
#: Layer kinds whose adapter can carry a bias update (the layer's bias, shape ``(out,)``).
BIAS_KINDS = _BIAS_KINDS
INIT_MODES = ("zero_core", "hosvd", "gaussian")
FORWARD_MODES = ("auto", "dense", "factorized")

RankTemplate = int | Sequence[int | None]


def _as_int(value: object, name: str) -> int:
    """``value`` as an int: Python and NumPy integers, never bool or float."""
    if is_bool(value):
        raise TypeError(f"{name} must be an int, got {value!r}")
    try:
        return operator.index(value)
    except TypeError:
        raise TypeError(f"{name} must be an int, got {value!r}") from None


def check_scale(value: object) -> float:
    """``value`` as a finite, non-zero float (Python or NumPy real; not bool).

    Examples
    --------
    >>> import numpy as np
    >>> from flora.spec import check_scale
    >>> check_scale(np.float32(0.5))
    0.5
    """
    if is_bool(value) or not isinstance(value, numbers.Real):
        raise TypeError(f"scale must be a real number, got {value!r}")
    if not math.isfinite(value) or value == 0:
        raise ValueError(f"scale must be finite and non-zero, got {value}")
    return float(value)


def check_dropout(value: object) -> float:
    """``value`` as a float in ``[0, 1)`` (Python or NumPy real; not bool).

    Examples
    --------
    >>> from flora.spec import check_dropout
    >>> check_dropout(0)
    0.0
    """
    if is_bool(value) or not isinstance(value, numbers.Real):
        raise TypeError(f"dropout must be a real number, got {value!r}")
    if not 0 <= value < 1:
        raise ValueError(f"dropout must lie in [0, 1), got {value}")
    return float(value)


def is_bool(value: object) -> bool:
    """Whether ``value`` is a Python or NumPy boolean (``numpy.bool`` in NumPy 2).

    Examples
    --------
    >>> import numpy as np
    >>> from flora.spec import is_bool
    >>> is_bool(np.True_), is_bool(1)
    (True, False)
    """
    kind = type(value)
    return isinstance(value, bool) or (
        kind.__module__ == "numpy" and kind.__name__.startswith("bool")
    )


def check_bias(value: object, kind: str | None = None) -> bool:
    """``value`` as a bool; ``True`` only for a kind in :data:`BIAS_KINDS` (when ``kind`` is given).

    Examples
    --------
    >>> from flora.spec import check_bias
    >>> check_bias(True, "Conv2d")
    True
    """
    if not is_bool(value):
        raise TypeError(f"bias must be True or False, got {value!r}")
    if value and kind is not None and kind not in BIAS_KINDS:
        raise ValueError(f"bias updates exist for {BIAS_KINDS} layers only, not for a {kind}")
    return bool(value)


def check_init(value: object) -> str:
    """``value`` if it is one of ``"zero_core"``, ``"hosvd"``, ``"gaussian"``.

    Examples
    --------
    >>> from flora.spec import check_init
    >>> check_init("hosvd")
    'hosvd'
    """
    if value not in INIT_MODES:
        raise ValueError(f"init must be one of {INIT_MODES}, got {value!r}")
    return str(value)


def check_forward(value: object) -> str:
    """``value`` if it is one of ``"auto"``, ``"dense"``, ``"factorized"``.

    Examples
    --------
    >>> from flora.spec import check_forward
    >>> check_forward("dense")
    'dense'
    """
    if value not in FORWARD_MODES:
        raise ValueError(f"forward must be one of {FORWARD_MODES}, got {value!r}")
    return str(value)


def check_kind(value: object) -> str:
    """``value`` if it is a layer kind: ``"Linear"``, ``"Conv1d"``, ..., ``"Parameter"``.

    Examples
    --------
    >>> from flora.spec import check_kind
    >>> check_kind("Conv2d")
    'Conv2d'
    """
    if value not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {value!r}")
    return str(value)


def check_template(value: object, name: str = "ranks") -> int | tuple[int | None, ...]:
    """A rank template: a positive int, or a sequence of positive ints and ``None``.

    Examples
    --------
    >>> import numpy as np
    >>> from flora.spec import check_template
    >>> check_template([np.int64(4), None, 2])
    (4, None, 2)
    """
    if isinstance(value, Sequence) and not isinstance(value, str):
        entries = []
        for i, r in enumerate(value):
            if r is not None:
                r = _as_int(r, f"{name}[{i}]")
                if r < 1:
                    raise ValueError(f"{name}[{i}] must be a positive int or None, got {r}")
            entries.append(r)
        return tuple(entries)
    try:
        rank = _as_int(value, name)
    except TypeError:
        raise TypeError(f"{name} must be an int or a sequence of ints, got {value!r}") from None
    if rank < 1:
        raise ValueError(f"{name} must be >= 1, got {rank}")
    return rank


def _check_shape(value: object) -> tuple[int, ...]:
    if not isinstance(value, Sequence) or isinstance(value, str) or not value:
        raise ValueError(f"shape must be a non-empty sequence of positive ints, got {value!r}")
    shape = tuple(_as_int(s, "shape entries") for s in value)
    if any(s < 1 for s in shape):
        raise ValueError(f"shape must hold positive ints, got {shape}")
    return shape


def usable_ranks(ranks: Sequence[int], shape: Sequence[int]) -> tuple[int, ...]:
    """The largest ranks ``<= ranks`` that a Tucker tensor of ``shape`` can use.

    Every mode satisfies ``R_n <= min(I_n, prod_{m != n} R_m)``; clipping one
    mode can lower the bound of another, so the clipping repeats until
    nothing changes (the result does not depend on the order of the modes).

    Parameters
    ----------
    ranks : sequence of int
        One positive rank per mode.
    shape : sequence of int
        The tensor's shape.

    Returns
    -------
    tuple of int

    Examples
    --------
    >>> from flora.spec import usable_ranks
    >>> usable_ranks((2, 8), (2, 256))  # a rank-2 matrix needs no rank 8 on its columns
    (2, 2)
    >>> usable_ranks((16, 1, 2, 2), (32, 1, 3, 3))  # a depthwise 3x3 convolution
    (4, 1, 2, 2)
    """
    current = [min(int(r), int(s)) for r, s in zip(ranks, shape, strict=True)]
    changed = True
    while changed:
        changed = False
        for n, rank in enumerate(current):
            bound = math.prod(current[:n] + current[n + 1 :])
            if rank > bound:
                current[n] = bound
                changed = True
    return tuple(current)


def clip_ranks(
    template: RankTemplate, shape: Sequence[int], name: str = "ranks"
) -> tuple[int, ...]:
    """Clip a rank template to a weight's shape and to the usable ranks.

    Parameters
    ----------
    template : int or sequence of int or None
        An int applies to every mode; a sequence gives one rank per mode
        (``None`` keeps the mode full).
    shape : sequence of int
        The weight's shape ``(I_0, ..., I_{N-1})``.
    name : str, optional
        Name used in error messages.

    Returns
    -------
    tuple of int
        ``min(R_n, I_n)`` for every mode, then :func:`flora.spec.usable_ranks`: a
        depthwise convolution's ``in/groups`` mode of size 1 gets rank 1, and
        its output mode at most the product of the kernel ranks.

    Raises
    ------
    ValueError
        If a sequence template has a different number of entries than
        ``shape`` has modes, or a rank is below 1.
    TypeError
        If the template is not an int or a sequence of ints.

    Examples
    --------
    >>> from flora.spec import clip_ranks
    >>> clip_ranks((16, 16, 2, 2), (96, 1, 7, 7))
    (4, 1, 2, 2)
    >>> clip_ranks(8, (4, 32))
    (4, 4)
    """
    template = check_template(template, name)
    shape = _check_shape(shape)
    if isinstance(template, int):
        return usable_ranks([template] * len(shape), shape)
    if len(template) != len(shape):
        raise ValueError(
            f"{name}={template} has {len(template)} entries but the weight has "
            f"{len(shape)} modes (shape {shape})"
        )
    full = [s if r is None else r for r, s in zip(template, shape, strict=True)]
    return usable_ranks(full, shape)


@dataclass(frozen=True)
class LayerSpec:
    """One adapter of one weight: kind, shape, ranks and options, validated.

    Parameters
    ----------
    kind : str
        ``"Linear"``, ``"Conv1d"``, ``"Conv2d"``, ``"Conv3d"``, ``"Embedding"`` or
        ``"Parameter"``.
    shape : sequence of int
        The adapted weight's shape ``(I_0, ..., I_{N-1})``.
    ranks : sequence of int
        One rank per mode, usable as they are: ``1 <= R_n <= I_n`` and
        ``R_n <= prod_{m != n} R_m`` (:meth:`flora.LayerSpec.from_template` clips a template).
    scale : float, optional
        The factor ``s`` of ``ΔW = s · G ×_0 U_0 … ×_{N-1} U_{N-1}``.
    init : {"zero_core", "hosvd", "gaussian"}, optional
        How the adapter starts; ``"hosvd"`` adapters keep their initial
        tensors (see :mod:`flora.init`).
    forward : {"auto", "dense", "factorized"}, optional
        How the adapter branch is computed; see :doc:`/flora_math`.
    dropout : float, optional
        Dropout probability on the branch input (Linear and ConvNd).
    bias : bool, optional
        Whether the adapter also carries a bias update ``Δb`` of shape
        ``(shape[0],)``, added to the layer's bias (Linear and ConvNd
        layers that have one; PEFT's ``lora_bias``). ``Δb`` is not
        multiplied by ``scale``.

    Raises
    ------
    ValueError
        For an unknown kind, init or forward; ranks that do not match the
        shape or are not usable; a zero or non-finite scale; a dropout
        outside ``[0, 1)``; a bias update for a kind without a bias.
    TypeError
        For values of the wrong type (integral NumPy scalars count as ints,
        real NumPy scalars as floats; bools are refused).

    Examples
    --------
    >>> from flora import LayerSpec
    >>> spec = LayerSpec.from_template("Linear", (2, 256), 8)
    >>> spec.ranks, spec.n_params  # (2, 8) would cost 2,068 for the same updates
    ((2, 2), 520)
    >>> LayerSpec.from_record(spec.to_record()) == spec
    True
    """

    kind: str
    shape: tuple[int, ...]
    ranks: tuple[int, ...]
    scale: float = 1.0
    init: str = "zero_core"
    forward: str = "auto"
    dropout: float = 0.0
    bias: bool = False

    def __post_init__(self) -> None:
        set_ = object.__setattr__
        set_(self, "kind", check_kind(self.kind))
        shape = _check_shape(self.shape)
        set_(self, "shape", shape)
        ranks = check_template(self.ranks, "ranks")
        if isinstance(ranks, int) or None in ranks or len(ranks) != len(shape):
            raise ValueError(f"ranks must give one positive int per mode of {shape}, got {ranks}")
        usable = usable_ranks(ranks, shape)
        if usable != ranks:
            raise ValueError(
                f"ranks {ranks} do not fit shape {shape}: every R_n must be at most I_n "
                f"and the product of the other ranks; usable ranks are {usable}"
            )
        set_(self, "ranks", ranks)
        set_(self, "scale", check_scale(self.scale))
        set_(self, "init", check_init(self.init))
        set_(self, "forward", check_forward(self.forward))
        set_(self, "dropout", check_dropout(self.dropout))
        set_(self, "bias", check_bias(self.bias, self.kind))

    @classmethod
    def from_template(
        cls,
        kind: str,
        shape: Sequence[int],
        template: RankTemplate,
        *,
        scale: float = 1.0,
        init: str = "zero_core",
        forward: str = "auto",
        dropout: float = 0.0,
        bias: bool = False,
    ) -> LayerSpec:
        """The spec for a weight of ``shape`` with ranks clipped from ``template``.

        See :func:`flora.spec.clip_ranks` for the clipping; the options are as in the
        class.
        """
        ranks = clip_ranks(template, shape)
        return cls(kind, tuple(shape), ranks, scale, init, forward, dropout, bias)

    @property
    def n_params(self) -> int:
        """Entries of the core and factors, ``prod(R) + sum(I_n R_n)``, plus ``I_0`` with a bias."""
        tucker = math.prod(self.ranks) + sum(
            s * r for s, r in zip(self.shape, self.ranks, strict=True)
        )
        return tucker + (self.shape[0] if self.bias else 0)

    def to_record(self) -> dict[str, Any]:
        """The spec as a JSON object (lists for tuples), as saved adapters hold it.

        Returns
        -------
        dict
            Keys ``kind``, ``shape``, ``ranks``, ``scale``, ``init``,
            ``forward``, ``dropout``, and ``bias`` (``true``) only for an
            adapter with a bias update, so that a reader that does not know
            bias updates refuses such a record instead of dropping them.
        """
        record: dict[str, Any] = {
            "kind": self.kind,
            "shape": list(self.shape),
            "ranks": list(self.ranks),
            "scale": self.scale,
            "init": self.init,
            "forward": self.forward,
            "dropout": self.dropout,
        }
        if self.bias:
            record["bias"] = True
        return record

    @classmethod
    def from_record(cls, record: object) -> LayerSpec:
        """Read a spec from ``to_record()`` output (``forward``, ``dropout``, ``bias`` optional).

        Parameters
        ----------
        record : dict
            A JSON object with keys ``kind``, ``shape``, ``ranks``, ``scale``
            and ``init``, and optionally ``forward``, ``dropout`` and ``bias``.

        Returns
        -------
        LayerSpec

        Raises
        ------
        ValueError
            If ``record`` is not a mapping, lacks a key or has an unknown
            one, or holds an invalid value (JSON numbers only: strings and
            booleans are refused).
        """
        if not isinstance(record, Mapping):
            raise ValueError(f"a layer record must be a JSON object, got {type(record).__name__}")
        names = [f.name for f in fields(cls)]
        required = set(names[:5])
        if not required <= set(record) <= set(names):
            raise ValueError(
                f"a layer record must have keys {sorted(required)} (optional forward, dropout, "
                f"bias), "
                f"got {sorted(record)}"
            )
        for key in ("shape", "ranks"):
            if not isinstance(record[key], list):
                raise ValueError(f"{key} must be a list of ints, got {record[key]!r}")
        try:
            return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in record.items()})
        except TypeError as exc:
            raise ValueError(str(exc)) from None
