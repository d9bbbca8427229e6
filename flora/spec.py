r"""`LayerSpec`: what one FLoRA adapter of one weight is, validated in one place.

A spec names the layer kind, the weight's shape, the Tucker ranks and the
options (scale, init, forward mode, dropout). :class:`flora.FLoRAConfig`
builds one per adapted layer, the layers are built from it, saved adapters
record it (:meth:`~flora.LayerSpec.to_record`) and loading reads it back
(:meth:`~flora.LayerSpec.from_record`). The checks and error messages about these
settings live in :mod:`tuckerlib.io.flora_format`, the one owner of the
adapter format, which flora and tuckerlib's adapter reader share; this
module re-exports them.

Ranks are clipped to what a Tucker tensor can use: :math:`R_n \le I_n` and
:math:`R_n \le \prod_{m \ne n} R_m` for every mode
(:func:`tuckerlib.io.flora_format.usable_ranks`). A mode
rank above the product of the others adds parameters but no expressible
update, because the mode-``n`` unfolding of the core has at most that many
independent columns.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Any

from tuckerlib.io.flora_format import (
    FORWARD_MODES,
    INIT_MODES,
    LayerRecord,
    check_bias,
    check_dropout,
    check_forward,
    check_init,
    check_kind,
    check_layer_values,
    check_record,
    check_scale,
    check_shape,
    check_template,
    is_bool,
    resolve_init,
    usable_ranks,
)
from tuckerlib.io.layer_kinds import BIAS_KINDS as _BIAS_KINDS
from tuckerlib.io.layer_kinds import KINDS as _KINDS

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
    "resolve_init",
    "usable_ranks",
]

#: Layer kinds, as written in configs and saved adapters: every registered
#: kind (a live, read-only view of the kind registry, :doc:`/layer_kinds`).
KINDS = _KINDS
#: Layer kinds whose adapter can carry a bias update (the layer's bias, shape ``(out,)``).
BIAS_KINDS = _BIAS_KINDS

RankTemplate = int | Sequence[int | None]


def clip_ranks(
    template: RankTemplate, shape: Sequence[int], name: str = "ranks"
) -> tuple[int, ...]:
    r"""Clip a rank template to a weight's shape and to the usable ranks.

    Parameters
    ----------
    template : int or sequence of int or None
        An int applies to every mode; a sequence gives one rank per mode
        (``None`` keeps the mode full).
    shape : sequence of int
        The weight's shape :math:`(I_0, \dots, I_{N-1})`.
    name : str, optional
        Name used in error messages.

    Returns
    -------
    tuple of int
        ``min(R_n, I_n)`` for every mode, then :func:`tuckerlib.io.flora_format.usable_ranks`: a
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
    shape = check_shape(shape)
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
    r"""One adapter of one weight: kind, shape, ranks and options, validated.

    Parameters
    ----------
    kind : str
        ``"Linear"``, ``"Conv1d"``, ``"Conv2d"``, ``"Conv3d"``, ``"Embedding"`` or
        ``"Parameter"``.
    shape : sequence of int
        The adapted weight's shape :math:`(I_0, \dots, I_{N-1})`.
    ranks : sequence of int
        One rank per mode, usable as they are: :math:`1 \le R_n \le I_n` and
        :math:`R_n \le \prod_{m \ne n} R_m` (:meth:`flora.LayerSpec.from_template` clips a
        template).
    scale : float, optional
        The factor ``s`` of :math:`\Delta W = s \cdot G \times_0 U_0 \dots \times_{N-1} U_{N-1}`.
    init : {"auto", "balanced", "zero_core", "hosvd", "gaussian"}, optional
        How the adapter starts (see :mod:`flora.init`); ``"hosvd"`` adapters
        keep their initial tensors. ``"auto"`` is replaced by the init it
        stands for on this shape (:func:`tuckerlib.io.flora_format.resolve_init`):
        a spec always records a concrete init.
    forward : {"auto", "dense", "factorized"}, optional
        How the adapter branch is computed; see :doc:`/flora_math`.
    dropout : float, optional
        Dropout probability on the branch input (Linear and ConvNd).
    bias : bool, optional
        Whether the adapter also carries a bias update :math:`\Delta b` of shape
        ``(shape[0],)``, added to the layer's bias (Linear and ConvNd
        layers that have one; PEFT's ``lora_bias``). :math:`\Delta b` is not
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
    init: str = "auto"
    forward: str = "auto"
    dropout: float = 0.0
    bias: bool = False

    def __post_init__(self) -> None:
        values = check_layer_values(
            self.kind,
            self.shape,
            self.ranks,
            self.scale,
            self.init,
            self.forward,
            self.dropout,
            self.bias,
        )
        for key, value in values.items():
            object.__setattr__(self, key, value)

    @classmethod
    def from_template(
        cls,
        kind: str,
        shape: Sequence[int],
        template: RankTemplate,
        *,
        scale: float = 1.0,
        init: str = "auto",
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
        r"""Entries stored, :math:`\prod_n R_n + \sum_n I_n R_n`, plus ``I_0`` with a bias."""
        tucker = math.prod(self.ranks) + sum(
            s * r for s, r in zip(self.shape, self.ranks, strict=True)
        )
        return tucker + (self.shape[0] if self.bias else 0)

    def record(self, geometry: Mapping[str, Any] | None = None, name: str = "") -> LayerRecord:
        """The spec as the adapter format's :class:`tuckerlib.io.flora_format.LayerRecord`.

        Examples
        --------
        >>> from flora import LayerSpec
        >>> LayerSpec("Linear", (3, 4), (2, 2)).record(name="fc").tensor_shapes()
        {'fc.core': (2, 2), 'fc.factors.0': (3, 2), 'fc.factors.1': (4, 2)}
        """
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        return LayerRecord(name, stored_ranks=self.ranks, geometry=geometry, **values)

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
        return cls(**check_record(record))
