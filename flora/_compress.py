"""Shrink a Tucker update by a truncated ST-HOSVD of its small core.

With ``U_n = Q_n R_n`` (QR, ``Q_n`` orthonormal), ``ΔW = s · C ×_n Q_n``
where ``C = G ×_n R_n`` is no larger than ``G``. Orthonormal ``Q_n`` keep
norms and mode spectra, so the truncated ST-HOSVD ``C ≈ H ×_n V_n`` gives
``ΔW' = s · H ×_n (Q_n V_n)`` with ``‖ΔW − ΔW'‖ / ‖ΔW‖ = ‖C − C'‖ / ‖C‖``,
computed on the small tensors. It is exact when the new ranks hold ``C``'s
multilinear rank. The mode order is the one ST-HOSVD uses on ``ΔW`` itself
(largest ``I_n / R_n`` first), so the result is the ST-HOSVD of ``ΔW``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from flora._lora_math import compact
from tuckerlib import energy_ranks, relative_error, sthosvd, tucker_to_tensor

__all__ = ["Compressed", "compress_tucker"]


@dataclass(frozen=True)
class Compressed:
    """A compressed update ``ΔW' = s · core ×_n factors[n]`` and its relative error."""

    core: torch.Tensor
    factors: list[torch.Tensor]
    relative_error: float


def _target_ranks(
    shape: tuple[int, ...],
    ranks: int | Sequence[int] | None,
    energy: float | None,
    core: torch.Tensor,
) -> tuple[int, ...]:
    if (ranks is None) == (energy is None):
        raise ValueError("give exactly one of ranks and energy")
    if energy is not None:
        return tuple(energy_ranks(core, energy))
    if isinstance(ranks, int):
        return tuple(min(ranks, size) for size in shape)
    ranks = tuple(ranks)
    if len(ranks) != len(shape) or any(
        r < 1 or r > size for r, size in zip(ranks, shape, strict=True)
    ):
        raise ValueError(
            f"ranks must give one rank in [1, I_n] per mode of shape {shape}, got {ranks}"
        )
    return ranks


def compress_tucker(
    core: torch.Tensor,
    factors: Sequence[torch.Tensor],
    *,
    ranks: int | Sequence[int] | None = None,
    energy: float | None = None,
) -> Compressed:
    """Truncate ``ΔW = s · core ×_n factors[n]`` to ``ranks`` (or to keep ``energy``).

    The layer's scale ``s`` multiplies ``ΔW`` and ``ΔW'`` alike, so it is
    kept as it is and plays no part here.

    Parameters
    ----------
    core, factors : torch.Tensor
        The update's core ``(R_0, ...)`` and factors ``(I_n, R_n)``.
    ranks : int or sequence of int, optional
        The new ranks (an int for every mode, clipped to each mode's size).
    energy : float, optional
        Instead of ``ranks``: per mode, the smallest rank keeping this
        fraction of ``‖ΔW‖²`` (:func:`tuckerlib.energy_ranks`).

    Returns
    -------
    Compressed
        Core and factors in the input's dtype, at ranks no larger than the
        new ranks, ``ΔW``'s own and what a Tucker tensor can use; the
        relative error ``‖ΔW − ΔW'‖ / ‖ΔW‖`` (``0.0`` for ``ΔW = 0``).
    """
    dtype = core.dtype
    shape = tuple(f.shape[0] for f in factors)
    small = core.to(torch.float64)
    bases = []
    for n, factor in enumerate(factors):
        q, r = torch.linalg.qr(factor.to(torch.float64))
        small = torch.movedim(torch.tensordot(r, small, dims=([1], [n])), 0, n)
        bases.append(q)
    target = _target_ranks(shape, ranks, energy, small)
    order = sorted(range(len(shape)), key=lambda n: (-shape[n] / target[n], n))
    truncated = sthosvd(
        small, [min(r, k) for r, k in zip(target, small.shape, strict=True)], order=order
    )
    error = (
        relative_error(small, tucker_to_tensor(truncated.core, truncated.factors))
        if small.any()
        else 0.0
    )
    new_core, new_factors = compact(
        truncated.core, [q @ v for q, v in zip(bases, truncated.factors, strict=True)]
    )
    return Compressed(new_core.to(dtype), [f.to(dtype) for f in new_factors], float(error))
