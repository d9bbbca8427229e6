r"""Grouped and depthwise convolutions with a fast exact weight gradient.

A grouped convolution's adapter runs dense (its weight :math:`W + \Delta W` is one
tensor per group), so a training step computes the weight gradient of a
grouped convolution, which the frozen base layer never does. On the CPU,
PyTorch hands it to oneDNN, whose kernel depends on the shape and layout:
for contiguous (NCHW) tensors only depthwise kernels of at most 3 taps an
axis and groups of at least 8 channels get a direct kernel; every other
shape goes to im2col and one small GEMM per group, many times slower (an
8×96×56² depthwise 7×7 kernel: about 70 ms on two threads).

:func:`grouped_conv` computes exactly ``F.convNd(x, weight, bias, ...)`` and
the same gradients, with the weight gradient computed one of three ways
(``flora._cost.grouped_weight_grad`` picks from the shapes):

``"native"``
    PyTorch's own backward.
``"channels_last"``
    PyTorch's backward on channels-last copies of the input and the output
    gradient, where oneDNN has a direct kernel for every undilated shape.
``"swapped"``
    For depthwise kernels (one input channel a group): the gradient
    :math:`\sum_n x[n, c] \star g[n, o]` is one *forward* depthwise convolution whose
    input is ``x`` with batch and channels merged into :math:`N \cdot C` channels and
    whose :math:`N \cdot C_\text{out}` kernels are the output gradient's planes, stride and
    dilation exchanged; the ``N`` partial kernels are then summed. oneDNN's
    direct forward kernel takes any kernel size, so the 7×7 case above runs
    several times faster than on either layout's backward kernel, and even
    a 3×3 one beats the direct backward kernel.

The input gradient always runs as PyTorch's own, where the base layer
computes its own.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F  # noqa: N812

from flora._cost import grouped_weight_grad

__all__ = ["grouped_conv"]

_CONV = {3: F.conv1d, 4: F.conv2d, 5: F.conv3d}


def _channels_last(t: torch.Tensor) -> torch.Tensor:
    # A 1-D convolution runs as a 2-D one of height 1 (unsqueezed by the caller).
    return t.contiguous(
        memory_format=torch.channels_last if t.ndim == 4 else torch.channels_last_3d
    )


class _GroupedConv(torch.autograd.Function):
    """``F.convNd`` with numeric padding; the weight gradient as ``method`` says."""

    @staticmethod
    def forward(
        x: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        stride: tuple[int, ...],
        padding: tuple[int, ...],
        dilation: tuple[int, ...],
        groups: int,
        method: str,
    ) -> torch.Tensor:
        return _CONV[x.ndim](x, weight, bias, stride, padding, dilation, groups)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: Any) -> None:
        x, weight, _, stride, padding, dilation, groups, method = inputs
        ctx.save_for_backward(x, weight)
        ctx.geometry = (stride, padding, dilation, groups)
        ctx.method = method

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, weight = ctx.saved_tensors
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        grad_w = None
        if need_w:
            # First, so its temporary copies are freed before the input gradient exists.
            grad_w = _WEIGHT_GRAD[ctx.method](ctx.geometry, grad, x, weight)
        grad_x = (
            _backward(ctx.geometry, grad, x, weight, (True, False, False))[0] if need_x else None
        )
        grad_b = grad.sum([d for d in range(grad.ndim) if d != 1]) if need_b else None
        return grad_x, grad_w, grad_b, None, None, None, None, None


Geometry = tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...], int]


def _backward(
    geometry: Geometry,
    grad: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    mask: tuple[bool, ...],
) -> tuple[torch.Tensor | None, ...]:
    stride, padding, dilation, groups = geometry
    zeros = (0,) * len(stride)
    return torch.ops.aten.convolution_backward(
        grad, x, weight, None, stride, padding, dilation, False, zeros, groups, mask
    )


def _native(
    geometry: Geometry, grad: torch.Tensor, x: torch.Tensor, weight: torch.Tensor
) -> torch.Tensor:
    return _backward(geometry, grad, x, weight, (False, True, False))[1]


def _on_channels_last(
    geometry: Geometry, grad: torch.Tensor, x: torch.Tensor, weight: torch.Tensor
) -> torch.Tensor:
    copies = (_channels_last(grad), _channels_last(x), _channels_last(weight))
    return _backward(geometry, *copies, (False, True, False))[1].contiguous()


def _swapped(
    geometry: Geometry, grad: torch.Tensor, x: torch.Tensor, weight: torch.Tensor
) -> torch.Tensor:
    # ΔW[o, 0, k] = Σ_n Σ_p x[n, o // m, p·stride + k·dilation] g[n, o, p], m = out/groups:
    # a forward depthwise convolution of x (batch merged into channels) with the
    # kernels g[n, o], at stride `dilation` and dilation `stride`.
    stride, padding, dilation, groups = geometry
    batch, kernel = x.shape[0], weight.shape[2:]
    merged = _CONV[x.ndim](
        x.reshape(1, -1, *x.shape[2:]),
        grad.reshape(-1, 1, *grad.shape[2:]),
        None,
        dilation,
        padding,
        stride,
        batch * groups,
    )
    window = (0, slice(None), *(slice(0, k) for k in kernel))
    return merged[window].reshape(batch, *weight.shape).sum(0)


_WEIGHT_GRAD = {"native": _native, "channels_last": _on_channels_last, "swapped": _swapped}


def grouped_conv(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    stride: Sequence[int],
    padding: Sequence[int],
    dilation: Sequence[int],
    groups: int,
) -> torch.Tensor:
    """``F.convNd(x, weight, bias, stride, padding, dilation, groups)``, numeric padding.

    Values and gradients are those of ``F.convNd``; the weight gradient
    runs as ``flora._cost.grouped_weight_grad`` finds fastest (see the
    module docstring). A 1-D convolution runs as a 2-D one of height 1. The
    backward runs differentiable ops, so second derivatives
    (``create_graph=True``) are those of ``F.convNd`` too.

    Examples
    --------
    >>> import torch
    >>> import torch.nn.functional as F
    >>> from flora.layers._grouped import grouped_conv
    >>> x, w = torch.randn(2, 8, 12, 12), torch.randn(8, 1, 7, 7, requires_grad=True)
    >>> y = grouped_conv(x, w, None, (1, 1), (3, 3), (1, 1), 8)
    >>> torch.allclose(y, F.conv2d(x, w, None, 1, 3, 1, 8), atol=1e-5)
    True
    """
    if x.ndim < weight.ndim:  # an unbatched input
        return grouped_conv(x.unsqueeze(0), weight, bias, stride, padding, dilation, groups)[0]
    if weight.ndim == 3:
        out = grouped_conv(
            x.unsqueeze(-2),
            weight.unsqueeze(-2),
            bias,
            (1, *stride),
            (0, *padding),
            (1, *dilation),
            groups,
        )
        return out.squeeze(-2)
    method = "native"
    if weight.requires_grad:
        method = grouped_weight_grad(x, weight.shape, groups, dilation)
    return _GroupedConv.apply(
        x, weight, bias, tuple(stride), tuple(padding), tuple(dilation), groups, method
    )
