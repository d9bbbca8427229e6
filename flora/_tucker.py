"""Tucker reconstruction in plain torch ops, for the adapters' forward passes.

:func:`tuckerlib.tucker_to_tensor` computes the same tensor for any array
library, but its generic dispatch and validation cost a few hundred
microseconds per call, which a layer's forward pays on every step; this
module keeps only the torch arithmetic. Tests check both agree.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

__all__ = ["reconstruct", "reconstruction_flops"]


def _order(shape: Sequence[int], ranks: Sequence[int], modes: Sequence[int]) -> list[int]:
    # Applying mode n multiplies the tensor's size by I_n / R_n: the modes that
    # grow it least go first, so the expensive products see the smallest tensor.
    return sorted(modes, key=lambda n: shape[n] / ranks[n])


def reconstruct(
    core: torch.Tensor, factors: Sequence[torch.Tensor], modes: Sequence[int] | None = None
) -> torch.Tensor:
    """``core ×_n factors[n]`` for every ``n`` in ``modes`` (default: all)."""
    modes = range(core.ndim) if modes is None else modes
    shape = [f.shape[0] for f in factors]
    x = core
    for n in _order(shape, core.shape, modes):
        x = torch.movedim(torch.tensordot(factors[n], x, dims=([1], [n])), 0, n)
    return x


def reconstruction_flops(
    shape: Sequence[int], ranks: Sequence[int], modes: Sequence[int] | None = None
) -> int:
    """Multiply-adds of :func:`reconstruct` for these sizes."""
    modes = range(len(shape)) if modes is None else modes
    current = list(ranks)
    total = 0
    for n in _order(shape, ranks, modes):
        total += shape[n] * math.prod(current)
        current[n] = shape[n]
    return total
