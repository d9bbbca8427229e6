r"""What every FLoRA layer shares: a wrapped module whose weight holds named Tucker adapters.

:class:`~flora.FLoRALayer` wraps a module as ``base_layer`` and runs the
active adapters' branches next to it, dense or factorized as the ``auto``
rule decides; it is the :class:`~flora.AdaptedWeight`
(:mod:`flora.layers.adapted`) of that module's weight, whose adapters are
:class:`~flora.TuckerDelta` (:mod:`flora.layers.delta`).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Sequence

import torch
from torch import nn
from torch.fx.experimental.symbolic_shapes import optimization_hint

from flora._cost import Op, choose, reconstruction_ops
from flora.config import DEFAULT_RANKS
from flora.kinds import layer_kind, record_of
from flora.layers._route import BASE, Route, routed
from flora.layers.adapted import AdaptedWeight
from flora.layers.delta import TuckerDelta, adapter_dtype, cast, check_adapter_name, scaled_core
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


class _KindDefault:
    """The default ``ranks`` of a layer: :data:`flora.DEFAULT_RANKS` of its kind."""

    def __repr__(self) -> str:
        return "DEFAULT_RANKS[kind]"


KIND_DEFAULT = _KindDefault()


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
        r"""``base_layer(x)`` plus the branches (and :math:`\Delta b`) of active, unmerged adapters.

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
        r""":math:`\Delta b` shaped to broadcast over the output (its last axis, by default)."""
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
        r"""(factorized branch ops, the dense op on :math:`\Delta W`, input and output elements).

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
