r"""One FLoRA adapter: a trainable Tucker update of one weight, and the helpers adapters share.

:class:`~flora.TuckerDelta` holds a trainable ``core`` and ``factors`` with
:math:`\Delta W = s \cdot \text{core} \times_0 U_0 \dots \times_{N-1} U_{N-1}` and its
:class:`flora.LayerSpec`. :class:`~flora.AdaptedWeight` (:mod:`flora.layers.adapted`)
holds the named adapters of one weight; :class:`~flora.FLoRALayer`
(:mod:`flora.layers.base`) runs their branches beside a module.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from flora._tucker import reconstruct, to_usable_ranks
from flora.config import FLoRAConfig
from flora.init import balanced_init, hosvd_init, init_factors
from flora.spec import LayerSpec

__all__ = ["TuckerDelta", "adapter_dtype", "cast", "check_adapter_name", "scaled_core"]

_HALF = (torch.float16, torch.bfloat16)
_RESERVED = frozenset(dir(nn.ModuleDict()))


def adapter_dtype(dtype: torch.dtype) -> torch.dtype:
    """The adapter's dtype for a base weight of ``dtype``: float32 for half precision.

    Examples
    --------
    >>> import torch
    >>> from flora.layers.delta import adapter_dtype
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
    >>> from flora.layers.delta import check_adapter_name
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
    r""":math:`s \cdot \text{core}` of ``adapter`` (the core itself for ``s = 1``: one op less)."""
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

    With ``spec.bias`` it also holds a bias update :math:`\Delta b` (``bias``, shape
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
        The bias update :math:`\Delta b`, shape ``(spec.shape[0],)``; given exactly
        when ``spec.bias`` is true.
    trainable : bool, optional
        Whether the adapter's tensors require gradients while it is active.

    Attributes
    ----------
    spec : LayerSpec
    core : torch.nn.Parameter
    factors : torch.nn.ParameterList
    bias : torch.nn.Parameter or None
        :math:`\Delta b`, not multiplied by the scale.
    merged : bool
        Whether :math:`\Delta W` is currently added into the base weight.
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
        unfolding), so the spec's ranks are usable; :math:`\Delta W` is unchanged up to
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
            A bias update :math:`\Delta b` of shape ``(I_0,)`` (Linear and ConvNd),
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
        core, factors = to_usable_ranks(core.detach(), [f.detach() for f in factors])
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
        r""":math:`\Delta W` as it was merged (see :attr:`merged`), in the adapter's dtype."""
        factors = [self._buffers[f"at_merge_factor_{n}"] for n in range(len(self.spec.shape))]
        return reconstruct(self._buffers["at_merge_core"] * self.spec.scale, factors)

    def merged_bias(self) -> torch.Tensor | None:
        r""":math:`\Delta b` as it was merged, or None."""
        return self._buffers.get("at_merge_bias")

    def initial_delta(self) -> torch.Tensor | None:
        r""":math:`\Delta W` at initialization for ``init="hosvd"`` or None."""
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
