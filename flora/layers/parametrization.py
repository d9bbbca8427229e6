r"""FLoRA adapter for any parameter of any module, via :mod:`torch.nn.utils.parametrize`.

The parameter (a 3-D stacked-experts weight used with :func:`torch.bmm`, a
1-D norm scale, anything with at least one dimension) becomes
:math:`W + \Delta W` wherever the module reads it, with :math:`\Delta W` a Tucker tensor over
the parameter's own axes. The parametrization always runs dense: the module's
forward is opaque, so the only thing to adapt is the tensor itself.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils import parametrize

from flora.config import DEFAULT_RANKS
from flora.layers.base import AdaptedWeight, TuckerDelta, check_adapter_name
from flora.spec import LayerSpec, RankTemplate

__all__ = ["TuckerParametrization"]


class TuckerParametrization(AdaptedWeight):
    r"""Adapt ``getattr(module, name)`` in place: it reads as :math:`W + \Delta W` from now on.

    Constructing it registers it on ``module`` with
    ``torch.nn.utils.parametrize.register_parametrization``; the
    original tensor then lives at ``module.parametrizations[name].original``
    and is frozen. Further named adapters are added with :meth:`flora.AdaptedWeight.add_adapter`
    (or :func:`flora.inject` with another ``adapter_name``).

    Parameters
    ----------
    base_layer : torch.nn.Module
        The module owning the parameter, kept as ``self.base_layer``.
    parameter_name : str
        The parameter's attribute name, e.g. ``"weight"``.
    ranks : int or sequence of int or None, optional
        Rank template over the parameter's axes, clipped to its shape and to
        the usable ranks (a 1-D parameter gets rank 1).
    scale : float, optional
        The factor ``s``.
    init : {"auto", "balanced", "zero_core", "hosvd", "gaussian"}, optional
        See :mod:`flora.init`.
    adapter_name : str or None, optional
        Name of the adapter created (``"default"``); ``None`` registers the
        parametrization without adapters.

    Raises
    ------
    TypeError
        If ``parameter_name`` is not a floating-point ``torch.nn.Parameter``
        of ``base_layer``.
    ValueError
        If the parameter is 0-D or already parametrized, or for invalid
        ranks, scale or init.

    Examples
    --------
    >>> import torch
    >>> import flora
    >>> experts = torch.nn.Module()
    >>> experts.weight = torch.nn.Parameter(torch.randn(4, 8, 16))
    >>> p = flora.TuckerParametrization(experts, "weight", ranks=(2, 4, 4))
    >>> experts.weight.shape, p.delta_weight().shape
    (torch.Size([4, 8, 16]), torch.Size([4, 8, 16]))
    >>> torch.bmm(torch.randn(4, 3, 8), experts.weight).shape
    torch.Size([4, 3, 16])
    """

    kind = "Parameter"

    def __init__(
        self,
        base_layer: nn.Module,
        parameter_name: str,
        ranks: RankTemplate = DEFAULT_RANKS["Parameter"],
        *,
        scale: float = 1.0,
        init: str = "auto",
        adapter_name: str | None = "default",
    ):
        if parametrize.is_parametrized(base_layer, parameter_name):
            raise ValueError(f"parameter {parameter_name!r} is already parametrized")
        weight = getattr(base_layer, parameter_name, None)
        if not isinstance(weight, nn.Parameter) or not weight.is_floating_point():
            raise TypeError(
                f"{parameter_name!r} must name a floating-point torch.nn.Parameter of "
                f"{type(base_layer).__name__}, got {type(weight).__name__}"
                + (f" of dtype {weight.dtype}" if isinstance(weight, torch.Tensor) else "")
            )
        if weight.ndim == 0:
            raise ValueError(f"parameter {parameter_name!r} is 0-D; FLoRA needs at least one axis")
        adapter = None
        if adapter_name is not None:
            check_adapter_name(adapter_name)
            spec = LayerSpec.from_template(
                self.kind, tuple(weight.shape), ranks, scale=scale, init=init
            )
            adapter = TuckerDelta.create(spec, weight)
        super().__init__()
        # A plain attribute, not a submodule: the module already owns this
        # parametrization, and a registered back-reference would be a cycle.
        self.__dict__["_base_layer"] = base_layer
        self.parameter_name = parameter_name
        if adapter is not None:
            weight.requires_grad_(False)
            self.add_adapter(adapter_name, adapter)
            self._set_active((adapter_name,))
        parametrize.register_parametrization(base_layer, parameter_name, self)

    @property
    def base_layer(self) -> nn.Module:
        """The module that owns the adapted parameter."""
        return self.__dict__["_base_layer"]

    def base_weight(self) -> torch.Tensor:
        """The original (frozen) parameter."""
        module = self.base_layer
        if parametrize.is_parametrized(module, self.parameter_name):
            return module.parametrizations[self.parameter_name].original
        return getattr(module, self.parameter_name)

    def extra_repr(self) -> str:
        """Parameter, active and merged adapters, for ``repr``."""
        return f"parameter={self.parameter_name!r}, {super().extra_repr()}"

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        """``weight`` plus what the adapters add now (``effective_delta()``), in their dtype."""
        delta = self.effective_delta()
        if delta is None:
            return weight
        if weight.dtype == delta.dtype:
            return weight + delta
        return (weight.to(delta.dtype) + delta).to(weight.dtype)
