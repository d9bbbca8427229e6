"""Grouped and depthwise convolutions whose weight gradient may run channels-last.

A grouped convolution's adapter runs dense (its weight ``W + ΔW`` is one
tensor per group), so a training step computes the weight gradient of a
grouped convolution, which the frozen base layer never does. On the CPU,
PyTorch hands that gradient to oneDNN, whose choice of kernel depends on the
memory layout: for contiguous (NCHW) tensors only undilated depthwise
kernels of at most 3 taps an axis and groups of at least 8 channels get a
direct kernel, every other shape goes to im2col and one small GEMM per
group, several times slower (8×96×56² depthwise 7×7: 68 ms against 18 ms channels-last on two
threads). Channels-last tensors get the direct kernel for every shape.

:func:`grouped_conv` computes exactly ``F.convNd(x, weight, bias, ...)``
and the same gradients; the only difference is where the weight gradient
runs: in the input's own layout, or on channels-last copies of the input
and the output gradient, as :func:`flora._cost.channels_last_weight_grad`
decides from the shapes. The input gradient always runs in the input's
layout, where the base layer computes its own.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F  # noqa: N812

from flora._cost import channels_last_weight_grad

__all__ = ["grouped_conv"]

_CONV = {3: F.conv1d, 4: F.conv2d, 5: F.conv3d}


def _channels_last(t: torch.Tensor) -> torch.Tensor:
    # A 1-D convolution runs as a 2-D one of height 1 (unsqueezed by the caller).
    return t.contiguous(
        memory_format=torch.channels_last if t.ndim == 4 else torch.channels_last_3d
    )


class _GroupedConv(torch.autograd.Function):
    """``F.convNd`` with numeric padding; the weight gradient in the layout ``ctx`` says."""

    @staticmethod
    def forward(
        x: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        stride: tuple[int, ...],
        padding: tuple[int, ...],
        dilation: tuple[int, ...],
        groups: int,
        channels_last: bool,
    ) -> torch.Tensor:
        return _CONV[x.ndim](x, weight, bias, stride, padding, dilation, groups)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: Any) -> None:
        x, weight, bias, stride, padding, dilation, groups, channels_last = inputs
        ctx.save_for_backward(x, weight)
        ctx.geometry = (stride, padding, dilation, groups)
        ctx.has_bias = bias is not None
        ctx.channels_last = channels_last

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, weight = ctx.saved_tensors
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        grad_w = None
        if need_w:
            # First, so its channels-last copies are freed before the input gradient exists.
            grad_w = _weight_grad(ctx, grad, x, weight)
        grad_x = _backward(ctx, grad, x, weight, (True, False, False))[0] if need_x else None
        grad_b = grad.sum([d for d in range(grad.ndim) if d != 1]) if need_b else None
        return grad_x, grad_w, grad_b, None, None, None, None, None


def _backward(
    ctx: Any, grad: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, mask: tuple[bool, ...]
) -> tuple[torch.Tensor | None, ...]:
    stride, padding, dilation, groups = ctx.geometry
    zeros = (0,) * len(stride)
    return torch.ops.aten.convolution_backward(
        grad, x, weight, None, stride, padding, dilation, False, zeros, groups, mask
    )


def _weight_grad(
    ctx: Any, grad: torch.Tensor, x: torch.Tensor, weight: torch.Tensor
) -> torch.Tensor:
    if not ctx.channels_last:
        return _backward(ctx, grad, x, weight, (False, True, False))[1]
    grad_w = _backward(
        ctx, _channels_last(grad), _channels_last(x), _channels_last(weight), (False, True, False)
    )[1]
    return grad_w.contiguous()


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

    Values and gradients are those of ``F.convNd``; a weight gradient that
    :func:`flora._cost.channels_last_weight_grad` finds faster channels-last
    runs on channels-last copies. A 1-D convolution runs as a 2-D one of
    height 1. The backward runs differentiable ops, so second derivatives
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
    channels_last = weight.requires_grad and channels_last_weight_grad(
        x, weight.shape, groups, dilation
    )
    return _GroupedConv.apply(
        x, weight, bias, tuple(stride), tuple(padding), tuple(dilation), groups, channels_last
    )
