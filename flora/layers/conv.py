r"""FLoRA adapters for ``torch.nn.Conv1d``, ``Conv2d`` and ``Conv3d``.

The Tucker modes are the weight's own axes ``(out, in/groups, *kernel)``.
The factorized forward (groups = 1) is three convolutions:

1. a 1×1 convolution with :math:`U_1^\top` maps the ``in`` channels to ``R_1``;
2. a convolution with the kernel core :math:`s \cdot G \times_2 U_2 \dots \times_{N-1} U_{N-1}`
   of shape ``(R_0, R_1, *kernel)`` and the base's stride, padding,
   dilation and padding mode;
3. a 1×1 convolution with ``U_0`` maps ``R_0`` channels to ``out``.

A per-pixel linear map commutes with every padding mode (zeros, reflect,
replicate, circular copy or zero pixels), so step 1 may run before the
padding of step 2.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F  # noqa: N812
from torch import nn

from flora._cost import Op, reconstruction_ops
from flora._tucker import reconstruct
from flora.kinds import LayerKind, add_kind
from flora.layers._grouped import grouped_conv
from flora.layers.base import FLoRALayer, TuckerDelta, scaled_core

__all__ = ["Conv1d", "Conv2d", "Conv3d"]


def _output_size(size: int, kernel: int, stride: int, padding: int, dilation: int) -> int:
    return (size + 2 * padding - dilation * (kernel - 1) - 1) // stride + 1


def _output_pixels(
    spatial: Sequence[int],
    kernel: Sequence[int],
    stride: Sequence[int],
    padding: str | Sequence[int],
    dilation: Sequence[int],
) -> int:
    if padding == "same":
        return math.prod(spatial)
    padding = (0,) * len(spatial) if padding == "valid" else padding
    # A list, not a generator: torch.compile traces list arguments of math.prod.
    sizes = [
        _output_size(*args) for args in zip(spatial, kernel, stride, padding, dilation, strict=True)
    ]
    return math.prod(sizes)


class _ConvNd(FLoRALayer):
    _conv: Callable[..., torch.Tensor]

    @property
    def factorizable(self) -> bool:
        """Whether the factorized forward applies: only for ``groups == 1``."""
        return self.base_layer.groups == 1

    def _spatial_conv(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """Convolve with the base's geometry (stride, padding, dilation, mode), groups 1."""
        base = self.base_layer
        if base.padding_mode != "zeros":
            x = F.pad(x, base._reversed_padding_repeated_twice, mode=base.padding_mode)
            return type(self)._conv(x, weight, None, base.stride, 0, base.dilation)
        return type(self)._conv(x, weight, None, base.stride, base.padding, base.dilation)

    def factorized_branch(self, x: torch.Tensor, adapter: TuckerDelta) -> torch.Tensor:
        """A pointwise conv to ``R_in`` channels, the core's kernel conv, a pointwise conv out."""
        shape, ranks = adapter.spec.shape, adapter.spec.ranks
        factors = list(adapter.factors)
        pointwise = (1,) * (len(shape) - 2)
        conv = type(self)._conv
        h = conv(x, factors[1].T.reshape(ranks[1], shape[1], *pointwise))
        kernel_core = reconstruct(scaled_core(adapter), factors, range(2, len(shape)))
        h = self._spatial_conv(h, kernel_core)
        return conv(h, factors[0].reshape(shape[0], ranks[0], *pointwise))

    def _grouped(
        self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None
    ) -> torch.Tensor:
        """The base's convolution with ``weight`` through :func:`grouped_conv` (groups > 1)."""
        base = self.base_layer
        padding = base.padding
        pads = base._reversed_padding_repeated_twice
        if base.padding_mode != "zeros":
            x, padding = F.pad(x, pads, mode=base.padding_mode), (0,) * len(base.stride)
        elif isinstance(padding, str):
            # "valid", or "same" as the base pads it: symmetric where it can.
            before, after = pads[-2::-2], pads[::-1][::2]
            if before == after:
                padding = tuple(before)
            else:
                x, padding = F.pad(x, pads), (0,) * len(base.stride)
        return grouped_conv(x, weight, bias, base.stride, padding, base.dilation, base.groups)

    def dense_branch(self, x: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        r"""The base's convolution with :math:`\Delta W`, no bias (grouped ones too)."""
        if self.base_layer.groups > 1:
            return self._grouped(x, delta, None)
        return self.base_layer._conv_forward(x, delta, None)

    def _bias_view(self, bias: torch.Tensor) -> torch.Tensor:
        # Channels come before the spatial axes, batched or not.
        return bias.reshape(-1, *(1,) * (self.base_layer.weight.ndim - 2))

    def fused_forward(self, x: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        r"""The base's convolution with :math:`W + \Delta W` and its bias: one op."""
        base = self.base_layer
        if base.groups > 1:
            return self._grouped(x, base.weight + delta, base.bias)
        return base._conv_forward(x, base.weight + delta, base.bias)

    def cost_geometry(self) -> tuple:
        """``(stride, padding, dilation, groups)`` of the base convolution."""
        base = self.base_layer
        return (base.stride, base.padding, base.dilation, base.groups)

    @classmethod
    def branch_costs(
        cls, geometry: tuple, shape: tuple[int, ...], x_shape: tuple[int, ...], ranks: Sequence[int]
    ) -> tuple[list[Op], Op, int, int]:
        """The pointwise, core and kernel convolutions against the dense convolution."""
        stride, padding, dilation, groups = geometry
        out_channels, in_per_group, *kernel = shape
        out_rank, in_rank = ranks[:2]
        spatial = tuple(x_shape[-len(kernel) :])
        in_channels = in_per_group * groups
        elements = math.prod(x_shape)
        batch = elements // (in_channels * math.prod(spatial))
        in_pixels = batch * math.prod(spatial)
        out_pixels = batch * _output_pixels(spatial, kernel, stride, padding, dilation)
        taps = math.prod(kernel)
        modes = range(2, len(shape))
        factorized = [
            Op(
                in_pixels * in_channels * in_rank,
                in_pixels * (in_channels + in_rank) + in_channels * in_rank,
            ),
            *reconstruction_ops((out_rank, in_rank, *kernel), ranks, modes),
            Op(
                out_pixels * taps * in_rank * out_rank,
                in_pixels * in_rank + out_rank * in_rank * taps + out_pixels * out_rank,
            ),
            Op(
                out_pixels * out_rank * out_channels,
                out_pixels * (out_rank + out_channels) + out_rank * out_channels,
            ),
        ]
        dense = Op(
            out_pixels * out_channels * in_per_group * taps,
            in_pixels * in_channels + math.prod(shape) + out_pixels * out_channels,
        )
        return factorized, dense, elements, out_pixels * out_channels


class Conv1d(_ConvNd):
    """A ``torch.nn.Conv1d`` with a FLoRA adapter on its weight.

    The Tucker modes are the weight axes ``(out, in/groups, k)``, with
    ranks ``(R_out, R_in, R_k)``. Parameters, options and errors are those
    of :class:`Conv2d`, for a ``torch.nn.Conv1d`` base layer.

    Examples
    --------
    >>> import torch
    >>> import flora
    >>> layer = flora.Conv1d(torch.nn.Conv1d(8, 8, 3, groups=8))
    >>> layer.ranks
    (2, 1, 2)
    >>> x = torch.randn(2, 8, 10)
    >>> torch.equal(layer(x), layer.base_layer(x))
    True
    """

    kind = "Conv1d"
    base_type = nn.Conv1d
    _conv = F.conv1d


class Conv2d(_ConvNd):
    r"""A ``torch.nn.Conv2d`` with a FLoRA adapter on its weight.

    The Tucker modes are the weight axes ``(out, in/groups, kh, kw)``.

    Any ``stride``, ``padding`` (ints, tuples, ``"same"``, ``"valid"``),
    ``dilation``, ``groups`` (depthwise included) and ``padding_mode``.

    Parameters
    ----------
    base_layer : torch.nn.Conv2d
        The layer to adapt; frozen, kept as ``self.base_layer``.
    ranks : int or sequence of int or None, optional
        Ranks ``(R_out, R_in, R_kh, R_kw)``, clipped to the weight's shape
        and to the usable ranks (a depthwise layer's ``in/groups`` mode of
        size 1 gets rank 1, its output mode at most ``R_kh R_kw``). The
        default is the paper's ConvNeXt configuration.
    scale : float, optional
        The factor ``s``.
    dropout : float, optional
        Dropout probability on the branch input.
    init : {"auto", "balanced", "zero_core", "hosvd", "gaussian"}, optional
        See :mod:`flora.init`.
    forward : {"auto", "dense", "factorized"}, optional
        ``"factorized"`` runs 1×1 conv → core conv → 1×1 conv (see
        :mod:`flora.layers.conv`); ``"dense"`` builds :math:`\Delta W` and runs one
        convolution with :math:`W + \Delta W`. Layers with ``groups > 1`` always run
        dense.
    adapter_name : str or None, optional
        Name of the adapter created (``"default"``); ``None`` wraps the
        layer without adapters.

    Raises
    ------
    TypeError
        If ``base_layer`` is not exactly a ``torch.nn.Conv2d``.
    ValueError
        For invalid ranks, scale, dropout, init or forward.

    See Also
    --------
    flora.inject : Adapt every matching layer of a model.

    Examples
    --------
    >>> import torch
    >>> import flora
    >>> layer = flora.Conv2d(torch.nn.Conv2d(8, 8, 3, groups=8))
    >>> layer.ranks
    (4, 1, 2, 2)
    >>> x = torch.randn(2, 8, 6, 6)
    >>> torch.equal(layer(x), layer.base_layer(x))
    True
    """

    kind = "Conv2d"
    base_type = nn.Conv2d
    _conv = F.conv2d


class Conv3d(_ConvNd):
    """A ``torch.nn.Conv3d`` with a FLoRA adapter on its weight.

    The Tucker modes are the weight axes ``(out, in/groups, kd, kh, kw)``,
    with ranks ``(R_out, R_in, R_kd, R_kh, R_kw)``. Parameters, options and
    errors are those of :class:`Conv2d`, for a ``torch.nn.Conv3d`` base
    layer.

    Examples
    --------
    >>> import torch
    >>> import flora
    >>> layer = flora.Conv3d(torch.nn.Conv3d(8, 8, 3, groups=8))
    >>> layer.ranks
    (8, 1, 2, 2, 2)
    >>> x = torch.randn(1, 8, 4, 4, 4)
    >>> torch.equal(layer(x), layer.base_layer(x))
    True
    """

    kind = "Conv3d"
    base_type = nn.Conv3d
    _conv = F.conv3d


for _layer in (Conv1d, Conv2d, Conv3d):
    add_kind(LayerKind(_layer.kind, (_layer.base_type,), _layer, lora="conv"))
del _layer
