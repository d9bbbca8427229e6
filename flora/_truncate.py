r"""Shrink a Tucker update by a truncated ST-HOSVD of its small core.

With :math:`U_n = Q_n R_n` (QR, ``Q_n`` orthonormal), :math:`\Delta W = s \cdot C \times_n Q_n`
where :math:`C = G \times_n R_n` is no larger than ``G``. Orthonormal ``Q_n`` keep
norms and mode spectra, so the truncated ST-HOSVD :math:`C ≈ H \times_n V_n` gives
:math:`\Delta W' = s \cdot H \times_n (Q_n V_n)` with :math:`\|\Delta W - \Delta W'\| / \|\Delta W\|
= \|C - C'\| / \|C\|`,
computed on the small tensors. It is exact when the new ranks hold ``C``'s
multilinear rank. The mode order is the one ST-HOSVD uses on :math:`\Delta W` itself
(largest :math:`I_n / R_n` first), so the result is the ST-HOSVD of :math:`\Delta W`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from flora._tucker import to_usable_ranks
from tuckerlib import relative_error, sthosvd, tucker_to_tensor

__all__ = ["Compressed", "padded_spectra", "truncate_tucker"]

#: Picks the new ranks from the small core ``C`` (float64) and ``ΔW``'s shape.
RankRule = Callable[[torch.Tensor, tuple[int, ...]], Sequence[int]]


@dataclass(frozen=True)
class Compressed:
    r"""A compressed update :math:`\Delta W' = s \cdot G \times_n U_n` and its relative error."""

    core: torch.Tensor
    factors: list[torch.Tensor]
    relative_error: float


def padded_spectra(small: torch.Tensor, shape: Sequence[int]) -> list[np.ndarray]:
    r"""The mode spectra of :math:`\Delta W` from its small core, zero-padded to ``I_n``."""
    spectra = []
    for n, size in enumerate(shape):
        unfolding = small.movedim(n, 0).reshape(small.shape[n], -1)
        s = torch.linalg.svdvals(unfolding).cpu().numpy()
        spectra.append(np.concatenate([s, np.zeros(size - s.size)]))
    return spectra


def _small_core(
    core: torch.Tensor, factors: Sequence[torch.Tensor]
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    small = core.to(torch.float64)
    bases = []
    for n, factor in enumerate(factors):
        q, r = torch.linalg.qr(factor.to(torch.float64))
        small = torch.movedim(torch.tensordot(r, small, dims=([1], [n])), 0, n)
        bases.append(q)
    return small, bases


def _check_target(target: Sequence[int], shape: tuple[int, ...]) -> tuple[int, ...]:
    target = tuple(int(r) for r in target)
    if len(target) != len(shape) or any(
        r < 1 or r > size for r, size in zip(target, shape, strict=True)
    ):
        raise ValueError(
            f"ranks must give one rank in [1, I_n] per mode of shape {shape}, got {target}"
        )
    return target


def truncate_tucker(
    core: torch.Tensor, factors: Sequence[torch.Tensor], ranks: Sequence[int] | RankRule
) -> Compressed:
    r"""Truncate :math:`\Delta W = s \cdot G \times_n U_n` to ``ranks`` (or the ranks a rule picks).

    The layer's scale ``s`` multiplies :math:`\Delta W` and :math:`\Delta W'` alike, so it is
    kept as it is and plays no part here.

    Parameters
    ----------
    core, factors : torch.Tensor
        The update's core ``(R_0, ...)`` and factors ``(I_n, R_n)``.
    ranks : sequence of int or callable
        The new ranks, one in ``[1, I_n]`` per mode, or a function of the
        small core ``C`` (float64) and :math:`\Delta W`'s shape that returns them.

    Returns
    -------
    Compressed
        Core and factors in the input's dtype, at ranks no larger than the new ranks,
        :math:`\Delta W`'s own and what a Tucker tensor can use; the relative error
        :math:`\|\Delta W - \Delta W'\| / \|\Delta W\|` (``0.0`` for :math:`\Delta W = 0`).
    """
    dtype = core.dtype
    shape = tuple(f.shape[0] for f in factors)
    small, bases = _small_core(core, factors)
    target = _check_target(ranks(small, shape) if callable(ranks) else ranks, shape)
    order = sorted(range(len(shape)), key=lambda n: (-shape[n] / target[n], n))
    truncated = sthosvd(
        small, [min(r, k) for r, k in zip(target, small.shape, strict=True)], order=order
    )
    error = (
        relative_error(small, tucker_to_tensor(truncated.core, truncated.factors))
        if small.any()
        else 0.0
    )
    new_core, new_factors = to_usable_ranks(
        truncated.core, [q @ v for q, v in zip(bases, truncated.factors, strict=True)]
    )
    return Compressed(new_core.to(dtype), [f.to(dtype) for f in new_factors], float(error))
