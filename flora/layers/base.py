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

try:
    from torch.fx.experimental.symbolic_shapes import optimization_hint
except ImportError:  # torch < 2.12: read the example value a symbolic size carries

    def optimization_hint(a: torch.SymInt | int, fallback: int | None = None) -> int:
        """The example value of a size, symbolic or not (``fallback`` if it has none)."""
        if isinstance(a, int):
            return a
        hint = a.node.hint
        return fallback if hint is None else int(hint)


from flora._cost import Op, choose, product, reconstruction_ops
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
    "Op",
    "TuckerDelta",
    "adapter_dtype",
    "cast",
    "check_adapter_name",
    "product",
    "scaled_core",
]


class _KindDefault:
    """The default ``ranks`` of a layer: :data:`flora.DEFAULT_RANKS` of its kind."""

    def __repr__(self) -> str:
        return "DEFAULT_RANKS[kind]"


KIND_DEFAULT = _KindDefault()


class FLoRALayer(AdaptedWeight):
    r"""Base class of the module wrappers: ``base_layer(x)`` plus the adapter branches.

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
    A subclass for a layer of its own (see :doc:`/layer_kinds`) sets
    ``kind`` and ``base_type`` and says how its branch runs, through public
    hooks the forward calls: :meth:`factorized_branch` (from the core and
    factors), :meth:`dense_branch` (on a built :math:`\Delta W`),
    :meth:`fused_forward` (the base op on :math:`W + \Delta W`), and, for the cost
    model of ``forward="auto"`` (see :doc:`/flora_math`),
    :meth:`branch_costs` with :meth:`cost_geometry`. A layer without a
    factorized form sets :attr:`factorizable` to False and needs only
    :meth:`dense_branch`.

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
            self.cost_geometry(),
            spec.shape,
            spec.ranks,
            shape,
            self._fusable(adapter, adapter.core),
            training,
            training and x.requires_grad,
        )

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
            return out + cast(
                self.factorized_branch(self._branch_input(x, adapter), adapter), out.dtype
            )
        delta = self._mask(adapter.delta_weight())
        if self._fusable(adapter, delta):
            return self.fused_forward(x, delta)
        out = self.base_layer(x)
        return out + cast(self.dense_branch(self._branch_input(x, adapter), delta), out.dtype)

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
            out = self.fused_forward(x, delta)
        else:
            out = self.base_layer(x)
            if delta is not None:
                out = out + cast(
                    self.dense_branch(self._cast_input(x, delta.dtype), delta), out.dtype
                )
        for adapter, mode in separate:
            branch_input = self._branch_input(x, adapter)
            if mode == "factorized":
                branch = self.factorized_branch(branch_input, adapter)
            else:
                branch = self.dense_branch(branch_input, self._mask(adapter.delta_weight()))
            out = out + cast(branch, out.dtype)
        return out

    def factorized_branch(self, x: torch.Tensor, adapter: TuckerDelta) -> torch.Tensor:
        r"""The branch :math:`\Delta W x` of ``adapter`` computed from its core and factors.

        A hook for subclasses: the forward calls it when the ``auto`` rule
        (or ``forward="factorized"``) picks the factorized branch and
        :attr:`factorizable` is true; it never builds :math:`\Delta W`. The core
        scaled by ``s`` is :func:`flora.layers.delta.scaled_core`.

        Parameters
        ----------
        x : torch.Tensor
            The branch input: the layer's input after the adapter's
            dropout, in the adapter's dtype.
        adapter : TuckerDelta
            The adapter whose branch runs (``adapter.factors``,
            ``adapter.spec``).

        Returns
        -------
        torch.Tensor
            The branch output, shaped like the base layer's output (the
            caller casts it to the output's dtype and adds it).

        Examples
        --------
        >>> import torch
        >>> import flora
        >>> layer = flora.Linear(torch.nn.Linear(6, 4), ranks=2, init="gaussian")
        >>> x = torch.randn(3, 6)
        >>> torch.allclose(layer.factorized_branch(x, layer.adapter()),
        ...                layer.dense_branch(x, layer.delta_weight()), atol=1e-6)
        True
        """
        raise NotImplementedError(
            f"{type(self).__name__} defines no factorized_branch; set factorizable to False "
            "or define it"
        )

    def dense_branch(self, x: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        r"""The branch of a built update: the base layer's op on ``x`` with ``delta``, no bias.

        A hook for subclasses: the forward calls it for the dense branch
        (an adapter with dropout, or whose :math:`\Delta W` cannot be fused into the
        base op), with ``delta`` in the update's ``(out, in, ...)`` map.

        Parameters
        ----------
        x : torch.Tensor
            The branch input (after the adapter's dropout), in ``delta``'s dtype.
        delta : torch.Tensor
            :math:`\Delta W` (one adapter's, or the sum of several), shaped like the
            update.

        Returns
        -------
        torch.Tensor
            The branch output, shaped like the base layer's output.

        Examples
        --------
        >>> import torch
        >>> import flora
        >>> layer = flora.Linear(torch.nn.Linear(6, 4))
        >>> layer.dense_branch(torch.ones(1, 6), torch.ones(4, 6))
        tensor([[6., 6., 6., 6.]])
        """
        raise NotImplementedError(f"{type(self).__name__} defines no dense_branch")

    def fused_forward(self, x: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        r"""The base layer's output with ``W + delta`` for its weight, bias included.

        A hook for subclasses: the forward calls it instead of the base
        layer plus :meth:`dense_branch` when no dropout is active and
        ``delta`` is in the base weight's dtype, so that one op runs
        instead of two. By default it is ``base_layer(x) + dense_branch(x,
        delta)``, correct for any layer linear in its weight; override it
        with the single op (``F.linear(x, W + delta, b)`` for a Linear).

        Parameters
        ----------
        x : torch.Tensor
            The layer's input.
        delta : torch.Tensor
            :math:`\Delta W` of the running adapters, in the base weight's dtype.

        Returns
        -------
        torch.Tensor
            The layer's output.

        Examples
        --------
        >>> import torch
        >>> import flora
        >>> base = torch.nn.Linear(6, 4)
        >>> layer = flora.Linear(base)
        >>> x, delta = torch.randn(2, 6), torch.randn(4, 6)
        >>> torch.allclose(layer.fused_forward(x, delta),
        ...                base(x) + layer.dense_branch(x, delta), atol=1e-6)
        True
        """
        return self.base_layer(x) + self.dense_branch(x, delta)

    def cost_geometry(self) -> tuple:
        """The base layer's settings besides its weight shape that the op costs depend on.

        A hook for subclasses: passed to :meth:`branch_costs` as
        ``geometry`` (a convolution's stride, padding, dilation and groups);
        it must be hashable. By default ``()``.

        Examples
        --------
        >>> import torch
        >>> import flora
        >>> flora.Conv2d(torch.nn.Conv2d(3, 8, 3, stride=2)).cost_geometry()
        ((2, 2), (0, 0), (1, 1), 1)
        """
        return ()

    @classmethod
    def branch_costs(
        cls, geometry: tuple, shape: tuple[int, ...], x_shape: tuple[int, ...], ranks: Sequence[int]
    ) -> tuple[list[Op], Op, int, int]:
        r"""The ops each branch runs, for the cost model of ``forward="auto"``.

        A hook for subclasses whose :attr:`factorizable` is true: the
        ``auto`` rule compares the factorized branch's ops with the dense
        op plus building :math:`\Delta W` (see :doc:`/flora_math`). Each op is an
        ``Op(macs, elements)``, its multiply-adds and the tensor elements it
        reads and writes (``flora.layers.base.Op``, a named tuple);
        ``flora.layers.base.product(m, k, n)`` is the op of an
        ``(m, k) @ (k, n)`` product.

        Parameters
        ----------
        geometry : tuple
            :meth:`cost_geometry` of the layer.
        shape : tuple of int
            The update's shape.
        x_shape : tuple of int
            The input's shape.
        ranks : sequence of int
            The adapter's ranks.

        Returns
        -------
        factorized : list of Op
            The ops of :meth:`factorized_branch`.
        dense : Op
            The op of :meth:`dense_branch` on a built :math:`\Delta W`.
        in_elements, out_elements : int
            The input's and the output's numbers of elements.

        Examples
        --------
        >>> import flora
        >>> costs = flora.Linear.branch_costs((), (16, 32), (5, 32), (4, 4))
        >>> factorized, dense, n_in, n_out = costs
        >>> len(factorized), dense.macs, n_in, n_out  # 5 tokens through a 32 -> 16 map
        (3, 2560, 160, 80)
        """
        raise NotImplementedError(
            f"{cls.__name__} defines no branch_costs, which forward='auto' needs; define it "
            "or give the adapters forward='dense' or 'factorized'"
        )


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
    factorized, dense_op, in_elements, out_elements = layer.branch_costs(
        geometry, shape, x_shape, ranks
    )
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
