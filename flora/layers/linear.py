r"""FLoRA adapter for ``torch.nn.Linear``: :math:`\Delta W = s \cdot U_0 G U_1^\top`."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F  # noqa: N812
from torch import nn

from flora._cost import Op, product
from flora.kinds import LayerKind, add_kind
from flora.layers._thin import thin_matmul, thin_matmul_t
from flora.layers.base import FLoRALayer, TuckerDelta, scaled_core

__all__ = ["Linear"]


class Linear(FLoRALayer):
    r"""A ``torch.nn.Linear`` with a FLoRA adapter on its ``(out, in)`` weight.

    Parameters
    ----------
    base_layer : torch.nn.Linear
        The layer to adapt; frozen, kept as ``self.base_layer``.
    ranks : int or sequence of int or None, optional
        Ranks ``(R_0, R_1)`` of the output and input modes, clipped to the
        weight's shape and to the usable ranks (:math:`R_0 = R_1` for a matrix).
    scale : float, optional
        The factor ``s``.
    dropout : float, optional
        Dropout probability on the branch input.
    init : {"auto", "balanced", "zero_core", "hosvd", "gaussian"}, optional
        See :mod:`flora.init`.
    forward : {"auto", "dense", "factorized"}, optional
        ``"factorized"`` runs :math:`((x U_1) G^\top) U_0^\top`, three thin matmuls;
        ``"dense"`` builds :math:`\Delta W` and runs one linear op on :math:`W + \Delta W`.
    adapter_name : str or None, optional
        Name of the adapter created (``"default"``); ``None`` wraps the
        layer without adapters.

    Raises
    ------
    TypeError
        If ``base_layer`` is not exactly a ``torch.nn.Linear``.
    ValueError
        For invalid ranks, scale, dropout, init or forward.

    See Also
    --------
    flora.inject : Adapt every matching layer of a model.

    Examples
    --------
    >>> import torch
    >>> import flora
    >>> layer = flora.Linear(torch.nn.Linear(32, 16), ranks=4)
    >>> layer.core.shape, [tuple(f.shape) for f in layer.factors]
    (torch.Size([4, 4]), [(16, 4), (32, 4)])
    >>> x = torch.randn(5, 32)
    >>> torch.equal(layer(x), layer.base_layer(x))  # the core starts at zero
    True
    """

    kind = "Linear"
    base_type = nn.Linear

    def factorized_branch(self, x: torch.Tensor, adapter: TuckerDelta) -> torch.Tensor:
        r"""Three thin matmuls, :math:`((x U_1) (sG)^\top) U_0^\top`."""
        out_factor, in_factor = adapter.factors
        return thin_matmul_t(F.linear(thin_matmul(x, in_factor), scaled_core(adapter)), out_factor)

    def dense_branch(self, x: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        r"""The linear map of :math:`\Delta W` (``delta``): ``F.linear(x, delta)``."""
        return F.linear(x, delta)

    def fused_forward(self, x: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        r"""The linear map of :math:`W + \Delta W` with the bias: one ``F.linear``."""
        return F.linear(x, self.base_weight() + delta, self.base_layer.bias)

    @classmethod
    def branch_costs(
        cls, geometry: tuple, shape: tuple[int, ...], x_shape: tuple[int, ...], ranks: Sequence[int]
    ) -> tuple[list[Op], Op, int, int]:
        """The three thin products against one ``(tokens, in) @ (in, out)`` product."""
        out_size, in_size = shape
        out_rank, in_rank = ranks
        elements = math.prod(x_shape)
        tokens = elements // in_size
        factorized = [
            product(tokens, in_size, in_rank),
            product(tokens, in_rank, out_rank),
            product(tokens, out_rank, out_size),
        ]
        return factorized, product(tokens, in_size, out_size), elements, tokens * out_size


add_kind(LayerKind("Linear", (nn.Linear,), Linear, lora="linear", all_linear=True))
