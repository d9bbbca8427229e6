"""Small models with one adapted layer of every kind LoRA export supports, for the LoRA tests."""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch
import torch.nn.functional as F  # noqa: N812
from torch import nn

import flora

__all__ = ["CASES", "flora_model"]


class _Weighted(nn.Module):
    """A module whose 2-D parameter is adapted as a parameter, not as a layer."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(5, 6) / 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight)


def _padded_embedding() -> nn.Embedding:
    # A pretrained table's padding row is rarely zero, unlike a fresh one's.
    embedding = nn.Embedding(10, 6, padding_idx=0)
    with torch.no_grad():
        embedding.weight[0].normal_()
    return embedding


# name -> (base layer factory, input factory, flora ranks)
CASES: dict[str, tuple[Callable[[], nn.Module], Callable[[], torch.Tensor], object]] = {
    "Linear": (lambda: nn.Linear(6, 5), lambda: torch.randn(3, 6), 3),
    "Conv1d": (lambda: nn.Conv1d(4, 6, 3, stride=2, padding=1), lambda: torch.randn(2, 4, 9), 3),
    "Conv2d": (lambda: nn.Conv2d(4, 6, (3, 2), padding=1), lambda: torch.randn(2, 4, 6, 5), 3),
    "Conv3d": (lambda: nn.Conv3d(3, 4, 2), lambda: torch.randn(2, 3, 4, 4, 3), 2),
    "Conv2d-grouped": (
        lambda: nn.Conv2d(6, 9, 3, groups=3, padding="same"),
        lambda: torch.randn(2, 6, 5, 5),
        (4, 2, 2, 2),
    ),
    "Conv2d-depthwise": (
        lambda: nn.Conv2d(4, 4, 3, groups=4),
        lambda: torch.randn(2, 4, 5, 5),
        (4, 1, 2, 2),
    ),
    "Embedding": (
        _padded_embedding,
        lambda: torch.tensor([[0, 3, 9, 0], [1, 2, 0, 5]]),
        3,
    ),
    "Parameter": (_Weighted, lambda: torch.randn(3, 6), 3),
}


def flora_model(case: str, init: str) -> tuple[nn.Module, nn.Module]:
    """(base, adapted copy with a non-zero update) for one case."""
    torch.manual_seed(0)
    make, _, ranks = CASES[case]
    base = nn.Sequential(make())
    model = copy.deepcopy(base)
    targets = (
        {"target_parameters": ["0.weight"]} if case == "Parameter" else {"target_modules": ["0"]}
    )
    flora.inject(model, flora.FLoRAConfig(ranks=ranks, init=init, scale=0.7, **targets))
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for layer in flora.adapted_layers(model).values():
            for p in (layer.core, *layer.factors):
                p.add_(0.5 * torch.randn(p.shape, generator=generator))
    return base, model.eval()
