r"""The named adapters of one weight: which are active, which are merged.

:class:`~flora.AdaptedWeight` holds named :class:`~flora.TuckerDelta`
adapters (:mod:`flora.layers.delta`) of one weight and adds their updates
into, or out of, the base weight. What a weight with adapters computes:
:math:`W + \sum_{\text{active}} \Delta W_a` with ``W`` the base weight. An
adapter made with ``init="hosvd"`` took its initial update :math:`\Delta W_{a,\text{init}}` out
of the base weight when it was added; while it is not running (inactive, or
inside :func:`flora.disable_adapter`) the weight adds :math:`\Delta W_{a,\text{init}}` back, so
it changes nothing then. Merged adapters live in the base weight and run no
branch. :class:`~flora.FLoRALayer` (:mod:`flora.layers.base`) is the
adapted weight of a wrapped module.
"""

from __future__ import annotations

import functools
import operator
from collections.abc import Iterable, Sequence

import torch
from torch import nn

from flora.layers.delta import (
    TuckerDelta,
    check_adapter_name,
)
from flora.spec import LayerSpec

__all__ = ["AdaptedWeight"]


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
        r"""Names of the adapters whose :math:`\Delta W` is in the base weight."""
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
        r""":math:`\Delta W` of an adapter (default: the active one) as the layer applies it.

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
        r"""What the adapters add to the base weight now (None if nothing).

        The running adapters' :math:`\Delta W` plus the initial updates of the
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
        r"""The bias the layer computes with now, in the base dtype (a new tensor; None if none).

        The base bias plus :math:`\Delta b` of the running adapters that carry one.
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
        r"""Raise what :meth:`flora.AdaptedWeight.merge` would raise, changing nothing.

        Raises
        ------
        RuntimeError
            If a named adapter is already merged.
        ValueError
            If a name is unknown or the base weight is a meta tensor; with
            ``safe``, if :math:`\Delta W` or :math:`W + \Delta W` (in the base dtype), or the
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
        r"""Add :math:`\Delta W` and :math:`\Delta b` of the active (or named) adapters to the base.

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
        r"""Subtract :math:`\Delta W` (and :math:`\Delta b`) of every merged adapter from the base.

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
        r"""Put what the adapters add now (``effective_delta()``, :math:`\Delta b`) into the base.

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
