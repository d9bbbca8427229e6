r"""What every FLoRA layer shares: named Tucker adapters on one weight.

:class:`~flora.TuckerDelta` is one adapter: a trainable ``core`` and ``factors``
with :math:`\Delta W = s \cdot \text{core} \times_0 U_0 \dots \times_{N-1} U_{N-1}` and its
:class:`flora.LayerSpec`.
:class:`~flora.AdaptedWeight` holds the named adapters of one weight (which are
active, which are merged) and adds their updates into, or out of, the base
weight. :class:`~flora.FLoRALayer` wraps a module as ``base_layer`` and runs the
active adapters' branches next to it.

What a weight with adapters computes: :math:`W + \sum_{\text{active}} \Delta W_a` with ``W`` the
base weight. An adapter made with ``init="hosvd"`` took its initial update
``ΔW_a,init`` out of the base weight when it was added; while it is not
running (inactive, or inside :func:`flora.disable_adapter`) the layer adds
``ΔW_a,init`` back, so it changes nothing then. Merged adapters live in
the base weight and run no branch.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import operator
from collections.abc import Iterable, Sequence

import torch
from torch import nn
from torch.fx.experimental.symbolic_shapes import optimization_hint

from flora._cost import Op, choose, reconstruction_ops
from flora._tucker import compress, reconstruct
from flora.config import DEFAULT_RANKS, FLoRAConfig
from flora.init import balanced_init, hosvd_init, init_factors
from flora.kinds import layer_kind, record_of
from flora.layers._route import BASE, Route, routed
from flora.spec import LayerSpec, RankTemplate

__all__ = [
    "KIND_DEFAULT",
    "AdaptedWeight",
    "FLoRALayer",
    "TuckerDelta",
    "adapter_dtype",
    "cast",
    "check_adapter_name",
    "scaled_core",
]

_HALF = (torch.float16, torch.bfloat16)
_RESERVED = frozenset(dir(nn.ModuleDict()))


class _KindDefault:
    """The default ``ranks`` of a layer: :data:`flora.DEFAULT_RANKS` of its kind."""

    def __repr__(self) -> str:
        return "DEFAULT_RANKS[kind]"


KIND_DEFAULT = _KindDefault()


def adapter_dtype(dtype: torch.dtype) -> torch.dtype:
    """The adapter's dtype for a base weight of ``dtype``: float32 for half precision.

    Examples
    --------
    >>> import torch
    >>> from flora.layers.base import adapter_dtype
    >>> adapter_dtype(torch.bfloat16), adapter_dtype(torch.float64)
    (torch.float32, torch.float64)
    """
    return torch.float32 if dtype in _HALF else dtype


def check_adapter_name(name: object, what: str = "adapter_name") -> str:
    """``name`` if it can name an adapter: a non-empty string without ``"."``.

    Raises
    ------
    TypeError
        If ``name`` is not a string (``what`` names the argument).
    ValueError
        If it is empty, holds a ``"."``, or is an attribute of
        ``torch.nn.ModuleDict`` (such as ``"keys"``), which cannot key a
        submodule.

    Examples
    --------
    >>> from flora.layers.base import check_adapter_name
    >>> check_adapter_name("task_a")
    'task_a'
    """
    if not isinstance(name, str):
        raise TypeError(f"{what} must be a str, got {type(name).__name__}")
    if not name or "." in name or name in _RESERVED:
        raise ValueError(
            f"{what} must be a non-empty string without '.' that is not an attribute "
            f"of torch.nn.ModuleDict, got {name!r}"
        )
    return name


def scaled_core(adapter: TuckerDelta) -> torch.Tensor:
    """``s · core`` of ``adapter`` (the core itself for ``s = 1``: one op less to compile)."""
    scale = adapter.spec.scale
    return adapter.core if scale == 1.0 else adapter.core * scale


def cast(tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``tensor`` in ``dtype``: itself when it has it (no op to compile)."""
    return tensor if tensor.dtype == dtype else tensor.to(dtype)


def _check_weight(weight: torch.Tensor) -> None:
    if not weight.is_floating_point():
        raise TypeError(f"FLoRA adapts floating-point weights, got dtype {weight.dtype}")


class TuckerDelta(nn.Module):
    r"""One adapter, :math:`\Delta W = s \cdot G \times_0 U_0 \dots \times_{N-1} U_{N-1}`.

    With ``spec.bias`` it also holds a bias update ``Δb`` (``bias``, shape
    ``(spec.shape[0],)``) that the layer adds to its bias, as PEFT's
    ``lora_bias`` does.

    Build it with :meth:`flora.TuckerDelta.create` (initialized as ``spec.init`` says) or from
    given tensors; add it to a layer with :meth:`flora.AdaptedWeight.add_adapter`.

    Parameters
    ----------
    spec : LayerSpec
        Kind, shape, ranks and options.
    core : torch.Tensor
        Shape ``spec.ranks``; copied into a parameter of the same dtype.
    factors : sequence of torch.Tensor
        ``factors[n]`` of shape ``(spec.shape[n], spec.ranks[n])``.
    initial : tuple of (torch.Tensor, sequence of torch.Tensor), optional
        The adapter's initial core and factors when its layer gave that
        update up from the base weight (``init="hosvd"``).
    bias : torch.Tensor, optional
        The bias update ``Δb``, shape ``(spec.shape[0],)``; given exactly
        when ``spec.bias`` is true.
    trainable : bool, optional
        Whether the adapter's tensors require gradients while it is active.

    Attributes
    ----------
    spec : LayerSpec
    core : torch.nn.Parameter
    factors : torch.nn.ParameterList
    bias : torch.nn.Parameter or None
        ``Δb``, not multiplied by the scale.
    merged : bool
        Whether ``ΔW`` is currently added into the base weight.
    trainable : bool
    config : FLoRAConfig or None
        The config the adapter was made from, recorded when it is saved.

    Raises
    ------
    ValueError
        If a tensor's shape does not match the spec, ``initial`` is given
        without ``spec.init == "hosvd"`` (or missing with it), or ``bias``
        without ``spec.bias`` (or missing with it).

    Examples
    --------
    >>> import torch
    >>> from flora import LayerSpec, TuckerDelta
    >>> spec = LayerSpec("Linear", (3, 4), (1, 1), scale=2.0)
    >>> delta = TuckerDelta(spec, torch.ones(1, 1), [torch.ones(3, 1), torch.ones(4, 1)])
    >>> delta.delta_weight()
    tensor([[2., 2., 2., 2.],
            [2., 2., 2., 2.],
            [2., 2., 2., 2.]], grad_fn=<ViewBackward0>)
    """

    def __init__(
        self,
        spec: LayerSpec,
        core: torch.Tensor,
        factors: Sequence[torch.Tensor],
        *,
        initial: tuple[torch.Tensor, Sequence[torch.Tensor]] | None = None,
        bias: torch.Tensor | None = None,
        trainable: bool = True,
    ):
        super().__init__()
        _check_tucker(spec, core, factors, "")
        if (initial is not None) != (spec.init == "hosvd"):
            raise ValueError("initial tensors are given exactly for init='hosvd' adapters")
        _check_bias(spec, bias)
        self.spec = spec
        self.core = nn.Parameter(core.detach().clone())
        self.factors = nn.ParameterList(nn.Parameter(f.detach().clone()) for f in factors)
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone())
        self.dropout = nn.Dropout(spec.dropout) if spec.dropout > 0 else nn.Identity()
        self.merged = False
        self.trainable = bool(trainable)
        self.config: FLoRAConfig | None = None
        if initial is not None:
            _check_tucker(spec, *initial, "initial ")
            self.register_buffer("initial_core", initial[0].detach().clone())
            for n, factor in enumerate(initial[1]):
                self.register_buffer(f"initial_factor_{n}", factor.detach().clone())

    @classmethod
    def create(
        cls, spec: LayerSpec, weight: torch.Tensor, *, trainable: bool = True
    ) -> TuckerDelta:
        """A new adapter for ``weight``, initialized as ``spec.init`` says (see :mod:`flora.init`).

        Parameters
        ----------
        spec : LayerSpec
            ``spec.shape`` must be ``weight.shape``.
        weight : torch.Tensor
            The current base weight: its dtype and device set the adapter's
            (float32 for half precision); ``init="hosvd"`` decomposes it.
        trainable : bool, optional
            See the class.

        Returns
        -------
        TuckerDelta

        Raises
        ------
        ValueError
            If the shapes differ, or ``init="hosvd"`` meets a weight with NaN
            or infinite entries or a meta tensor (which holds no values).
        TypeError
            If the weight is not floating point.
        """
        _check_weight(weight)
        if tuple(weight.shape) != spec.shape:
            raise ValueError(
                f"the spec is for shape {spec.shape}, the weight has {tuple(weight.shape)}"
            )
        options = {"dtype": adapter_dtype(weight.dtype), "device": weight.device}
        bias = torch.zeros(spec.shape[0], **options) if spec.bias else None
        if spec.init == "hosvd":
            if weight.is_meta:
                raise ValueError(
                    "init='hosvd' decomposes the weight, but it is a meta tensor: meta tensors "
                    "have a shape but hold no values; load the weights first, or use "
                    "init='zero_core'"
                )
            if not bool(torch.isfinite(weight).all()):
                raise ValueError(
                    "init='hosvd' needs a finite weight; this one has NaN or inf entries"
                )
            core, factors = hosvd_init(weight, spec.ranks, spec.scale, options["dtype"])
            return cls(spec, core, factors, initial=(core, factors), bias=bias, trainable=trainable)
        if spec.init == "balanced":
            core, factors = balanced_init(spec.kind, spec.shape, spec.ranks, **options)
            return cls(spec, core, factors, bias=bias, trainable=trainable)
        sizes = zip(spec.shape, spec.ranks, strict=True)
        factors = [torch.empty(size, rank, **options) for size, rank in sizes]
        init_factors(factors, spec.init)
        core = torch.zeros(spec.ranks, **options)
        return cls(spec, core, factors, bias=bias, trainable=trainable)

    @classmethod
    def from_tucker(
        cls,
        kind: str,
        core: torch.Tensor,
        factors: Sequence[torch.Tensor],
        *,
        scale: float = 1.0,
        forward: str = "auto",
        dropout: float = 0.0,
        bias: torch.Tensor | None = None,
        trainable: bool = True,
    ) -> TuckerDelta:
        r"""An adapter holding :math:`\Delta W = s \cdot G \times_0 U_0 \dots \times_{N-1} U_{N-1}`.

        Modes whose rank exceeds what the tensor can use are compressed
        without loss first (reduced QR of the factor times the core's
        unfolding), so the spec's ranks are usable; ``ΔW`` is unchanged up to
        rounding. The adapter has ``init="zero_core"`` (no initial update).

        Parameters
        ----------
        kind : str
            The layer kind (``"Linear"``, ``"Conv2d"``, ..., ``"Parameter"``).
        core : torch.Tensor
            Floating tensor of shape :math:`(R_0, \dots, R_{N-1})`.
        factors : sequence of torch.Tensor
            ``factors[n]`` of shape ``(I_n, R_n)``, same dtype as ``core``.
        scale, forward, dropout : optional
            As in :class:`flora.LayerSpec`.
        bias : torch.Tensor, optional
            A bias update ``Δb`` of shape ``(I_0,)`` (Linear and ConvNd),
            added to the layer's bias as it is (not multiplied by ``scale``).
        trainable : bool, optional
            See the class.

        Returns
        -------
        TuckerDelta

        Raises
        ------
        ValueError
            If the shapes do not chain, the tensors are not floating point,
            or ``bias`` is given for another kind or has another shape.

        Examples
        --------
        >>> import torch
        >>> from flora import TuckerDelta
        >>> b, a = torch.randn(2, 6), torch.randn(6, 5)  # a rank-6 LoRA pair on a 2x5 weight
        >>> delta = TuckerDelta.from_tucker("Linear", torch.eye(6), [b, a.T], scale=0.5)
        >>> delta.spec.ranks
        (2, 2)
        >>> torch.allclose(delta.delta_weight(), 0.5 * b @ a, atol=1e-5)
        True
        """
        factors = list(factors)
        ranks = [f.shape[1] if f.ndim == 2 else -1 for f in factors]
        if core.ndim != len(factors) or list(core.shape) != ranks:
            raise ValueError(
                f"factors must have shapes (I_n, R_n) with R_n the core's shape "
                f"{tuple(core.shape)}, got {[tuple(f.shape) for f in factors]}"
            )
        if not all(t.is_floating_point() for t in (core, *factors)):
            raise ValueError("core and factors must be floating-point tensors")
        core, factors = compress(core.detach(), [f.detach() for f in factors])
        shape = tuple(f.shape[0] for f in factors)
        has_bias = bias is not None
        spec = LayerSpec(
            kind, shape, tuple(core.shape), scale, "zero_core", forward, dropout, has_bias
        )
        return cls(spec, core, factors, bias=bias, trainable=trainable)

    @property
    def initial(self) -> tuple[torch.Tensor, list[torch.Tensor]] | None:
        """The initial core and factors (``init="hosvd"``), else None."""
        if self.spec.init != "hosvd":
            return None
        factors = [getattr(self, f"initial_factor_{n}") for n in range(len(self.spec.shape))]
        return self.initial_core, factors

    def delta_weight(self) -> torch.Tensor:
        r""":math:`\Delta W = s \cdot G \times_0 U_0 \dots \times_{N-1} U_{N-1}`, adapter dtype.

        Layers apply their own masks on top (:meth:`flora.AdaptedWeight.delta_weight`).
        """
        return reconstruct(self.core * self.spec.scale, list(self.factors))

    @property
    def merged(self) -> bool:
        """Whether this adapter is merged into its layer's base weight.

        Setting it True keeps a copy of the core, factors and bias update as
        they are (non-persistent buffers, which follow ``.to()``), so that
        unmerging subtracts the update that was merged even if the adapter
        changed since (an optimizer step, ``load_state_dict``).
        """
        return self._buffers.get("at_merge_core") is not None

    @merged.setter
    def merged(self, value: bool) -> None:
        parts: list[tuple[str, torch.Tensor | None]] = [("at_merge_core", self.core)]
        parts += [(f"at_merge_factor_{n}", f) for n, f in enumerate(self.factors)]
        parts.append(("at_merge_bias", self.bias))
        for name, tensor in parts:
            kept = tensor.detach().clone() if value and tensor is not None else None
            self.register_buffer(name, kept, persistent=False)

    def merged_delta(self) -> torch.Tensor:
        """``ΔW`` as it was merged (see :attr:`merged`), in the adapter's dtype."""
        factors = [self._buffers[f"at_merge_factor_{n}"] for n in range(len(self.spec.shape))]
        return reconstruct(self._buffers["at_merge_core"] * self.spec.scale, factors)

    def merged_bias(self) -> torch.Tensor | None:
        """``Δb`` as it was merged, or None."""
        return self._buffers.get("at_merge_bias")

    def initial_delta(self) -> torch.Tensor | None:
        """``ΔW`` at initialization for ``init="hosvd"`` (what the base gave up), else None."""
        initial = self.initial
        if initial is None:
            return None
        return reconstruct(initial[0] * self.spec.scale, initial[1])

    def extra_repr(self) -> str:
        """The spec's ranks and options, and the merge state, for ``repr``."""
        spec = self.spec
        return (
            f"ranks={spec.ranks}, scale={spec.scale}, init={spec.init!r}, "
            f"forward={spec.forward!r}, {'bias=True, ' if spec.bias else ''}merged={self.merged}"
        )


def _check_bias(spec: LayerSpec, bias: torch.Tensor | None) -> None:
    if (bias is not None) != spec.bias:
        raise ValueError("a bias update is given exactly for specs with bias=True")
    if bias is not None and (tuple(bias.shape) != spec.shape[:1] or not bias.is_floating_point()):
        raise ValueError(
            f"the bias update must be a floating tensor of shape {spec.shape[:1]}, got "
            f"{bias.dtype} {tuple(bias.shape)}"
        )


def _check_tucker(
    spec: LayerSpec, core: torch.Tensor, factors: Sequence[torch.Tensor], what: str
) -> None:
    shapes = [tuple(f.shape) for f in factors]
    expected = [(s, r) for s, r in zip(spec.shape, spec.ranks, strict=True)]
    if tuple(core.shape) != spec.ranks or shapes != expected:
        raise ValueError(
            f"{what}core and factors must have shapes {spec.ranks} and {expected} for "
            f"{spec}, got {tuple(core.shape)} and {shapes}"
        )


class AdaptedWeight(nn.Module):
    """A weight with named FLoRA adapters: the shared base of layers and parametrizations.

    Attributes
    ----------
    adapters : torch.nn.ModuleDict
        Adapter name to :class:`~flora.TuckerDelta`.
    active_adapters : tuple of str
        The names set active (with :func:`flora.set_adapter`); names this
        weight lacks are skipped.
    disabled : bool
        Inside :func:`flora.disable_adapter`: no adapter runs.

    Notes
    -----
    ``core``, ``factors``, ``ranks``, ``scale``, ``init``, ``spec`` and
    ``n_adapter_params`` are those of the one active adapter (an error when
    several are active: use ``adapters[name]``).

    Examples
    --------
    >>> import torch
    >>> import flora
    >>> layer = flora.Linear(torch.nn.Linear(6, 4), ranks=2)
    >>> spec = flora.LayerSpec.from_template("Linear", layer.shape, 3)
    >>> layer.add_adapter("wide", flora.TuckerDelta.create(spec, layer.base_weight()))
    >>> layer.adapter_names, layer.active_adapters
    (('default', 'wide'), ('default',))
    >>> layer.set_adapter("wide")
    >>> layer.ranks
    (3, 3)
    """

    kind: str = ""

    def __init__(self) -> None:
        super().__init__()
        self.adapters = nn.ModuleDict()
        self.active_adapters: tuple[str, ...] = ()
        self.disabled = False

    def base_weight(self) -> torch.Tensor:
        """The base weight the adapters update (frozen)."""
        raise NotImplementedError

    def base_bias(self) -> torch.Tensor | None:
        """The base bias that bias updates change (frozen), or None if there is none."""
        return None

    @property
    def shape(self) -> tuple[int, ...]:
        """The adapted weight's shape."""
        return tuple(self.base_weight().shape)

    def _mask(self, delta: torch.Tensor) -> torch.Tensor:
        """The part of an update the layer applies (all of it, except where a subclass says)."""
        return delta

    @property
    def adapter_names(self) -> tuple[str, ...]:
        """Names of this weight's adapters, in the order they were added."""
        return tuple(self.adapters.keys())

    @property
    def merged_adapters(self) -> tuple[str, ...]:
        """Names of the adapters whose ``ΔW`` is in the base weight."""
        return tuple(name for name, a in self.adapters.items() if a.merged)

    @property
    def merged(self) -> bool:
        """Whether any adapter is merged."""
        return any(a.merged for a in self.adapters.values())

    def adapter(self, name: str | None = None) -> TuckerDelta:
        """The adapter called ``name``, or the one active adapter.

        Raises
        ------
        ValueError
            If ``name`` is unknown, or it is None and not exactly one
            adapter of this weight is active.
        """
        if name is None:
            active = [n for n in self.active_adapters if n in self.adapters]
            if len(active) != 1:
                raise ValueError(
                    f"{len(active)} adapters of this layer are active ({active}); "
                    f"name one of {list(self.adapters)}"
                )
            name = active[0]
        if name not in self.adapters:
            raise ValueError(f"no adapter {name!r}; this layer has {list(self.adapters)}")
        return self.adapters[name]

    @property
    def spec(self) -> LayerSpec:
        """The active adapter's spec."""
        return self.adapter().spec

    @property
    def core(self) -> nn.Parameter:
        """The active adapter's core."""
        return self.adapter().core

    @property
    def factors(self) -> nn.ParameterList:
        """The active adapter's factors."""
        return self.adapter().factors

    @property
    def ranks(self) -> tuple[int, ...]:
        """The active adapter's ranks."""
        return self.spec.ranks

    @property
    def scale(self) -> float:
        """The active adapter's scale."""
        return self.spec.scale

    @property
    def init(self) -> str:
        """The active adapter's init."""
        return self.spec.init

    @property
    def n_adapter_params(self) -> int:
        """Entries of the active adapter's core and factors."""
        return self.spec.n_params

    def delta_weight(self, adapter_name: str | None = None) -> torch.Tensor:
        """``ΔW`` of an adapter (default: the active one) as the layer applies it.

        Returns
        -------
        torch.Tensor
            Shape of the base weight, in the adapter's dtype; differentiable
            in its core and factors.
        """
        return self._mask(self.adapter(adapter_name).delta_weight())

    def initial_delta(self, adapter_name: str | None = None) -> torch.Tensor | None:
        """What an ``init="hosvd"`` adapter took out of the base weight, else None."""
        delta = self.adapter(adapter_name).initial_delta()
        return None if delta is None else self._mask(delta)

    def _terms(
        self, active: tuple[str, ...] | None = None
    ) -> tuple[list[TuckerDelta], list[TuckerDelta]]:
        """(adapters that run, adapters whose initial update is given back).

        For the active adapters, or those of ``active`` (a routed group).
        """
        running, idle = [], []
        runs = self.active_adapters if active is None else active
        for name, adapter in self.adapters.items():
            if adapter.merged:
                continue
            if (active is not None or not self.disabled) and name in runs:
                running.append(adapter)
            elif adapter.spec.init == "hosvd":
                idle.append(adapter)
        return running, idle

    def effective_delta(self) -> torch.Tensor | None:
        """What the adapters add to the base weight now (None if nothing).

        The running adapters' ``ΔW`` plus the initial updates of the
        ``init="hosvd"`` adapters that do not run.
        """
        running, idle = self._terms()
        return self._sum([a.delta_weight() for a in running] + [a.initial_delta() for a in idle])

    def _add_to_base(self, delta: torch.Tensor, sign: float) -> None:
        weight = self.base_weight()
        with torch.no_grad():
            # One rounding to the base dtype, from the adapter's (>= float32) precision.
            self._write_base((weight.to(delta.dtype) + sign * delta).to(weight.dtype))

    def _write_base(self, value: torch.Tensor) -> None:
        """Store ``value`` (in :meth:`base_weight`'s layout and dtype) as the base weight."""
        self.base_weight().copy_(value)

    def _sum(self, deltas: Iterable[torch.Tensor | None]) -> torch.Tensor | None:
        present = [d for d in deltas if d is not None]
        if not present:
            return None
        return self._mask(functools.reduce(operator.add, present))

    @staticmethod
    def _bias_sum(adapters: Iterable[TuckerDelta]) -> torch.Tensor | None:
        r""":math:`\sum \Delta b` of the adapters that carry a bias update (None if none does)."""
        present = [a.bias for a in adapters if a.bias is not None]
        return functools.reduce(operator.add, present) if present else None

    def _add_to_base_bias(self, delta: torch.Tensor | None, sign: float) -> None:
        bias = self.base_bias()
        if delta is None or bias is None:
            return
        with torch.no_grad():
            bias.copy_((bias.to(delta.dtype) + sign * delta).to(bias.dtype))

    def effective_bias(self) -> torch.Tensor | None:
        """The bias the layer computes with now, in the base dtype (a new tensor; None if none).

        The base bias plus ``Δb`` of the running adapters that carry one.
        """
        bias = self.base_bias()
        if bias is None:
            return None
        with torch.no_grad():
            delta = self._bias_sum(self._terms()[0])
            if delta is None:
                return bias.detach().clone()
            return (bias.detach().to(delta.dtype) + delta).to(bias.dtype)

    def add_adapter(self, name: str, adapter: TuckerDelta) -> None:
        """Add ``adapter`` under ``name``, inactive until :meth:`set_adapter` names it.

        An ``init="hosvd"`` adapter's initial update is taken out of the base
        weight, so the layer's output does not change.

        Raises
        ------
        ValueError
            If the name is invalid or taken, the adapter's spec is for
            another kind or shape, or it carries a bias update and the layer
            has no bias.
        """
        check_adapter_name(name)
        if name in self.adapters:
            raise ValueError(f"this layer already has an adapter {name!r}")
        if adapter.spec.kind != self.kind or adapter.spec.shape != self.shape:
            raise ValueError(
                f"the adapter is for a {adapter.spec.kind} of shape {adapter.spec.shape}, "
                f"this layer is a {self.kind} of shape {self.shape}"
            )
        if adapter.spec.bias and self.base_bias() is None:
            raise ValueError("the adapter carries a bias update, but this layer has no bias")
        with torch.no_grad():
            initial = adapter.initial_delta()
            if initial is not None:
                self._add_to_base(self._mask(initial), -1.0)
        self.adapters[name] = adapter
        adapter.requires_grad_(adapter.trainable and name in self.active_adapters)

    def remove_adapter(self, name: str) -> TuckerDelta:
        """Take adapter ``name`` out: unmerged first, its initial update given back.

        Returns
        -------
        TuckerDelta
            The removed adapter.
        """
        adapter = self.adapter(name)
        with torch.no_grad():
            back = self._sum(
                [adapter.initial_delta(), -adapter.merged_delta() if adapter.merged else None]
            )
            if back is not None:
                self._add_to_base(back, 1.0)
            if adapter.merged:
                self._add_to_base_bias(adapter.merged_bias(), -1.0)
        adapter.merged = False
        del self.adapters[name]
        return adapter

    def set_adapter(self, names: str | Sequence[str]) -> None:
        """Make ``names`` the active adapters of this layer (each must exist here).

        Active adapters run and, when trainable, require gradients; the
        others do neither.

        Raises
        ------
        ValueError
            If a name is not an adapter of this layer or the list is empty.
        """
        names = (names,) if isinstance(names, str) else tuple(names)
        unknown = [n for n in names if n not in self.adapters]
        if unknown or not names:
            raise ValueError(f"set_adapter needs names among {list(self.adapters)}, got {names}")
        self._set_active(names)

    def _set_active(self, names: tuple[str, ...]) -> None:
        self.active_adapters = names
        for name, adapter in self.adapters.items():
            adapter.requires_grad_(adapter.trainable and name in names)

    def _merge_names(self, adapter_names: Sequence[str] | None) -> list[str]:
        if adapter_names is None:
            return [n for n in self.active_adapters if n in self.adapters]
        unknown = [n for n in adapter_names if n not in self.adapters]
        if unknown:
            raise ValueError(f"no adapters {unknown}; this layer has {list(self.adapters)}")
        return list(adapter_names)

    def check_merge(self, adapter_names: Sequence[str] | None = None, *, safe: bool = True) -> None:
        """Raise what :meth:`flora.AdaptedWeight.merge` would raise, changing nothing.

        Raises
        ------
        RuntimeError
            If a named adapter is already merged.
        ValueError
            If a name is unknown or the base weight is a meta tensor; with
            ``safe``, if ``ΔW`` or ``W + ΔW`` (in the base dtype), or the
            merged bias, has NaN or infinite entries.
        """
        names = self._merge_names(adapter_names)
        merged = [n for n in names if self.adapters[n].merged]
        if merged:
            raise RuntimeError(f"adapters {merged} are already merged; call unmerge() first")
        if names and self.base_weight().is_meta:
            raise ValueError(
                "the base weight is a meta tensor (a shape without values): there is nothing "
                "to merge into; load the weights first"
            )
        if not safe or not names:
            return
        with torch.no_grad():
            delta = self._sum(self.adapters[n].delta_weight() for n in names)
            weight = self.base_weight()
            totals = [delta, (weight.to(delta.dtype) + delta).to(weight.dtype)]
            bias, bias_delta = self.base_bias(), self._bias_sum(self.adapters[n] for n in names)
            if bias is not None and bias_delta is not None:
                totals.append((bias.to(bias_delta.dtype) + bias_delta).to(bias.dtype))
            if not all(bool(torch.isfinite(t).all()) for t in totals):
                raise ValueError(
                    f"merging {names} would put NaN or infinite values into the weight; "
                    "nothing was merged (merge with safe=False to force it)"
                )

    def merge(self, adapter_names: Sequence[str] | None = None, *, safe: bool = True) -> None:
        """Add ``ΔW`` (and ``Δb``) of the active (or named) adapters into the base weight and bias.

        Merged adapters run no branch; the output stays the same up to
        rounding (one rounding to the base dtype for all of them together).

        Parameters
        ----------
        adapter_names : sequence of str, optional
            Default: the active adapters.
        safe : bool, optional
            Refuse (and change nothing) if the merged weight would hold NaN
            or infinite values.

        Raises
        ------
        RuntimeError
            If a named adapter is already merged.
        ValueError
            See :meth:`flora.AdaptedWeight.check_merge`.
        """
        self.check_merge(adapter_names, safe=safe)
        names = self._merge_names(adapter_names)
        with torch.no_grad():
            delta = self._sum(self.adapters[n].delta_weight() for n in names)
            if delta is not None:
                self._add_to_base(delta, 1.0)
            self._add_to_base_bias(self._bias_sum(self.adapters[n] for n in names), 1.0)
        for name in names:
            self.adapters[name].merged = True

    @staticmethod
    def _merged_bias_sum(adapters: Iterable[TuckerDelta]) -> torch.Tensor | None:
        r""":math:`\sum \Delta b` as merged, of the merged adapters that carry a bias update."""
        present = [b for a in adapters if (b := a.merged_bias()) is not None]
        return functools.reduce(operator.add, present) if present else None

    def unmerge(self) -> None:
        """Subtract ``ΔW`` (and ``Δb``) of every merged adapter from the base weight again.

        What is subtracted is the update as it was merged, even if the
        adapter changed since (an optimizer step, ``load_state_dict``): the
        base weight is then what unmerging an unchanged adapter gives.

        Raises
        ------
        RuntimeError
            If no adapter is merged.
        """
        names = self.merged_adapters
        if not names:
            raise RuntimeError(f"{type(self).__name__} is not merged; nothing to unmerge")
        with torch.no_grad():
            self._add_to_base(self._sum(self.adapters[n].merged_delta() for n in names), -1.0)
            self._add_to_base_bias(self._merged_bias_sum(self.adapters[n] for n in names), -1.0)
        for name in names:
            self.adapters[name].merged = False

    def restore_base(self) -> None:
        """Undo everything done to the base weight: unmerge, give back initial updates.

        After this the base weight (and bias) is the original again: bitwise
        when nothing was ever merged and no adapter is ``"hosvd"``, else to
        rounding.
        """
        with torch.no_grad():
            back = self._sum(
                [a.initial_delta() for a in self.adapters.values()]
                + [-a.merged_delta() for a in self.adapters.values() if a.merged]
            )
            if back is not None:
                self._add_to_base(back, 1.0)
            merged = [a for a in self.adapters.values() if a.merged]
            self._add_to_base_bias(self._merged_bias_sum(merged), -1.0)
        for adapter in self.adapters.values():
            adapter.merged = False

    def merge_effective(self) -> None:
        """Put what the adapters add now (``effective_delta()``, and ``Δb``) into the base.

        Used before the adapters are dropped: the base weight (and bias) then
        computes what the layer computes.
        """
        with torch.no_grad():
            delta = self.effective_delta()
            if delta is not None:
                self._add_to_base(delta, 1.0)
            self._add_to_base_bias(self._bias_sum(self._terms()[0]), 1.0)
        for adapter in self.adapters.values():
            adapter.merged = False

    def effective_weight(self) -> torch.Tensor:
        """The weight the layer computes with now, in the base dtype (a new tensor)."""
        weight = self.base_weight().detach()
        with torch.no_grad():
            delta = self.effective_delta()
            if delta is None:
                return weight.clone()
            return (weight.to(delta.dtype) + delta).to(weight.dtype)

    def extra_repr(self) -> str:
        """Active adapters and the merged ones, for ``repr``."""
        return f"active={list(self.active_adapters)}, merged={list(self.merged_adapters)}"


class FLoRALayer(AdaptedWeight):
    """Base class of the module wrappers: ``base_layer(x)`` plus the adapter branches.

    Parameters
    ----------
    base_layer : torch.nn.Module
        The wrapped module; its parameters are frozen.
    ranks : int or sequence of int or None, optional
        Rank template, clipped to the weight's shape and to the usable
        ranks; by default :data:`flora.DEFAULT_RANKS` of the subclass's ``kind``.
    scale : float, optional
        The factor ``s``.
    dropout : float, optional
        Dropout probability on the branch input.
    init : {"auto", "balanced", "zero_core", "hosvd", "gaussian"}, optional
        See :mod:`flora.init`.
    forward : {"auto", "dense", "factorized"}, optional
        How the branch runs; see :doc:`/flora_math`.
    adapter_name : str or None, optional
        Name of the adapter created; ``None`` creates the wrapper without
        adapters (add them with :meth:`flora.AdaptedWeight.add_adapter`).

    Notes
    -----
    Subclasses say how to run an adapter's branch factorized, dense or fused
    into the base op, and which ops each runs, for the cost model of
    ``forward="auto"`` (see :doc:`/flora_math`).

    Examples
    --------
    >>> import torch
    >>> import flora
    >>> layer = flora.Linear(torch.nn.Linear(1024, 1024))
    >>> isinstance(layer, flora.FLoRALayer), layer.choose_forward(torch.randn(1, 1024))
    (True, 'factorized')
    """

    base_type: type[nn.Module] = nn.Module

    def __init__(
        self,
        base_layer: nn.Module,
        ranks: RankTemplate | _KindDefault = KIND_DEFAULT,
        *,
        scale: float = 1.0,
        dropout: float = 0.0,
        init: str = "auto",
        forward: str = "auto",
        adapter_name: str | None = "default",
    ):
        kind = record_of(base_layer, self.kind)
        if kind is None:
            raise TypeError(
                f"flora.{type(self).__name__} wraps a {layer_kind(self.kind).describe()}, "
                f"got {type(base_layer).__name__}"
            )
        weight = kind.read_weight(base_layer)
        adapter = None
        if adapter_name is not None:
            check_adapter_name(adapter_name)
            template = DEFAULT_RANKS[self.kind] if isinstance(ranks, _KindDefault) else ranks
            spec = LayerSpec.from_template(
                self.kind,
                tuple(weight.shape),
                template,
                scale=scale,
                init=init,
                forward=forward,
                dropout=dropout,
            )
            adapter = TuckerDelta.create(spec, weight)
        super().__init__()
        self.base_layer = base_layer
        # The registry record of the base's type: how its weight is read and written.
        self._kind_record = kind
        # Per-sample routes of the forwards running now, by thread (flora._routing).
        self._routes: dict[int, tuple[Route, str]] = {}
        if adapter is not None:
            base_layer.requires_grad_(False)
            self.add_adapter(adapter_name, adapter)
            self._set_active((adapter_name,))

    def base_weight(self) -> torch.Tensor:
        """The wrapped module's weight, as the update's map (its kind's ``read_weight``)."""
        return self._kind_record.read_weight(self.base_layer)

    def _write_base(self, value: torch.Tensor) -> None:
        self._kind_record.write_weight(self.base_layer, value)

    def base_bias(self) -> torch.Tensor | None:
        """The wrapped module's bias, if it has one."""
        return getattr(self.base_layer, "bias", None)

    @property
    def weight(self) -> torch.Tensor:
        """The wrapped module's weight (code that reads ``module.weight`` keeps working)."""
        return self.base_layer.weight

    @property
    def bias(self) -> torch.Tensor | None:
        """The wrapped module's bias."""
        return self.base_layer.bias

    @property
    def forward_mode(self) -> str:
        """The active adapter's ``forward`` option; settable."""
        return self.spec.forward

    @forward_mode.setter
    def forward_mode(self, mode: str) -> None:
        adapter = self.adapter()
        adapter.spec = dataclasses.replace(adapter.spec, forward=mode)

    @property
    def factorizable(self) -> bool:
        """Whether the factorized forward applies to this layer (e.g. not for groups > 1)."""
        return True

    def _dropout_off(self, adapter: TuckerDelta) -> bool:
        return isinstance(adapter.dropout, nn.Identity) or not self.training

    def _fusable_delta(self, delta: torch.Tensor) -> bool:
        # W + ΔW in one op is exact only in the base's own dtype.
        return delta.dtype == self.base_weight().dtype

    def _fusable(self, adapter: TuckerDelta, delta: torch.Tensor) -> bool:
        return self._dropout_off(adapter) and self._fusable_delta(delta)

    def choose_forward(self, x: torch.Tensor, adapter_name: str | None = None) -> str:
        """The branch computation an adapter uses for input ``x``: ``"dense"`` or ``"factorized"``.

        With ``forward="auto"`` the cheaper under a roofline cost model of the
        ops each path runs (multiply-adds against the elements they read and
        write), counting the backward pass when gradients flow (see
        :doc:`/flora_math`).
        """
        return self._choose(self.adapter(adapter_name), x)

    def _choose(self, adapter: TuckerDelta, x: torch.Tensor) -> str:
        spec = adapter.spec
        if not self.factorizable or spec.forward == "dense":
            return "dense"
        if spec.forward == "factorized":
            return "factorized"
        training = torch.is_grad_enabled() and adapter.core.requires_grad
        # A dynamic-shape compile sees symbolic sizes: the choice is for their
        # example values. It is a speed heuristic (both paths compute ΔW x),
        # so it needs no guard of its own.
        shape = tuple([optimization_hint(size) for size in x.shape])
        return _static_choice(
            type(self),
            self._geometry(),
            spec.shape,
            spec.ranks,
            shape,
            self._fusable(adapter, adapter.core),
            training,
            training and x.requires_grad,
        )

    def _geometry(self) -> tuple:
        """The base layer's settings besides its weight shape that the op costs depend on."""
        return ()

    def _cast_input(self, x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        return cast(x, dtype)

    def _branch_input(self, x: torch.Tensor, adapter: TuckerDelta) -> torch.Tensor:
        if not isinstance(adapter.dropout, nn.Identity):
            x = adapter.dropout(x)
        return self._cast_input(x, adapter.core.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``base_layer(x)`` plus the branches (and ``Δb``) of the active, unmerged adapters.

        In a forward routed per sample (``model(..., adapter_names=[...])``)
        each sample runs as if its adapter alone were active.
        """
        route = routed(self._routes)
        if route is not None:
            return self._forward_routed(x, *route)
        return self._forward_terms(x, *self._terms())

    def _forward_routed(self, x: torch.Tensor, route: Route, where: str) -> torch.Tensor:
        groups = {}
        for name, _ in route.groups:
            running, idle = self._terms(() if name == BASE else (name,))
            groups[name] = (tuple(id(a) for a in running), running, idle)
        keys = [groups[name][0] for name, _ in route.groups]
        terms = {key: (running, idle) for key, running, idle in groups.values()}
        return route.run(where, x, keys, lambda key, xs: self._forward_terms(xs, *terms[key]))

    def _forward_terms(
        self, x: torch.Tensor, running: list[TuckerDelta], idle: list[TuckerDelta]
    ) -> torch.Tensor:
        if not idle and not running:
            return self.base_layer(x)
        if not idle and len(running) == 1:
            out = self._forward_one(x, running[0])
        else:
            out = self._forward_many(x, running, idle)
        bias = self._bias_sum(running)
        return out if bias is None else out + cast(self._bias_view(bias), out.dtype)

    def _bias_view(self, bias: torch.Tensor) -> torch.Tensor:
        """``Δb`` shaped to broadcast over the output (its last axis, by default)."""
        return bias

    def _forward_one(self, x: torch.Tensor, adapter: TuckerDelta) -> torch.Tensor:
        if self._choose(adapter, x) == "factorized":
            out = self.base_layer(x)
            return out + cast(self._factorized(self._branch_input(x, adapter), adapter), out.dtype)
        delta = self._mask(adapter.delta_weight())
        if self._fusable(adapter, delta):
            return self._fused(x, delta)
        out = self.base_layer(x)
        return out + cast(self._dense(self._branch_input(x, adapter), delta), out.dtype)

    def _forward_many(
        self, x: torch.Tensor, running: list[TuckerDelta], idle: list[TuckerDelta]
    ) -> torch.Tensor:
        # Dense adapters without active dropout share one ΔW (fused into the
        # base op when dtypes allow); the rest run a branch each.
        separate = []
        shared: list[torch.Tensor | None] = [a.initial_delta().detach() for a in idle]
        for adapter in running:
            mode = self._choose(adapter, x)
            if mode == "dense" and self._dropout_off(adapter):
                shared.append(adapter.delta_weight())
            else:
                separate.append((adapter, mode))
        delta = self._sum(shared)
        if delta is not None and self._fusable_delta(delta):
            out = self._fused(x, delta)
        else:
            out = self.base_layer(x)
            if delta is not None:
                out = out + cast(self._dense(self._cast_input(x, delta.dtype), delta), out.dtype)
        for adapter, mode in separate:
            branch_input = self._branch_input(x, adapter)
            if mode == "factorized":
                branch = self._factorized(branch_input, adapter)
            else:
                branch = self._dense(branch_input, self._mask(adapter.delta_weight()))
            out = out + cast(branch, out.dtype)
        return out

    def _factorized(self, x: torch.Tensor, adapter: TuckerDelta) -> torch.Tensor:
        raise NotImplementedError

    def _dense(self, x: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _fused(self, x: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    @classmethod
    def _ops(
        cls, geometry: tuple, shape: tuple[int, ...], x_shape: tuple[int, ...], ranks: Sequence[int]
    ) -> tuple[list[Op], Op, int, int]:
        """(factorized branch ops, the dense op on ``ΔW``, input and output elements).

        For a weight of ``shape``, an input of ``x_shape`` and the base
        layer's :meth:`_geometry`.
        """
        raise NotImplementedError


def _auto_choice(
    layer: type[FLoRALayer],
    geometry: tuple,
    shape: tuple[int, ...],
    ranks: tuple[int, ...],
    x_shape: tuple[int, ...],
    fused: bool,
    training: bool,
    input_grad: bool,
) -> str:
    """The cost model's choice (``forward="auto"``) for one layer type, shape and mode."""
    factorized, dense_op, in_elements, out_elements = layer._ops(geometry, shape, x_shape, ranks)
    return choose(
        factorized,
        dense_op,
        reconstruction_ops(shape, ranks),
        weight_elements=math.prod(shape),
        in_elements=in_elements,
        out_elements=out_elements,
        fused=fused,
        training=training,
        input_grad=input_grad,
    )


_cached_choice = functools.lru_cache(maxsize=4096)(_auto_choice)


@torch.compiler.assume_constant_result
def _static_choice(*decision: object) -> str:
    """:func:`_auto_choice`, cached: a constant for ``torch.compile``.

    The arguments are plain constants (sizes, flags, the spec's tuples) that
    the compiler guards on where the forward reads them (input shapes, grad
    mode, ``requires_grad``, the adapter's spec), so it takes the result as
    a constant instead of tracing the rule.
    """
    return _cached_choice(*decision)
