"""FLoRA layers: one module per layer family, all built on :class:`TuckerDelta`."""

from flora.layers.base import FLoRALayer, TuckerDelta
from flora.layers.conv import Conv1d, Conv2d, Conv3d
from flora.layers.embedding import Embedding
from flora.layers.linear import Linear
from flora.layers.parametrization import TuckerParametrization

__all__ = [
    "Conv1d",
    "Conv2d",
    "Conv3d",
    "Embedding",
    "FLoRALayer",
    "Linear",
    "TuckerDelta",
    "TuckerParametrization",
]
