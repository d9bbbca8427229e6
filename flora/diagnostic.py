r"""How fast each parameter group of each adapter moves :math:`\Delta W` per unit of learning rate.

:func:`flora.sensitivity` takes one gradient of a loss and reports, for every adapted layer and
every parameter group of its active adapter (the core and each factor ``U_n``), the gradient's norm
and :math:`\|\Delta W(\theta - \eta\,\mathrm{sign}(g)) - \Delta W(\theta)\| / \eta`: how far
:math:`\Delta W` moves, per unit of learning rate :math:`\eta`, when that group alone takes Adam's
first step (which is :math:`\eta \cdot \operatorname{sign}(g)` for every entry with a non-zero
gradient). :math:`\Delta W` is linear in each group, so the figure is exact for every :math:`\eta`.
Beside them it reports the same two numbers for a PEFT LoRA of the same budget on the same weight:
:math:`\Delta W_{(0)} = B A` on the mode-0 unfolding with ``lora_alpha = r``, ``A`` drawn as PEFT
draws it and ``B`` the least-squares fit of the adapter's current :math:`\Delta W` (zero at the
start, as in PEFT), so ``"LoRA A"`` moves nothing until the adapter has learned something. See
:doc:`/initialisation` for what the figures say.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass

import torch
from torch import nn

from flora._tucker import reconstruct
from flora.layers.base import AdaptedWeight, TuckerDelta
from flora.model import adapted_layers

__all__ = ["Sensitivity", "SensitivityRecord", "sensitivity"]

Loss = Callable[[nn.Module], torch.Tensor] | Mapping[str, object]


@dataclass(frozen=True)
class SensitivityRecord:
    r"""One parameter group of one adapted layer.

    Attributes
    ----------
    layer : str
        The adapted layer's name (as in :func:`flora.adapted_layers`).
    group : str
        ``"core"``, ``"U_0"``, ``"U_1"``, ... for the adapter; ``"LoRA B"``
        and ``"LoRA A"`` for the LoRA reference.
    shape : tuple of int
        The group's shape (LoRA's ``B`` is ``(I_0, r)``, ``A`` is :math:`(r, \prod_{n>0} I_n)`).
    grad_norm : float
        Frobenius norm of the loss gradient with respect to the group.
    delta_per_lr : float
        :math:`\|\Delta W(\theta - \eta\,\mathrm{sign}(g)) - \Delta W(\theta)\|_F / \eta`: the
        change of :math:`\Delta W` per unit
        of learning rate under one Adam-like step of this group alone.
    """

    layer: str
    group: str
    shape: tuple[int, ...]
    grad_norm: float
    delta_per_lr: float


@dataclass(frozen=True)
class Sensitivity:
    """The records of :func:`flora.sensitivity`, one per (layer, group); prints as a table.

    Attributes
    ----------
    records : tuple of SensitivityRecord
        Layer by layer, the adapter's groups then the LoRA reference's.
    lora_ranks : dict of str to int
        The rank of the LoRA reference of each layer.
    """

    records: tuple[SensitivityRecord, ...]
    lora_ranks: dict[str, int]

    def __iter__(self) -> Iterator[SensitivityRecord]:
        return iter(self.records)

    def __len__(self) -> int:
        return len(self.records)

    def total(self, group: str) -> float:
        """``delta_per_lr`` summed over layers for ``group`` (``"U"`` sums every factor).

        Examples
        --------
        >>> from flora.diagnostic import Sensitivity, SensitivityRecord
        >>> table = Sensitivity((SensitivityRecord("0", "U_0", (4, 2), 1.0, 2.0),
        ...                      SensitivityRecord("0", "U_1", (6, 2), 0.0, 0.5)), {"0": 2})
        >>> table.total("U"), table.total("U_1")
        (2.5, 0.5)
        """
        return sum(
            r.delta_per_lr
            for r in self.records
            if r.group == group or (group == "U" and r.group.startswith("U_"))
        )

    def __str__(self) -> str:
        rows = [["layer", "group", "shape", "grad norm", "ΔW per unit LR"]]
        rows += [
            [r.layer, r.group, str(r.shape), f"{r.grad_norm:.4g}", f"{r.delta_per_lr:.4g}"]
            for r in self.records
        ]
        widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
        return "\n".join(
            "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
            for row in rows
        )


def _loss_of(model: nn.Module, loss: Loss) -> torch.Tensor:
    if isinstance(loss, Mapping):
        value = getattr(model(**loss), "loss", None)
        if value is None:
            raise ValueError(
                "loss is a batch, but the model's output has no .loss; pass a callable "
                "loss(model) -> scalar tensor instead"
            )
    elif callable(loss):
        value = loss(model)
    else:
        raise TypeError(
            f"loss must be a callable loss(model) or a batch dict, got {type(loss).__name__}"
        )
    if not isinstance(value, torch.Tensor) or value.numel() != 1:
        raise ValueError(f"the loss must be a scalar tensor, got {value!r:.80}")
    return value.reshape(())


def _lora_rank(adapter: TuckerDelta) -> int:
    shape = adapter.spec.shape
    return max(1, adapter.spec.n_params // (shape[0] + math.prod(shape[1:])))


def _lora_a(kind: str, rank: int, columns: int, generator: torch.Generator) -> torch.Tensor:
    """PEFT's draw of ``A`` (``(rank, columns)``); an Embedding's is ``lora_embedding_B``ᵀ."""
    a = torch.empty(rank, columns, dtype=torch.float64)
    if kind == "Embedding":
        return a.normal_(generator=generator)
    return nn.init.kaiming_uniform_(a, a=math.sqrt(5), generator=generator)


def _adapter_records(
    name: str, layer: AdaptedWeight, adapter: TuckerDelta, grads: list[torch.Tensor]
) -> list[SensitivityRecord]:
    core, factors = adapter.core.detach(), [f.detach() for f in adapter.factors]
    groups = [("core", core), *((f"U_{n}", f) for n, f in enumerate(factors))]
    records = []
    for index, ((group, tensor), grad) in enumerate(zip(groups, grads, strict=True)):
        parts = [core, *factors]
        parts[index] = torch.sign(grad).to(tensor.dtype)
        with torch.no_grad():
            moved = layer._mask(reconstruct(parts[0] * adapter.spec.scale, parts[1:]))
        records.append(
            SensitivityRecord(
                name, group, tuple(tensor.shape), float(grad.norm()), float(moved.norm())
            )
        )
    return records


def _lora_records(
    name: str, adapter: TuckerDelta, weight_grad: torch.Tensor | None, rank: int, seed: int
) -> list[SensitivityRecord]:
    shape = adapter.spec.shape
    rows, columns = shape[0], math.prod(shape[1:])
    a = _lora_a(adapter.spec.kind, rank, columns, torch.Generator().manual_seed(seed))
    if weight_grad is None:
        nan = float("nan")
        return [
            SensitivityRecord(name, "LoRA B", (rows, rank), nan, nan),
            SensitivityRecord(name, "LoRA A", (rank, columns), nan, nan),
        ]
    grad = weight_grad.detach().to(torch.float64).reshape(rows, columns)
    with torch.no_grad():
        delta = adapter.delta_weight().to(torch.float64).reshape(rows, columns)
        b = delta @ torch.linalg.pinv(a)
        grad_b, grad_a = grad @ a.T, b.T @ grad
    return [
        SensitivityRecord(
            name, "LoRA B", (rows, rank), float(grad_b.norm()), float((grad_b.sign() @ a).norm())
        ),
        SensitivityRecord(
            name, "LoRA A", (rank, columns), float(grad_a.norm()), float((b @ grad_a.sign()).norm())
        ),
    ]


def sensitivity(
    model: nn.Module, loss: Loss, *, lora_rank: int | None = None, seed: int = 0
) -> Sensitivity:
    r"""Per adapted layer and parameter group: gradient norm and :math:`\Delta W` moved per unit LR.

    One forward and backward of ``loss`` at the model's current parameters
    (train or eval mode as the model is; nothing is changed, ``.grad`` is
    left alone). For each adapted layer's active adapter and each of its
    groups (core, ``U_0``, ...), the gradient norm and the change of :math:`\Delta W`
    per unit learning rate when that group takes one Adam-like first step
    :math:`-\eta \cdot \operatorname{sign}(g)` (see :mod:`flora.diagnostic`); then the same for a
    PEFT LoRA of the same budget (``"LoRA B"``, ``"LoRA A"``), computed from
    the gradient of the layer's base weight, which is the gradient of :math:`\Delta W`
    (with adapter dropout, the gradient of the full weight instead).

    Parameters
    ----------
    model : torch.nn.Module
        A model with FLoRA adapters, none of them merged.
    loss : callable or dict
        ``loss(model)`` returning a scalar tensor, or a batch for a Hugging
        Face model (``model(**batch).loss``).
    lora_rank : int, optional
        Rank of the LoRA reference; default per layer: the largest whose
        :math:`r (I_0 + \prod_{n>0} I_n)` fits the adapter's parameter count
        (at least 1); a ``(r, r)`` Linear adapter's is ``r``.
    seed : int, optional
        Seeds the draw of the LoRA reference's ``A``.

    Returns
    -------
    Sensitivity
        ``str()`` of it is a table; :meth:`Sensitivity.total` sums a group
        over layers.

    Raises
    ------
    ValueError
        If the model has no adapters, an adapter is merged or not exactly
        one is active in a layer, ``lora_rank`` is below 1, or the loss is
        not a scalar tensor.
    TypeError
        If ``loss`` is neither callable nor a dict.

    Examples
    --------
    >>> import torch
    >>> import flora
    >>> _ = torch.manual_seed(0)
    >>> model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2))
    >>> config = flora.FLoRAConfig(ranks=2, target_modules=["0"], init="balanced")
    >>> model = flora.inject(model, config)
    >>> x, y = torch.randn(16, 8), torch.randint(0, 2, (16,))
    >>> table = flora.sensitivity(model, lambda m: torch.nn.functional.cross_entropy(m(x), y))
    >>> [r.group for r in table]
    ['core', 'U_0', 'U_1', 'LoRA B', 'LoRA A']
    >>> round(table.total("U_0"), 2), round(table.total("LoRA B"), 2)  # like LoRA's B
    (2.29, 1.61)
    >>> table.total("core"), table.total("U_1"), table.total("LoRA A")  # zero until U_0 moves
    (0.0, 0.0, 0.0)
    """
    if lora_rank is not None and (type(lora_rank) is not int or lora_rank < 1):
        raise ValueError(f"lora_rank must be an int >= 1, got {lora_rank!r}")
    layers = adapted_layers(model)
    if not layers:
        raise ValueError("the model has no FLoRA adapters; inject one first")
    adapters: dict[str, TuckerDelta] = {}
    for name, layer in layers.items():
        try:
            adapters[name] = layer.adapter()
        except ValueError as error:
            raise ValueError(f"layer {name!r}: {error}") from None
        if adapters[name].merged:
            raise ValueError(f"layer {name!r}: its adapter is merged; unmerge it first")
    weights = {n: layer.base_weight() for n, layer in layers.items()}
    weights = {n: w for n, w in weights.items() if w.is_floating_point() and w.is_leaf}
    tensors = [t for a in adapters.values() for t in (a.core, *a.factors)]
    tensors += list(weights.values())
    flags = [t.requires_grad for t in tensors]
    try:
        for tensor in tensors:
            tensor.requires_grad_(True)
        value = _loss_of(model, loss)
        grads = torch.autograd.grad(value, tensors, allow_unused=True)
    finally:
        for tensor, flag in zip(tensors, flags, strict=True):
            tensor.requires_grad_(flag)
    grads = [torch.zeros_like(t) if g is None else g for t, g in zip(tensors, grads, strict=True)]
    records, ranks, start = [], {}, 0
    weight_grads = dict(zip(weights, grads[-len(weights) :] if weights else [], strict=True))
    for name, adapter in adapters.items():
        count = 1 + len(adapter.factors)
        records += _adapter_records(name, layers[name], adapter, grads[start : start + count])
        start += count
        ranks[name] = lora_rank or _lora_rank(adapter)
        records += _lora_records(name, adapter, weight_grads.get(name), ranks[name], seed)
    return Sensitivity(tuple(records), ranks)
