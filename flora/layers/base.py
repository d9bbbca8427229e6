"""What every FLoRA layer shares: a Tucker-factored update and its merge logic.

:class:`TuckerDelta` owns the trainable ``core`` and ``factors`` of
``ΔW = s · core ×_0 U_0 … ×_{N-1} U_{N-1}`` and adds it into (or takes it
out of) a base weight. :class:`FLoRALayer` wraps a module as ``base_layer``
and picks, per call, how to run the adapter branch (dense or factorized).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from flora._cost import Op, choose, reconstruction_ops
from flora._tucker import reconstruct
from flora.config import DEFAULT_RANKS, FORWARD_MODES, INIT_MODES, RankTemplate, clip_ranks
from flora.init import hosvd_init, init_factors
from tuckerlib import tucker_params

__all__ = ["KIND_DEFAULT", "FLoRALayer", "TuckerDelta", "adapter_dtype"]

_HALF = (torch.float16, torch.bfloat16)


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


def _check_scale(scale: float) -> float:
    if isinstance(scale, bool) or not isinstance(scale, (int, float)):
        raise TypeError(f"scale must be a float, got {scale!r}")
    if not math.isfinite(scale) or scale == 0:
        raise ValueError(f"scale must be finite and non-zero, got {scale}")
    return float(scale)


class TuckerDelta(nn.Module):
    """A trainable Tucker update ``ΔW = s · core ×_0 U_0 … ×_{N-1} U_{N-1}`` of a weight.

    Base class of the FLoRA layers; it holds no base module itself.

    Parameters
    ----------
    weight : torch.Tensor
        The base weight ``W0`` of shape ``(I_0, ..., I_{N-1})``; read for
        its shape, dtype and device (and its values with ``init="hosvd"``).
    ranks : int or sequence of int or None
        Rank template, clipped to ``weight.shape`` (see :func:`flora.config.clip_ranks`).
    scale : float
        The factor ``s``.
    init : {"zero_core", "hosvd", "gaussian"}
        See :mod:`flora.init`.

    Attributes
    ----------
    core : torch.nn.Parameter
        Shape ``ranks``.
    factors : torch.nn.ParameterList
        ``factors[n]`` has shape ``(I_n, R_n)``.
    ranks : tuple of int
        The clipped ranks.
    merged : bool
        Whether ``ΔW`` is currently added into the base weight.
    """

    def __init__(self, weight: torch.Tensor, ranks: RankTemplate, *, scale: float, init: str):
        super().__init__()
        if init not in INIT_MODES:
            raise ValueError(f"init must be one of {INIT_MODES}, got {init!r}")
        if weight.ndim < 1:
            raise ValueError("weight must have at least one dimension, got a 0-D tensor")
        self.shape = tuple(int(s) for s in weight.shape)
        self.ranks = clip_ranks(ranks, self.shape)
        self.scale = _check_scale(scale)
        self.init = init
        self.merged = False
        options = {"dtype": adapter_dtype(weight.dtype), "device": weight.device}
        self.core = nn.Parameter(torch.zeros(self.ranks, **options))
        self.factors = nn.ParameterList(
            nn.Parameter(torch.empty(size, rank, **options))
            for size, rank in zip(self.shape, self.ranks, strict=True)
        )
        if init == "hosvd":
            core, factors = hosvd_init(weight, self.ranks, self.scale, options["dtype"])
            with torch.no_grad():
                self.core.copy_(core)
                for factor, value in zip(self.factors, factors, strict=True):
                    factor.copy_(value)
            self._store_initial(core, factors)
        else:
            init_factors(list(self.factors), init)

    @property
    def n_adapter_params(self) -> int:
        """Entries of the core and factors: ``prod(ranks) + sum(I_n R_n)``."""
        return tucker_params(self.shape, self.ranks)

    def delta_weight(self) -> torch.Tensor:
        """``ΔW = s · core ×_0 U_0 … ×_{N-1} U_{N-1}``, in the adapter's dtype.

        Returns
        -------
        torch.Tensor
            Shape of the base weight; differentiable in ``core`` and ``factors``.
        """
        return reconstruct(self.core * self.scale, list(self.factors))

    def _store_initial(self, core: torch.Tensor, factors: Sequence[torch.Tensor]) -> None:
        # With init="hosvd" the base holds W0 - ΔW_init; keeping the (small)
        # initial adapter lets unload(merge=False) and load_adapter rebuild W0.
        self.register_buffer("initial_core", core.detach().clone())
        for n, factor in enumerate(factors):
            self.register_buffer(f"initial_factor_{n}", factor.detach().clone())

    def initial_delta(self) -> torch.Tensor | None:
        """``ΔW`` at initialization for ``init="hosvd"`` (what the base gave up), else None."""
        if self.init != "hosvd":
            return None
        factors = [getattr(self, f"initial_factor_{n}") for n in range(len(self.shape))]
        return reconstruct(self.initial_core * self.scale, factors)

    def _base_weight(self) -> torch.Tensor:
        raise NotImplementedError

    def _add_to_base(self, delta: torch.Tensor, sign: float) -> None:
        weight = self._base_weight()
        with torch.no_grad():
            # One rounding to the base dtype, from the adapter's (>= float32) precision.
            weight.copy_((weight.to(delta.dtype) + sign * delta).to(weight.dtype))

    def merge(self) -> None:
        """Add ``ΔW`` into the base weight; the adapter branch stops running.

        Raises
        ------
        RuntimeError
            If the layer is already merged.
        """
        if self.merged:
            raise RuntimeError(
                f"{type(self).__name__} is already merged; call unmerge() before merging again"
            )
        with torch.no_grad():
            self._add_to_base(self.delta_weight(), 1.0)
        self.merged = True

    def unmerge(self) -> None:
        """Subtract ``ΔW`` from the base weight again; the adapter branch runs again.

        Raises
        ------
        RuntimeError
            If the layer is not merged.
        """
        if not self.merged:
            raise RuntimeError(f"{type(self).__name__} is not merged; nothing to unmerge")
        with torch.no_grad():
            self._add_to_base(self.delta_weight(), -1.0)
        self.merged = False

    def restore_base(self) -> None:
        """Undo everything done to the base weight: unmerge, and give back ``ΔW_init``.

        After this the base weight is ``W0`` again: bitwise for
        ``"zero_core"``/``"gaussian"``, to rounding for ``"hosvd"``.
        """
        if self.merged:
            self.unmerge()
        initial = self.initial_delta()
        if initial is not None:
            with torch.no_grad():
                self._add_to_base(initial, 1.0)

    def _take_initial_from_base(self) -> None:
        initial = self.initial_delta()
        if initial is not None:
            with torch.no_grad():
                self._add_to_base(initial, -1.0)


class FLoRALayer(TuckerDelta):
    """Base class of the module wrappers: ``base_layer(x)`` plus the adapter branch.

    Subclasses say how to run the branch factorized (``_factorized``), dense
    (``_dense``) or fused into the base op (``_fused``), and which ops each
    runs (``_ops``, for the cost model of ``flora._cost``, see :doc:`/flora_math`).

    Parameters
    ----------
    base_layer : torch.nn.Module
        The wrapped module; its parameters are frozen.
    ranks : int or sequence of int or None, optional
        Rank template, clipped to the weight's shape; by default
        :data:`flora.DEFAULT_RANKS` of the subclass's ``kind``.
    scale : float, optional
        The factor ``s``.
    dropout : float, optional
        Dropout probability on the branch input.
    init : {"zero_core", "hosvd", "gaussian"}, optional
        See :mod:`flora.init`.
    forward : {"auto", "dense", "factorized"}, optional
        How the branch runs; see :doc:`/flora_math`.
    """

    kind: str = ""
    base_type: type[nn.Module] = nn.Module

    def __init__(
        self,
        base_layer: nn.Module,
        ranks: RankTemplate | _KindDefault = KIND_DEFAULT,
        *,
        scale: float = 1.0,
        dropout: float = 0.0,
        init: str = "zero_core",
        forward: str = "auto",
    ):
        if type(base_layer) is not self.base_type:
            raise TypeError(
                f"flora.{type(self).__name__} wraps a torch.nn.{self.base_type.__name__}, "
                f"got {type(base_layer).__name__}"
            )
        if forward not in FORWARD_MODES:
            raise ValueError(f"forward must be one of {FORWARD_MODES}, got {forward!r}")
        if isinstance(dropout, bool) or not isinstance(dropout, (int, float)):
            raise TypeError(f"dropout must be a float, got {dropout!r}")
        if not 0 <= dropout < 1:
            raise ValueError(f"dropout must lie in [0, 1), got {dropout}")
        if isinstance(ranks, _KindDefault):
            ranks = DEFAULT_RANKS[self.kind]
        super().__init__(base_layer.weight, ranks, scale=scale, init=init)
        self.base_layer = base_layer
        base_layer.requires_grad_(False)
        self.forward_mode = forward
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self._take_initial_from_base()

    def _base_weight(self) -> torch.Tensor:
        return self.base_layer.weight

    def extra_repr(self) -> str:
        """Ranks, scale, init, forward mode and merge state, for ``repr``."""
        return (
            f"ranks={self.ranks}, scale={self.scale}, init={self.init!r}, "
            f"forward={self.forward_mode!r}, merged={self.merged}"
        )

    @property
    def factorizable(self) -> bool:
        """Whether the factorized forward applies to this layer (e.g. not for groups > 1)."""
        return True

    def _fusable(self, delta: torch.Tensor) -> bool:
        # W + ΔW in one op is exact only without dropout and in the base's own dtype.
        dropout_off = isinstance(self.dropout, nn.Identity) or not self.training
        return dropout_off and delta.dtype == self.base_layer.weight.dtype

    def choose_forward(self, x: torch.Tensor) -> str:
        """The branch computation used for input ``x``: ``"dense"`` or ``"factorized"``.

        With ``forward="auto"`` the cheaper under a roofline cost model of the
        ops each path runs (multiply-adds against the elements they read and
        write), counting the backward pass when gradients flow (see
        :doc:`/flora_math`).
        """
        if not self.factorizable or self.forward_mode == "dense":
            return "dense"
        if self.forward_mode == "factorized":
            return "factorized"
        factorized, dense_op, in_elements, out_elements = self._ops(x)
        training = torch.is_grad_enabled() and self.core.requires_grad
        return choose(
            factorized,
            dense_op,
            reconstruction_ops(self.shape, self.ranks),
            weight_elements=math.prod(self.shape),
            in_elements=in_elements,
            out_elements=out_elements,
            fused=self._fusable(self.core),
            training=training,
            input_grad=training and x.requires_grad,
        )

    def _branch_input(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(x).to(self.core.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``base_layer(x)`` plus the adapter branch (only the base while merged)."""
        if self.merged:
            return self.base_layer(x)
        if self.choose_forward(x) == "factorized":
            out = self.base_layer(x)
            return out + self._factorized(self._branch_input(x)).to(out.dtype)
        delta = self.delta_weight()
        if self._fusable(delta):
            return self._fused(x, delta)
        out = self.base_layer(x)
        return out + self._dense(self._branch_input(x), delta).to(out.dtype)

    def _factorized(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _dense(self, x: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _fused(self, x: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _ops(self, x: torch.Tensor) -> tuple[list[Op], Op, int, int]:
        """(factorized branch ops, the dense op on ``ΔW``, input and output elements)."""
        raise NotImplementedError
