"""The compared methods and how each one is held to a trainable-parameter budget.

A budget is named by a LoRA rank ``r``: it is the number of parameters PEFT's
LoRA adds at rank ``r`` to the adapted layers (``r * (in * k * k + out)`` for a
``k x k`` convolution, ``r * (in + out)`` for a Linear layer), so LoRA meets
it exactly. FLoRA gets the same budget layer by layer, smallest layer first;
whatever a layer cannot use (its Tucker ranks are integers) or must overdraw
(its smallest adapter costs more than its LoRA share) is carried over to the
next, larger, layer, so the model total never exceeds the budget.
"""

from __future__ import annotations

import copy
import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import peft
import torch
from _quality_setup import TARGET_MODULES, DigitsCNN
from torch import nn

import flora
import tuckerlib
from flora.spec import usable_ranks

__all__ = [
    "FLORA_LABELS",
    "FLORA_VARIANTS",
    "METHODS",
    "Adapted",
    "FloraVariant",
    "adapt",
    "flora_layer_ranks",
    "flora_model",
    "lora_budget",
    "lora_model",
    "train_head",
    "trainable_of",
    "with_new_head",
]


@dataclass(frozen=True)
class FloraVariant:
    """How a FLoRA method picks its ranks and initializes its adapters.

    ``kernel_rank`` pins both kernel modes of every convolution (``None``:
    full kernel rank). ``channel_rule`` is ``"energy"`` (channel ranks from
    :func:`tuckerlib.ranks_for_budget` on the pretrained weight's mode
    spectra, kernel modes pinned) or ``"equal"`` (the paper's recipe: one
    rank for both channel modes, the largest that fits).
    """

    init: str = "auto"
    kernel_rank: int | None = None
    channel_rule: str = "energy"
    scale: float = 1.0


@dataclass
class Adapted:
    """A model ready to train, its trainable tensors and FLoRA's per-layer ranks."""

    model: nn.Module
    trainable: list[nn.Parameter]
    ranks: dict[str, tuple[int, ...]]

    @property
    def n_trainable(self) -> int:
        """Number of trainable entries."""
        return sum(p.numel() for p in self.trainable)


#: FLoRA methods of the main comparison: flora's default init (``"auto"``)
#: and the candidate inits, each with energy-chosen ranks.
FLORA_VARIANTS = {
    "flora": FloraVariant(),
    "flora_balanced": FloraVariant(init="balanced"),
    "flora_hosvd": FloraVariant(init="hosvd"),
}

#: Display names of the FLoRA methods.
FLORA_LABELS = {
    "flora": "FLoRA default (auto init)",
    "flora_balanced": "FLoRA balanced init",
    "flora_hosvd": "FLoRA hosvd init",
}

#: Display names, in table order (the PEFT anchors join in ``quality.py``).
METHODS = {
    "full": "Full fine-tuning",
    "head": "Head only",
    "lora": "LoRA (PEFT)",
    **FLORA_LABELS,
}


def _target_layers(model: nn.Module, targets: Sequence[str]) -> dict[str, nn.Module]:
    return {name: model.get_submodule(name) for name in targets}


def _lora_layer_params(layer: nn.Module, rank: int) -> int:
    # PEFT's LoRA: A maps the layer's input (with the full kernel) to r channels, B is 1x1.
    weight = layer.weight
    return rank * (math.prod(weight.shape[1:]) + weight.shape[0])


def lora_budget(
    model: nn.Module, rank: int, targets: Sequence[str] = TARGET_MODULES
) -> dict[str, int]:
    """Parameters PEFT's LoRA at ``rank`` adds to each layer of ``model`` named in ``targets``."""
    layers = _target_layers(model, targets)
    return {name: _lora_layer_params(m, rank) for name, m in layers.items()}


def _pinned(shape: tuple[int, ...], kernel_rank: int | None) -> tuple[int | None, ...]:
    kernel = tuple(s if kernel_rank is None else min(kernel_rank, s) for s in shape[2:])
    return (None, None, *kernel)


def _cheapest(shape: tuple[int, ...], pinned: tuple[int | None, ...]) -> tuple[int, ...]:
    return tuple(1 if p is None else p for p in pinned[: len(shape)])


def _equal_channel_ranks(
    shape: tuple[int, ...], budget: int, kernel_rank: int | None
) -> tuple[int, ...]:
    pinned = _pinned(shape, kernel_rank)[: len(shape)]
    best = _cheapest(shape, pinned)
    for r in range(1, max(shape[:2]) + 1):
        wanted = tuple(min(r, shape[n]) if p is None else p for n, p in enumerate(pinned))
        ranks = usable_ranks(wanted, shape)
        if tuckerlib.tucker_params(shape, ranks) > budget:
            break
        best = ranks
    return best


def _energy_ranks(weight: torch.Tensor, budget: int, kernel_rank: int | None) -> tuple[int, ...]:
    shape = tuple(weight.shape)
    pinned = _pinned(shape, kernel_rank)[: len(shape)]
    cheapest = _cheapest(shape, pinned)
    if tuckerlib.tucker_params(shape, cheapest) >= budget:
        return cheapest
    fixed = {n: p for n, p in enumerate(pinned) if p is not None}
    return tuple(tuckerlib.ranks_for_budget(weight.detach(), budget, fixed=fixed or None))


def flora_layer_ranks(
    model: nn.Module,
    budget_rank: int,
    variant: FloraVariant,
    targets: Sequence[str] = TARGET_MODULES,
) -> dict[str, tuple[int, ...]]:
    """Per-layer Tucker ranks within the LoRA-``budget_rank`` budget (see module notes)."""
    budgets = lora_budget(model, budget_rank, targets)
    layers = _target_layers(model, targets)
    choose = _energy_ranks if variant.channel_rule == "energy" else None
    carry = 0
    ranks = {}
    for name in sorted(budgets, key=budgets.__getitem__):
        weight = layers[name].weight
        available = budgets[name] + carry
        if choose is None:
            ranks[name] = _equal_channel_ranks(tuple(weight.shape), available, variant.kernel_rank)
        else:
            ranks[name] = choose(weight, available, variant.kernel_rank)
        # flora clips to usable ranks; what the clipping saves goes to the next layer.
        ranks[name] = usable_ranks(ranks[name], tuple(weight.shape))
        carry = available - tuckerlib.tucker_params(tuple(weight.shape), ranks[name])
    return {name: ranks[name] for name in targets}


def trainable_of(model: nn.Module) -> list[nn.Parameter]:
    """The parameters of ``model`` that require gradients."""
    return [p for p in model.parameters() if p.requires_grad]


def _full(base: DigitsCNN) -> Adapted:
    model = copy.deepcopy(base)
    return Adapted(model, list(model.parameters()), {})


def _head(base: DigitsCNN) -> Adapted:
    model = copy.deepcopy(base)
    model.requires_grad_(False)
    model.head.requires_grad_(True)
    return Adapted(model, trainable_of(model), {})


def with_new_head(base: nn.Module, seed: int) -> nn.Module:
    """A copy of ``base`` whose ``head`` layer is initialized afresh with ``seed``."""
    model = copy.deepcopy(base)
    torch.manual_seed(seed)
    model.head.reset_parameters()
    return model


def train_head(adapted: Adapted) -> Adapted:
    """``adapted`` with its new ``head`` layer trained in full (PEFT's ``modules_to_save``)."""
    for name, parameter in adapted.model.named_parameters():
        if name.split(".")[-2] == "head":
            parameter.requires_grad_(True)
    return Adapted(adapted.model, trainable_of(adapted.model), adapted.ranks)


def lora_model(
    base: nn.Module, budget_rank: int, scale: float, targets: Sequence[str] = TARGET_MODULES
) -> Adapted:
    """A copy of ``base`` with PEFT's LoRA at rank ``budget_rank`` on ``targets``."""
    # lora_alpha = scale * r makes PEFT's multiplier alpha / r equal FLoRA's scale s.
    config = peft.LoraConfig(
        r=budget_rank,
        lora_alpha=scale * budget_rank,
        target_modules=list(targets),
        lora_dropout=0.0,
        bias="none",
    )
    model = peft.get_peft_model(copy.deepcopy(base), config)
    return Adapted(model, trainable_of(model), {})


def flora_model(
    base: nn.Module,
    ranks: dict[str, tuple[int, ...]],
    variant: FloraVariant,
) -> Adapted:
    """A copy of ``base`` with FLoRA adapters of the given per-layer ``ranks``."""
    config = flora.FLoRAConfig(
        ranks=1,
        scale=variant.scale,
        target_modules=list(ranks),
        rank_pattern={re.escape(name): r for name, r in ranks.items()},
        init=variant.init,
        # forward="auto", flora's default: each layer runs the branch its cost
        # model finds cheaper (all forward modes agree to rounding).
    )
    model = flora.inject(copy.deepcopy(base), config)
    return Adapted(model, trainable_of(model), ranks)


def adapt(
    base: DigitsCNN, method: str, *, budget_rank: int, seed: int, variant: FloraVariant | None
) -> Adapted:
    """A fresh copy of ``base`` prepared for ``method``; ``seed`` fixes the adapter init.

    ``variant`` is required for FLoRA methods (``method`` starting with
    ``"flora"``) and ignored otherwise; LoRA takes its scale from it when given.
    """
    torch.manual_seed(seed)
    builders: dict[str, Callable[[], Adapted]] = {
        "full": lambda: _full(base),
        "head": lambda: _head(base),
        "lora": lambda: lora_model(base, budget_rank, variant.scale if variant else 1.0),
    }
    if method in builders:
        return builders[method]()
    if variant is None:
        raise ValueError(f"method {method!r} needs a FloraVariant")
    return flora_model(base, flora_layer_ranks(base, budget_rank, variant), variant)
