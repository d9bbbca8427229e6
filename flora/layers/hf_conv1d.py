r"""FLoRA adapter for transformers' ``Conv1D``: a linear map whose weight is stored ``(in, out)``.

GPT-2-family models compute every attention and MLP projection (``c_attn``,
``c_proj``, ``c_fc``) as ``y = x @ W + b`` with ``W`` of shape ``(in, out)``.
The update is modelled in the layer's ``(out, in)`` map, as for
:class:`flora.Linear`: :math:`\Delta W = s \cdot U_0 G U_1^\top` of shape ``(out, in)``, so the
branch, the cost model and PEFT's LoRA form (``lora_B @ lora_A`` with
``fan_in_fan_out=True``) are Linear's. The base weight is read as the view
``W.T``, and a merge writes through it.
"""

from __future__ import annotations

import torch
from torch import nn

from flora.kinds import LayerKind, add_kind
from flora.layers.linear import Linear

__all__ = ["Conv1D"]

#: transformers' class, matched by name: importing transformers only to detect
#: it would load the library for models that do not use it.
CONV1D_TYPE = "transformers.pytorch_utils.Conv1D"


def _read(module: nn.Module) -> torch.Tensor:
    return module.weight.T


def _write(module: nn.Module, value: torch.Tensor) -> None:
    module.weight.copy_(value.T)


class Conv1D(Linear):
    """A transformers ``Conv1D`` with a FLoRA adapter on its ``(out, in)`` map.

    Parameters, options and errors are those of :class:`flora.Linear`; the
    base layer is a ``transformers.pytorch_utils.Conv1D`` (weight stored
    ``(in, out)``, ``y = x @ W + b``), and ``ranks`` are ``(R_out, R_in)``.
    ``layer.weight`` is the stored ``(in, out)`` weight, as code reading
    ``module.weight`` expects; :meth:`base_weight` is its ``(out, in)`` view.

    Examples
    --------
    >>> import torch
    >>> import flora
    >>> from transformers.pytorch_utils import Conv1D
    >>> layer = flora.Conv1D(Conv1D(12, 4), ranks=2)  # nf=12 outputs, nx=4 inputs
    >>> tuple(layer.weight.shape), layer.shape
    ((4, 12), (12, 4))
    >>> x = torch.randn(3, 4)
    >>> torch.equal(layer(x), layer.base_layer(x))  # the core starts at zero
    True
    """

    kind = "Conv1D"
    base_type = nn.Module  # matched by name through the registry (CONV1D_TYPE)


add_kind(
    LayerKind(
        "Conv1D",
        (CONV1D_TYPE,),
        Conv1D,
        read_weight=_read,
        write_weight=_write,
        lora="linear",
        all_linear=True,
    )
)
