"""PEFT's anchors held to a LoRA budget: DoRA, and LoHa and LoKr with effective conv2d.

LoRA meets a budget named by its rank exactly. The other PEFT methods cost
more (DoRA adds a magnitude vector per output channel) or differently
(LoHa's Hadamard product of two low-rank pairs, LoKr's Kronecker factor)
per unit of rank, so each layer gets its own rank through PEFT's
``rank_pattern``: the rank whose cost is the largest that fits the layer's
LoRA share plus what smaller layers left unspent, smallest layer first, as
FLoRA's ranks are chosen. A layer whose rank-1 adapter costs more than its
share takes rank 1 and the overdraft is charged to the next layer. Costs are
counted on a real PEFT model of the single layer, not from formulas, so they
follow whatever PEFT version is installed.

With ``use_effective_conv2d=True`` LoHa and LoKr store a convolution's
low-rank factor as a Tucker-2 form (an ``r × r × k × k`` core between two
channel factors, LyCORIS' "CP" option).
"""

from __future__ import annotations

import copy
import re
from collections.abc import Sequence
from dataclasses import dataclass

import peft
from _quality_methods import Adapted, lora_budget, trainable_of
from torch import nn

__all__ = ["PEFT_ANCHORS", "AnchorSpec", "anchor_model", "anchor_spec"]

#: PEFT methods beyond plain LoRA, with their display names.
PEFT_ANCHORS = {
    "dora": "DoRA (PEFT)",
    "loha": "LoHa (PEFT, effective conv2d)",
    "lokr": "LoKr (PEFT, effective conv2d)",
}

#: Highest rank tried for one layer.
_MAX_RANK = 128
#: LoKr's Kronecker factor sizes tried (-1: PEFT's default, near-square factors).
_LOKR_FACTORS = (-1, 8, 4, 2)


@dataclass(frozen=True)
class AnchorSpec:
    """Per-layer ranks of one PEFT anchor, and LoKr's Kronecker ``decompose_factor``."""

    ranks: dict[str, int]
    decompose_factor: int = -1


def _config(method: str, spec: AnchorSpec) -> peft.PeftConfig:
    pattern = {re.escape(name): r for name, r in spec.ranks.items()}
    # alpha = r for every layer keeps each method's multiplier alpha / r at 1.
    common = {"r": 1, "target_modules": list(spec.ranks), "rank_pattern": pattern}
    if method == "dora":
        return peft.LoraConfig(
            **common, lora_alpha=1, alpha_pattern=pattern, lora_dropout=0.0, use_dora=True
        )
    if method == "loha":
        return peft.LoHaConfig(**common, alpha=1, alpha_pattern=pattern, use_effective_conv2d=True)
    if method == "lokr":
        return peft.LoKrConfig(
            **common,
            alpha=1,
            alpha_pattern=pattern,
            use_effective_conv2d=True,
            decompose_factor=spec.decompose_factor,
        )
    raise ValueError(f"method must be one of {sorted(PEFT_ANCHORS)}, got {method!r}")


class _Holder(nn.Module):
    def __init__(self, layer: nn.Module):
        super().__init__()
        self.layer = layer


def _layer_cost(method: str, layer: nn.Module, rank: int, factor: int) -> int:
    spec = AnchorSpec({"layer": rank}, factor)
    model = peft.get_peft_model(_Holder(copy.deepcopy(layer)), _config(method, spec))
    return sum(p.numel() for p in trainable_of(model))


def _fit(method: str, layer: nn.Module, available: int, factor: int) -> tuple[int, int]:
    """The rank whose cost is the largest within ``available`` (rank 1 if none fits)."""
    best = (1, _layer_cost(method, layer, 1, factor))
    for rank in range(2, _MAX_RANK + 1):
        cost = _layer_cost(method, layer, rank, factor)
        if cost > available:
            break
        best = (rank, cost)
    return best


def _allocate(
    model: nn.Module, method: str, budgets: dict[str, int], factor: int
) -> tuple[AnchorSpec, int]:
    carry, ranks, total = 0, {}, 0
    for name in sorted(budgets, key=budgets.__getitem__):
        available = budgets[name] + carry
        ranks[name], cost = _fit(method, model.get_submodule(name), available, factor)
        carry, total = available - cost, total + cost
    return AnchorSpec({name: ranks[name] for name in budgets}, factor), total


def anchor_spec(
    model: nn.Module, method: str, budget_rank: int, targets: Sequence[str]
) -> AnchorSpec:
    """Per-layer ranks of ``method`` within the LoRA-``budget_rank`` budget (module notes).

    For LoKr, also the ``decompose_factor`` (of PEFT's default -1, and 8, 4
    and 2) that spends the most of the budget without exceeding it: at the
    default, a layer's Kronecker factors are near square roots of its
    channel counts and the adapter cannot grow past a few thousand entries
    here, whatever its rank.
    """
    budgets = lora_budget(model, budget_rank, targets)
    factors = _LOKR_FACTORS if method == "lokr" else (-1,)
    candidates = [_allocate(model, method, budgets, f) for f in factors]
    budget = sum(budgets.values())
    within = [c for c in candidates if c[1] <= budget] or [min(candidates, key=lambda c: c[1])]
    return max(within, key=lambda c: c[1])[0]


def anchor_model(base: nn.Module, method: str, spec: AnchorSpec) -> Adapted:
    """A copy of ``base`` with ``method`` (a key of :data:`PEFT_ANCHORS`) as ``spec`` says."""
    model = peft.get_peft_model(copy.deepcopy(base), _config(method, spec))
    ranks = {name: (r,) for name, r in spec.ranks.items()}
    return Adapted(model, trainable_of(model), ranks)
