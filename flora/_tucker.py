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

__all__ = ["mode_order", "reconstruct"]


def mode_order(shape: Sequence[int], ranks: Sequence[int], modes: Sequence[int]) -> list[int]:
    """The order in which :func:`reconstruct` applies the factors of ``modes``."""
    # Applying mode n multiplies the tensor's size by I_n / R_n: the modes that
    # grow it least go first, so the expensive products see the smallest tensor.
    return sorted(modes, key=lambda n: shape[n] / ranks[n])


def _mode_product(x: torch.Tensor, factor: torch.Tensor, n: int) -> torch.Tensor:
    # x viewed as (before, R_n, after) is contiguous, so neither x nor its
    # gradient is ever a permuted view: a permuted core gradient makes DDP warn
    # about bucket strides and copy on every step.
    before = math.prod(x.shape[:n])
    after = math.prod(x.shape[n + 1 :])
    shape = (*x.shape[:n], factor.shape[0], *x.shape[n + 1 :])
    if after == 1:
        return (x.reshape(before, x.shape[n]) @ factor.T).reshape(shape)
    return (factor @ x.reshape(before, x.shape[n], after)).reshape(shape)


def reconstruct(
    core: torch.Tensor, factors: Sequence[torch.Tensor], modes: Sequence[int] | None = None
) -> torch.Tensor:
    """``core ×_n factors[n]`` for every ``n`` in ``modes`` (default: all); contiguous."""
    modes = range(core.ndim) if modes is None else modes
    shape = [f.shape[0] for f in factors]
    x = core
    for n in mode_order(shape, core.shape, modes):
        x = _mode_product(x, factors[n], n)
    return x
