r"""Shrink trained FLoRA adapters in place: a truncated HOSVD of each layer's core.

A trained update :math:`\Delta W = s \cdot G \times_n U_n` often needs fewer ranks than it was
given. :func:`compress` truncates it on its small core (the factors' QR
factorizations reduce the problem to the core's size, see
:doc:`/lora_adapters`), so its cost does not depend on the weights' size,
and reports each layer's relative error exactly.
"""

from __future__ import annotations

import dataclasses
import numbers
from collections.abc import Mapping, Sequence

import torch
from torch import nn

from flora._apply import check_enabled, find_adapted
from flora._geometry import module_geometry
from flora._truncate import Compressed, RankRule, padded_spectra, truncate_tucker
from flora._tucker import to_usable_ranks
from flora.config import FLoRAConfig, Ranks
from flora.io import _resolve_name
from flora.layers import AdaptedWeight, FLoRALayer, TuckerDelta
from flora.spec import clip_ranks
from tuckerlib import energy_ranks
from tuckerlib.analysis import lora_budget_ranks, tensor_kind
from tuckerlib.io.flora_format import update_factors
from tuckerlib.io.layer_kinds import known_tensor_class

__all__ = ["DEFAULT_LORA_RANK", "compress"]

#: With neither ranks nor energy, each layer keeps the ranks with the most
#: energy within the parameters of a LoRA of this rank: the rule of the
#: ``FLoRA ranks`` column of ``tuckerlib analyze --adapter`` at its default.
DEFAULT_LORA_RANK = 8


@dataclasses.dataclass(frozen=True)
class _Plan:
    """A layer's compressed adapter, ready to take the old one's place."""

    host: AdaptedWeight
    adapter: TuckerDelta
    relative_error: float


def _check_energy(energy: object) -> float:
    if isinstance(energy, bool) or not isinstance(energy, numbers.Real):
        raise TypeError(f"energy must be a real number in (0, 1], got {energy!r}")
    if not 0 < energy <= 1:
        raise ValueError(f"energy must lie in (0, 1], got {energy}")
    return float(energy)


def _rule(
    name: str, spec_kind: str, current: Sequence[int], ranks: Ranks, energy: float | None
) -> RankRule:
    """How layer ``name`` picks its new ranks (never above ``current``)."""

    def capped(target: Sequence[int]) -> list[int]:
        return [min(int(t), r) for t, r in zip(target, current, strict=True)]

    if ranks is not None:
        template = FLoRAConfig(ranks=ranks).ranks_for(spec_kind)

        def by_template(small: torch.Tensor, shape: tuple[int, ...]) -> list[int]:
            try:
                return capped(clip_ranks(template, shape))
            except ValueError as exc:
                raise ValueError(f"layer {name!r}: {exc}") from None

        return by_template
    if energy is not None:
        return lambda small, shape: capped(energy_ranks(small, energy))

    def by_budget(small: torch.Tensor, shape: tuple[int, ...]) -> list[int]:
        # The kind as analyze tells it: a parameter's from its name and shape.
        kind = known_tensor_class(spec_kind) or tensor_kind(name, shape)
        spectra = padded_spectra(small, shape)
        return capped(lora_budget_ranks(spectra, kind, DEFAULT_LORA_RANK)[0])

    return by_budget


def _update(host: AdaptedWeight, adapter: TuckerDelta) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The change the adapter makes to the pretrained weight, as the layer applies it (float64)."""
    core = adapter.core.detach().to(torch.float64)
    factors = [f.detach().to(torch.float64) for f in adapter.factors]
    initial = adapter.initial
    if initial is not None:
        initial = (initial[0].to(torch.float64), [f.to(torch.float64) for f in initial[1]])
    geometry = module_geometry(host.base_layer) if isinstance(host, FLoRALayer) else None
    # The format's rule: ΔW − ΔW_init, and no update on a row the layer never applies.
    core, factors = update_factors(adapter.spec.record(geometry), core, factors, initial)
    return to_usable_ranks(core, factors)


def _plan(name: str, host: AdaptedWeight, adapter_name: str, rule: RankRule) -> _Plan:
    adapter = host.adapters[adapter_name]
    core, factors = _update(host, adapter)
    if not all(bool(torch.isfinite(t).all()) for t in (core, *factors)):
        raise ValueError(
            f"layer {name!r}: adapter {adapter_name!r} holds NaN or infinite values in its "
            "core or factors; nothing was compressed"
        )
    result: Compressed = truncate_tucker(core, factors, rule)
    dtype = adapter.core.dtype
    spec = dataclasses.replace(
        adapter.spec,
        ranks=tuple(result.core.shape),
        init="zero_core" if adapter.spec.init == "hosvd" else adapter.spec.init,
    )
    new = TuckerDelta(
        spec,
        result.core.to(dtype),
        [f.to(dtype) for f in result.factors],
        bias=None if adapter.bias is None else adapter.bias.detach(),
        trainable=adapter.trainable,
    )
    new.config = adapter.config
    return _Plan(host, new.to(adapter.core.device), result.relative_error)


def _swap(host: AdaptedWeight, adapter_name: str, new: TuckerDelta) -> None:
    # remove_adapter gives an init="hosvd" adapter's initial update back to the
    # base weight; the later adapters are moved back behind the new one, so the
    # order (and the order of sums in the forward) stays as it was.
    order = list(host.adapters)
    host.remove_adapter(adapter_name)
    host.add_adapter(adapter_name, new)
    for later in order[order.index(adapter_name) + 1 :]:
        host.adapters[later] = host.adapters.pop(later)


def compress(
    model: nn.Module,
    *,
    ranks: int | Sequence[int | None] | Mapping[str, object] | None = None,
    energy: float | None = None,
    adapter_name: str | None = None,
) -> dict[str, float]:
    r"""Shrink an adapter's layers in place by a truncated HOSVD of their cores.

    Each layer's update :math:`\Delta W = s \cdot G \times_0 U_0 \dots \times_{N-1} U_{N-1}` is
    replaced by its truncated ST-HOSVD :math:`\Delta W'`, computed on the small core
    :math:`G \times_n R_n` (:math:`U_n = Q_n R_n`, QR) without forming :math:`\Delta W`. It is
    exact (to rounding) when the new ranks hold the update's multilinear
    rank. The ranks never grow, and end at what a Tucker tensor can use.

    Parameters
    ----------
    model : torch.nn.Module
        A model with FLoRA adapters.
    ranks : int, sequence or dict, optional
        The new ranks, as :class:`flora.FLoRAConfig` takes them: an int for
        every mode, one rank per mode (``None`` keeps the mode), or a dict
        from layer kind to either (kinds not named use
        :data:`flora.DEFAULT_RANKS`); clipped layer by layer to each mode's
        size, to the usable ranks and to the adapter's current ranks.
    energy : float, optional
        Instead of ``ranks``: per mode, the smallest rank keeping this
        fraction of :math:`\|\Delta W\|^2` (:func:`tuckerlib.energy_ranks`), in ``(0, 1]``.
    adapter_name : str, optional
        The adapter to compress; default the active one (exactly one must
        be active).

    Returns
    -------
    dict of str to float
        Layer name to :math:`\|\Delta W - \Delta W'\| / \|\Delta W\|` (``0.0`` where
        :math:`\Delta W = 0`), the error of the weight update alone.

    Raises
    ------
    ValueError
        If both ``ranks`` and ``energy`` are given, either is invalid (a
        rank template that does not fit a layer names it), the model has no
        such adapter, none is named with several active, or a layer's core
        or factors hold NaN or infinite values (named; nothing changes).
    TypeError
        If ``energy`` is not a number or ``ranks`` no rank template.
    RuntimeError
        If the adapter is merged into some layers (named; unmerge first),
        or inside :func:`flora.disable_adapter`.

    See Also
    --------
    flora.export_lora : Write the compressed adapter for PEFT.

    Notes
    -----
    With neither ``ranks`` nor ``energy``, each layer gets the ranks that
    keep the most of :math:`\|\Delta W\|^2` within the parameters of a rank-8 LoRA of
    the layer (:func:`tuckerlib.analysis.lora_budget_ranks`): the
    ``FLoRA ranks`` column that ``tuckerlib analyze --adapter`` reports for
    the saved adapter, capped at the adapter's current ranks.

    Every new core and factor set is computed before any layer changes, so
    a failure leaves the model as it was. The compressed adapters are new
    parameters: build a new optimizer to train them further. :math:`\Delta W` is the
    update as the layer applies it (an embedding's ``padding_idx`` row is
    zero). An ``init="hosvd"`` adapter's initial tensors fix its ranks, so
    they cannot stay beside a smaller core: its update relative to the
    pretrained weight, :math:`\Delta W - \Delta W_\text{init}`, is compressed (the update
    ``tuckerlib analyze --adapter`` and :func:`flora.export_lora` see), the
    base weight gets :math:`\Delta W_\text{init}` back (rounded to its dtype once), and the
    adapter becomes a ``"zero_core"`` one with the same outputs up to the
    reported error.

    A bias update :math:`\Delta b` (``FLoRAConfig(bias=True)``) has no ranks to
    shrink: the compressed adapter keeps it unchanged, bit for bit, and the
    reported errors are those of :math:`\Delta W` alone.

    Examples
    --------
    >>> import torch
    >>> import flora
    >>> torch.manual_seed(0) and None
    >>> model = torch.nn.Sequential(torch.nn.Linear(32, 32))
    >>> config = flora.FLoRAConfig(ranks=8, init="gaussian", target_modules="all-linear")
    >>> model = flora.inject(model, config)
    >>> with torch.no_grad():  # a trained update of multilinear rank (2, 2)
    ...     _ = model[0].core.copy_(torch.diag(torch.tensor([3.0, 1.0, 0, 0, 0, 0, 0, 0])))
    >>> x = torch.randn(4, 32)
    >>> before = model(x)
    >>> errors = flora.compress(model, ranks=2)
    >>> model[0].ranks, errors["0"] < 1e-6
    ((2, 2), True)
    >>> torch.allclose(model(x), before, atol=1e-5)
    True
    """
    if ranks is not None and energy is not None:
        raise ValueError("give ranks or energy, not both")
    if energy is not None:
        energy = _check_energy(energy)
    if ranks is not None:
        FLoRAConfig(ranks=ranks)
    name = _resolve_name(model, adapter_name)
    check_enabled(model)
    hosts = {n: h for n, h in find_adapted(model).items() if name in h.adapters}
    merged = [n for n, h in hosts.items() if h.adapters[name].merged]
    if merged:
        raise RuntimeError(
            f"adapter {name!r} is merged into layers {merged}; unmerge it before compressing"
        )
    plans = {}
    for layer, host in hosts.items():
        spec = host.adapters[name].spec
        rule = _rule(layer, spec.kind, spec.ranks, ranks, energy)
        plans[layer] = _plan(layer, host, name, rule)
    for plan in plans.values():
        _swap(plan.host, name, plan.adapter)
    return {layer: plan.relative_error for layer, plan in plans.items()}
