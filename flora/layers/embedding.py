r"""FLoRA adapter for ``torch.nn.Embedding``: :math:`\Delta E = s \cdot U_0 G U_1^\top`."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F  # noqa: N812
from torch import nn

from flora._cost import Op, product
from flora.kinds import LayerKind, add_kind
from flora.layers._thin import thin_matmul_t
from flora.layers.base import FLoRALayer, TuckerDelta, scaled_core

__all__ = ["Embedding"]


class Embedding(FLoRALayer):
    r"""A ``torch.nn.Embedding`` with a FLoRA adapter on its table.

    The factorized lookup gathers rows of ``U_0`` (shape
    ``(num_embeddings, R_0)``) and multiplies them by :math:`s \cdot G U_1^\top`; it
    never builds :math:`\Delta E`. The row of ``padding_idx`` gets no update, in both
    forwards and in :func:`flora.merge`.

    Parameters
    ----------
    base_layer : torch.nn.Embedding
        The layer to adapt; frozen, kept as ``self.base_layer``.
    ranks : int or sequence of int or None, optional
        Ranks ``(R_0, R_1)`` of the vocabulary and embedding modes.
    scale : float, optional
        The factor ``s``.
    dropout : float, optional
        Accepted for a uniform signature and ignored: the input is indices.
    init : {"auto", "balanced", "zero_core", "hosvd", "gaussian"}, optional
        See :mod:`flora.init`.
    forward : {"auto", "dense", "factorized"}, optional
        ``"dense"`` builds :math:`\Delta E` and gathers from it.
    adapter_name : str or None, optional
        Name of the adapter created (``"default"``); ``None`` wraps the
        layer without adapters.

    Raises
    ------
    TypeError
        If ``base_layer`` is not exactly a ``torch.nn.Embedding``.
    ValueError
        For invalid ranks, scale, dropout, init or forward.

    Examples
    --------
    >>> import torch
    >>> import flora
    >>> layer = flora.Embedding(torch.nn.Embedding(100, 16, padding_idx=0), ranks=4)
    >>> with torch.no_grad():
    ...     _ = layer.core.normal_()
    >>> bool(layer.delta_weight()[0].abs().max() == 0)  # the padding row
    True
    >>> layer(torch.tensor([[0, 5, 7]])).shape
    torch.Size([1, 3, 16])
    """

    kind = "Embedding"
    base_type = nn.Embedding

    def _mask(self, delta: torch.Tensor) -> torch.Tensor:
        """Zero the ``padding_idx`` row: every update (trained, initial, merged) skips it."""
        padding_idx = self.base_layer.padding_idx
        if padding_idx is None:
            return delta
        return delta.index_fill(0, torch.tensor([padding_idx], device=delta.device), 0.0)

    def _cast_input(self, x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        return x

    def _branch_input(self, x: torch.Tensor, adapter: TuckerDelta) -> torch.Tensor:
        return x

    def _fusable_delta(self, delta: torch.Tensor) -> bool:
        return False

    def factorized_branch(self, x: torch.Tensor, adapter: TuckerDelta) -> torch.Tensor:
        """Gather factor rows, then two thin matmuls; padding positions give zero."""
        row_factor, dim_factor = adapter.factors
        rows = F.embedding(x, row_factor)
        padding_idx = self.base_layer.padding_idx
        if padding_idx is not None:
            rows = rows * (x != padding_idx).unsqueeze(-1).to(rows.dtype)
        return thin_matmul_t(rows @ scaled_core(adapter), dim_factor)

    def dense_branch(self, x: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        r"""Gather rows of :math:`\Delta E`."""
        return F.embedding(x, delta)

    @classmethod
    def branch_costs(
        cls, geometry: tuple, shape: tuple[int, ...], x_shape: tuple[int, ...], ranks: Sequence[int]
    ) -> tuple[list[Op], Op, int, int]:
        r"""A gather of factor rows and two thin products, against a gather of :math:`\Delta E`."""
        rows, dim = shape
        rank0, rank1 = ranks
        tokens = math.prod(x_shape)
        # A gather reads and writes `tokens` rows; its backward also zero-fills
        # a gradient of the whole table, counted once for both passes.
        factorized = [
            Op(0, 2 * tokens * rank0 + rows * rank0),
            product(tokens, rank0, rank1),
            product(tokens, rank1, dim),
        ]
        return factorized, Op(0, 2 * tokens * dim + rows * dim), tokens, tokens * dim


add_kind(LayerKind("Embedding", (nn.Embedding,), Embedding, lora="embedding"))
