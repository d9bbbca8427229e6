r"""Exact conversion between Tucker updates and PEFT LoRA tensors (PEFT 0.21's layout).

A Tucker update :math:`\Delta W = s \cdot G \times_0 U_0 \times_1 U_1 \dots \times_{N-1} U_{N-1}`
has
:math:`\text{unfold}(\Delta W, 0) = U_0 \cdot \text{unfold}(s \cdot G \times_1 U_1 \dots
\times_{N-1} U_{N-1}, 0)`: a
product of an ``(I_0, R_0)`` matrix and an :math:`(R_0, \prod_{n>0} I_n)` one, which
is exactly what a LoRA pair stores with ``lora_alpha = r`` (scaling 1):

* Linear ``(out, in)``: :math:`\texttt{lora_B} = U_0`, :math:`\text{lora\_A} = s \cdot G U_1^\top`.
* ConvNd ``(out, in, *kernel)``: ``lora_A`` is the conv kernel
  :math:`s \cdot G \times_1 U_1 \dots \times_{N-1} U_{N-1}` of shape ``(R_0, in, *kernel)``
  (run with the base's stride and padding) and :math:`\texttt{lora_B} = U_0` a 1×1 conv;
  a 1×1 conv after a conv is the conv with the composed kernel.
* Grouped ConvNd ``(out, in/groups, *kernel)``: PEFT's ``lora_A`` sees all
  ``in`` channels and its ``lora_B`` is grouped; rank block ``g`` gets
  group ``g``'s rows of ``U_0`` and a ``lora_A`` that is zero outside group
  ``g``'s input channels, so the composed update is the block-diagonal
  grouped one.
* Embedding ``(num, dim)``: PEFT's update is :math:`(B A)^\top`, so
  :math:`\text{lora\_embedding\_A} = U_0^\top` and :math:`\text{lora\_embedding\_B} = (s \cdot G
  U_1^\top)^\top`; the
  ``padding_idx`` column of ``lora_embedding_A`` is zero, as FLoRA gives
  the padding row no update.

:func:`flora._tucker.to_usable_ranks` first brings the ranks to what a Tucker tensor can use
(:math:`R_n \le \min(I_n, \prod_{m \ne n} R_m)`) by QR factorizations that leave :math:`\Delta W`
unchanged, so the LoRA rank is ``R_0`` after that clipping.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from flora._tucker import reconstruct, to_usable_ranks

__all__ = ["LoraTensors", "lora_split", "to_lora"]


def lora_split(
    core: torch.Tensor, factors: Sequence[torch.Tensor], scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    r"""``(left, right)`` of :math:`\Delta W = \text{right} \times_0 \text{left}`, left (I_0, r).

    ``right`` has shape :math:`(r, I_1, \dots, I_{N-1})`; ``r`` is ``R_0`` after
    :func:`flora._tucker.to_usable_ranks`.
    """
    core, factors = to_usable_ranks(core, factors)
    right = reconstruct(core * scale, factors, range(1, core.ndim))
    return factors[0], right


@dataclass(frozen=True)
class LoraTensors:
    """One layer's PEFT tensors: ``lora_A``, ``lora_B`` and the rank ``r`` PEFT builds."""

    lora_a: torch.Tensor
    lora_b: torch.Tensor
    rank: int


def _grouped_conv(left: torch.Tensor, right: torch.Tensor, groups: int) -> LoraTensors:
    out, rank = left.shape
    out_step, in_step = out // groups, right.shape[1]
    # A group with fewer output channels than R_0 is stored at full rank
    # (lora_B the identity), so every group gets the same rank, as PEFT needs.
    step = min(rank, out_step)
    lora_a = right.new_zeros((groups * step, groups * in_step, *right.shape[2:]))
    lora_b = left.new_empty((out, step))
    for g in range(groups):
        rows = slice(g * out_step, (g + 1) * out_step)
        block, kernel = left[rows], right
        if step < rank:
            block = torch.eye(out_step, dtype=left.dtype, device=left.device)
            kernel = _mode0(right, left[rows])
        lora_a[g * step : (g + 1) * step, g * in_step : (g + 1) * in_step] = kernel
        lora_b[rows] = block
    return LoraTensors(lora_a, lora_b, groups * step)


def _mode0(x: torch.Tensor, matrix: torch.Tensor) -> torch.Tensor:
    r""":math:`x \times_0 \text{matrix}`: the mode-0 unfolding of ``x`` is a reshape."""
    return (matrix @ x.reshape(x.shape[0], -1)).reshape(matrix.shape[0], *x.shape[1:])


def to_lora(
    kind: str,
    left: torch.Tensor,
    right: torch.Tensor,
    *,
    groups: int = 1,
    padding_idx: int | None = None,
) -> LoraTensors:
    r"""PEFT's tensors for :math:`\Delta W = \text{right} \times_0 \text{left}` at scaling 1.

    Parameters
    ----------
    kind : str
        ``"Linear"``, ``"Parameter"`` (2-D, stored as PEFT's
        ``target_parameters`` do, like Linear), ``"Conv1d"``, ``"Conv2d"``,
        ``"Conv3d"`` or ``"Embedding"``.
    left, right : torch.Tensor
        From :func:`lora_split`.
    groups : int, optional
        The convolution's groups.
    padding_idx : int, optional
        The embedding's padding row, which gets no update.
    """
    rank = left.shape[1]
    if kind == "Embedding":
        lora_a = left.T.clone(memory_format=torch.contiguous_format)
        if padding_idx is not None:
            lora_a[:, padding_idx] = 0
        return LoraTensors(lora_a, right.T.contiguous(), rank)
    if kind in ("Linear", "Parameter"):
        return LoraTensors(right.contiguous(), left.contiguous(), rank)
    tensors = LoraTensors(right, left, rank) if groups == 1 else _grouped_conv(left, right, groups)
    pointwise = (1,) * (right.ndim - 2)
    lora_b = tensors.lora_b.reshape(*tensors.lora_b.shape, *pointwise)
    return LoraTensors(tensors.lora_a.contiguous(), lora_b.contiguous(), tensors.rank)
