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

from tuckerlib import fold, unfold

__all__ = ["block_sum", "mode_order", "reconstruct", "to_usable_ranks"]


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
    r""":math:`G \times_n U_n` for every ``n`` in ``modes`` (default: all); contiguous."""
    modes = range(core.ndim) if modes is None else modes
    shape = [f.shape[0] for f in factors]
    x = core
    for n in mode_order(shape, core.shape, modes):
        x = _mode_product(x, factors[n], n)
    return x


def to_usable_ranks(
    core: torch.Tensor, factors: Sequence[torch.Tensor]
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    r"""The same Tucker tensor at its usable ranks, exactly (up to rounding).

    A mode whose rank exceeds :math:`\min(I_n, \prod_{m \ne n} R_m)` holds more
    columns than the tensor can use: ``U_n @ unfold(core, n)`` has at most
    that rank, so its reduced QR ``Q R`` gives an orthonormal factor ``Q``
    and the core's new unfolding ``R``. Repeated until every mode fits
    (the ranks are then :func:`flora.spec.usable_ranks`); modes that already
    fit are untouched.
    """
    factors = list(factors)
    shape = [f.shape[0] for f in factors]
    while True:
        ranks = tuple(core.shape)
        bounds = [min(shape[n], math.prod(ranks[:n] + ranks[n + 1 :])) for n in range(core.ndim)]
        modes = [n for n in range(core.ndim) if bounds[n] < ranks[n]]
        if not modes:
            return core, factors
        n = modes[0]
        q, r = torch.linalg.qr(factors[n] @ unfold(core, n))
        new_shape = (*ranks[:n], q.shape[1], *ranks[n + 1 :])
        core, factors[n] = fold(r, n, new_shape), q


def block_sum(
    terms: Sequence[tuple[torch.Tensor, Sequence[torch.Tensor]]],
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    r""":math:`\sum_i \text{core\_i} \times_n U_n^i` as one Tucker tensor, exactly, at usable ranks.

    The core is block-diagonal (term ``i`` at offset :math:`\sum_{j<i} R^j` in every
    mode), the factors are the terms' factors side by side; :func:`to_usable_ranks`
    then takes out what the sum cannot use.
    """
    ranks = [sum(core.shape[n] for core, _ in terms) for n in range(terms[0][0].ndim)]
    first = terms[0][0]
    core = torch.zeros(ranks, dtype=first.dtype, device=first.device)
    offsets = [0] * len(ranks)
    for block, _ in terms:
        index = tuple(slice(o, o + r) for o, r in zip(offsets, block.shape, strict=True))
        core[index] = block
        offsets = [o + r for o, r in zip(offsets, block.shape, strict=True)]
    factors = [torch.cat([f[n] for _, f in terms], dim=1) for n in range(len(ranks))]
    return to_usable_ranks(core, factors)
